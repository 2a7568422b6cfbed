"""dino_attention — replaces ``MemEffAttention.forward(x, attn_bias=None, pos=None)`` of the patch embed's (DINOv2
ViT-L) blocks.

Why faster: upstream's DINOv2 attention calls ``F.scaled_dot_product_attention``, which torch 2.11 runs on cuDNN
on an H100, while the aggregator's own attention at the same shape (one frame's 1374 tokens, head dim 64) runs on
FlashAttention-4 under the ``flash_attention_4`` flag, which was measured faster at that shape (the profile and the
one-process comparison of ``benchmarks/ab_flag.py`` are in ``benchmarks/RESULTS.md``). Here the DINOv2 blocks run
FlashAttention-4 first too, whatever the ``flash_attention_4`` flag says (the config's ``AttentionPolicy`` with
FlashAttention-4 first, ``kernels/attention``; it is an optional package, and where it is missing or refuses the
call torch's kernel runs), or, when ``sdpa`` forces a backend for an ablation, that backend.

Exact to bf16 rounding: the same projections and softmax(q kᵀ/√d) v; only the attention kernel may differ from the
one torch picks, which changes results by that kernel's rounding. Where FlashAttention-4 refuses the call (CPU,
fp32, autograd on) torch's default kernel runs on the same q, k, v as upstream's, so the outputs are upstream's
bit for bit. On the H100, with bf16 autocast, the outputs moved by that rounding carried through the 48 layers
after the patch embed: pose_enc 9.9e-3, world points 1.1e-3, depth 3.4e-5 (‖a−b‖/‖b‖, one frame). Upstream runs
unchanged in training mode, with an ``attn_bias`` or ``pos`` (the xFormers
nested-tensor path), and when the module computes its attention without SDPA (``fused_attn=False``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import TurboConfig
from ...kernels.attention import AttentionPolicy
from ...upstream import (
    ATTENTION_PARTS,
    DINO_ATTENTION_FORWARD,
    aggregator_of,
    dino_blocks,
    first_dino_attention,
    members,
)
from .._base import Patch, Target, Tier, aggregator_path, join


def make_wrapper(policy: AttentionPolicy):
    """The DINOv2 ``MemEffAttention.forward`` wrapper, computing attention as ``policy`` picks its kernel."""

    def attention_forward(wrapped: Any, attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        x, attn_bias, pos = DINO_ATTENTION_FORWARD.bind(*args, **kwargs)
        if (
            attn.training
            or attn_bias is not None
            or pos is not None
            or not getattr(attn, "fused_attn", False)
            or attn.rope is not None
            or not isinstance(x, torch.Tensor)
            or x.dim() != 3
        ):
            return wrapped(*args, **kwargs)
        B, N, C = x.shape
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        out = policy.attend(q, k, v)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, C)))

    return attention_forward


def policy(config: TurboConfig) -> AttentionPolicy:
    """The kernel choice for the DINOv2 attention: the backend ``sdpa`` forces, else FlashAttention-4 first."""
    return AttentionPolicy.from_config(config, fa4_first=True)


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    wrapper = make_wrapper(policy(config))  # ValueError now, not at the first forward, for a backend torch lacks
    path = join(aggregator_path(root), "patch_embed", "blocks")
    return [Target(join(path, str(i), "attn"), "forward", wrapper) for i in range(len(dino_blocks(root)))]


PATCH = Patch(
    name="dino_attention",
    tier=Tier.EXACT,
    sequence_parallel=True,  # attention within each frame of the patch embed: each rank embeds its own frames
    summary="the patch embed's (DINOv2) attention on FlashAttention-4 where it runs the call",
    requirements=members("Aggregator", aggregator_of, ("patch_embed", None))
    + (DINO_ATTENTION_FORWARD.requirement,)
    + members("MemEffAttention", first_dino_attention, *ATTENTION_PARTS),
    enabled=lambda c: c.dino_attention,
    targets=_targets,
)
