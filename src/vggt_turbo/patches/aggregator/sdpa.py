"""sdpa — replaces ``Attention.forward(x, pos=None)`` of every frame and global block.

What it adds: the attention kernel becomes a choice. ``"auto"`` keeps torch's own selection, which on an H100
with torch 2.11 already picks cuDNN at VGGT's shapes, the fastest of torch's kernels there (the forced backends'
times are in ``benchmarks/RESULTS.md``), preceded by FlashAttention-4 where the ``flash_attention_4`` flag is on
and the package runs the call; ``"fa4"`` forces FlashAttention-4. A forced backend is for ablations and for torch
versions whose default is slower, and one that cannot run the call raises a clear error instead of silently
falling back. The choice is ``kernels/attention``'s ``AttentionPolicy``, built from the config as every patch that
computes attention builds it.
q and k reach the kernel contiguous (RoPE writes them); v stays the strided view of the fused qkv projection:
an explicit copy was measured to cost 0.5 GiB at 100 frames and no time.

Exact: the same projections, qk-norm and RoPE in the same order; only the attention kernel may differ from the
one torch picks by default, which changes results by that kernel's rounding (bf16 noise on the GPU; fp32 on the
CPU agrees to ~1e-6). In training mode the upstream forward runs unchanged (dropout, checkpointing).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import TurboConfig
from ...kernels.attention import AttentionPolicy
from ...upstream import AGGREGATOR_LAYOUT, ATTENTION_FORWARD, ATTENTION_MEMBERS
from .._base import Patch, Target, Tier, aggregator_blocks, join


def make_wrapper(policy: AttentionPolicy):
    """The ``Attention.forward`` wrapper computing attention as ``policy`` picks its kernel."""

    def attention_forward(wrapped: Any, attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        if attn.training:
            return wrapped(*args, **kwargs)
        x, pos = ATTENTION_FORWARD.bind(*args, **kwargs)
        B, N, C = x.shape
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if attn.rope is not None:  # one at a time, so the pre-RoPE q is freed before k is rotated
            q = attn.rope(q, pos)
            k = attn.rope(k, pos)
        out = policy.attend(q, k, v)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, C)))

    return attention_forward


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    wrapper = make_wrapper(AttentionPolicy.from_config(config))  # ValueError now for a backend this torch lacks
    return [Target(join(path, "attn"), "forward", wrapper) for path, _ in aggregator_blocks(root)]


PATCH = Patch(
    name="sdpa",
    tier=Tier.EXACT,
    sequence_parallel=True,
    summary="own `Attention.forward` with contiguous q/k/v and a forced backend",
    options={"sdpa_backend": "`auto`, `cudnn`, `flash`, `efficient`, `math` or `fa4`"},
    requirements=AGGREGATOR_LAYOUT
    + ATTENTION_MEMBERS,
    enabled=lambda c: c.sdpa,
    targets=_targets,
)
