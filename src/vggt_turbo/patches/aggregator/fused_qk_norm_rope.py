"""fused_qk_norm_rope — replaces ``Attention.forward(x, pos=None)`` of every frame and global block whose q/k norms
are LayerNorms over the head dim and which has a RoPE (all 48 in VGGT; the DINOv2 patch embed is not touched).

Why faster: between the qkv projection and SDPA upstream runs q_norm, k_norm and RoPE-2D as about ten elementwise
kernels; under bf16 autocast they work in fp32, leave several full-size fp32 temporaries per layer, and SDPA casts
q and k back to bf16. Here one kernel (``vggt_turbo.kernels.qk_norm_rope``, Triton on CUDA) reads q and k from the
projection output once and writes them back in place, in the dtype SDPA computes in: no temporary, which also
lowers the peak memory of long sequences. q, k and v reach SDPA as strided views of that buffer (token-major, as
upstream's v already is); cuDNN, which gives its output the query's layout (pytorch#138340), then returns a
token-major output and the transpose before ``proj`` is a view instead of a copy.

The RoPE table is upstream's own (``_rope_table.rope_table``; fp32 entries, fp64 for an fp64 model); its length
comes from ``sync_free_rope`` (a prerequisite), so no host sync happens. The computation is ``_fused_qkv``'s,
shared with ``kv_subsample`` and ``sequence_parallel``. The attention kernel is chosen as the ``sdpa`` patch
chooses it (``kernels/attention``'s ``AttentionPolicy`` of the config): with ``sdpa`` on, ``sdpa_backend``
applies here too, this wrapper sitting above ``sdpa``'s and computing the attention itself; with it off,
FlashAttention-4 where the ``flash_attention_4`` flag is on and the package runs the call, else torch's default.

Exact: under bf16 autocast on CUDA the arithmetic is upstream's (LayerNorm and RoPE in fp32, one rounding to bf16
where autocast rounds), up to the order of the norm's reductions and fused multiply-adds (fp32 ulps, rarely visible
after the bf16 rounding); in fp32 likewise; on the CPU the PyTorch reference runs and equals upstream. For a model
run natively in bf16 (``bf16_weights``) q and k are rounded once instead of after each operation, and the angles
come from the fp32 table instead of upstream's bf16 one: closer to the fp32 result than upstream in bf16.

Upstream's forward (or ``sdpa``'s) runs in training mode, with autograd on (the in-place write would break
backward) and outside the aggregator's forward (no table length published).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import TurboConfig
from ...kernels.attention import AttentionPolicy
from ...upstream import AGGREGATOR_LAYOUT, ATTENTION_FORWARD, ATTENTION_MEMBERS, members, rope_of
from .._base import Patch, Target, Tier, aggregator_blocks, join
from .._fused_qkv import fits, fused_qkv


def make_wrapper(policy: AttentionPolicy):
    """The ``Attention.forward`` wrapper, computing attention as ``policy`` picks its kernel."""

    def attention_forward(wrapped: Any, attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        x, pos = ATTENTION_FORWARD.bind(*args, **kwargs)
        qkv = fused_qkv(attn, x, pos)
        if qkv is None:
            return wrapped(*args, **kwargs)
        B, N, C = x.shape
        out = policy.attend(*qkv)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, C)))

    return attention_forward


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    wrapper = make_wrapper(AttentionPolicy.from_config(config))
    return [Target(join(path, "attn"), "forward", wrapper) for path, block in aggregator_blocks(root) if fits(block.attn)]


PATCH = Patch(
    name="fused_qk_norm_rope",
    tier=Tier.EXACT,
    sequence_parallel=True,  # frame blocks only: the global blocks' attention is sequence_parallel's own
    requires=("sync_free_rope",),  # reads the RoPE table length it publishes
    summary=(
        "qk-norm and RoPE-2D of every block in one kernel, in fp32 registers, written in place in the "
        "attention dtype"
    ),
    options={
        "flash_attention_4": "the aggregator's attention on FlashAttention-4 where the optional package runs the call",
    },
    requirements=AGGREGATOR_LAYOUT
    + ATTENTION_MEMBERS
    + members(
        "RotaryPositionEmbedding2D",
        rope_of,
        ("_compute_frequency_components", ("dim", "seq_len", "device", "dtype")),
        ("frequency_cache", None),
    ),
    enabled=lambda c: c.fused_qk_norm_rope,
    targets=_targets,
)
