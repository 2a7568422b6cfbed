"""fused_qk_norm_rope — replaces ``Attention.forward(x, pos=None)`` of every frame and global block whose q/k norms
are LayerNorms over the head dim and which has a RoPE (all 48 in VGGT; the DINOv2 patch embed is not touched).

Why faster: between the qkv projection and SDPA upstream runs q_norm, k_norm and RoPE-2D as about ten elementwise
kernels; under bf16 autocast they work in fp32, leave several full-size fp32 temporaries per layer, and SDPA casts
q and k back to bf16. Here one kernel (``vggt_turbo.kernels.qk_norm_rope``, Triton on CUDA) reads q and k from the
projection output once and writes them back in place, in the dtype SDPA computes in: no temporary, which also
lowers the peak memory of long sequences. q, k and v reach SDPA as strided views of that buffer (token-major, as
upstream's v already is); cuDNN, which gives its output the query's layout (pytorch#138340), then returns a
token-major output and the transpose before ``proj`` is a view instead of a copy.

The RoPE table is upstream's own (``sync_free_rope.rope_table``; fp32 entries, fp64 for an fp64 model); its length comes from
``sync_free_rope`` (a prerequisite), so no host sync happens. The attention kernel is chosen as the ``sdpa`` patch
chooses it (``sdpa.attend``, ``sdpa.kernel_name``): with ``sdpa`` on, ``sdpa_backend`` applies here too, this
wrapper sitting above ``sdpa``'s and computing the attention itself; with it off, FlashAttention-4 where the
``flash_attention_4`` flag is on and the package runs the call, else torch's default.

Exact: under bf16 autocast on CUDA the arithmetic is upstream's (LayerNorm and RoPE in fp32, one rounding to bf16
where autocast rounds), up to the order of the norm's reductions and fused multiply-adds (fp32 ulps, rarely visible
after the bf16 rounding); in fp32 likewise; on the CPU the PyTorch reference runs and equals upstream. For a model
run natively in bf16 (``bf16_weights``) q and k are rounded once instead of after each operation, and the angles
come from the fp32 table instead of upstream's bf16 one: closer to the fp32 result than upstream in bf16.

Upstream's forward (or ``sdpa``'s) runs in training mode, with autograd on (the in-place write would break
backward) and outside the aggregator's forward (no table length published).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..config import TurboConfig
from ..kernels.qk_norm_rope import compute_dtype, qk_norm_rope
from ..upstream import AGGREGATOR_LAYOUT, ATTENTION_MEMBERS, aggregator_of, members, rope_of
from ._base import Patch, Target, Tier, aggregator_path, join
from .sdpa import _x_pos, attend, kernel_name
from .sync_free_rope import published_table_length, rope_table


def make_wrapper(backend_name: str):
    """The ``Attention.forward`` wrapper, computing attention on ``backend_name`` (as ``sdpa.attend``)."""

    def attention_forward(wrapped: Any, attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        x, pos = _x_pos(*args, **kwargs)
        qkv = fused_qkv(attn, x, pos)
        if qkv is None:
            return wrapped(*args, **kwargs)
        B, N, C = x.shape
        out = attend(*qkv, backend_name)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, C)))

    return attention_forward


def fused_qkv(
    attn: nn.Module, x: torch.Tensor, pos: Optional[torch.Tensor]
) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """q, k, v (B, H, N, D) for SDPA with qk-norm and RoPE fused, or None where upstream's path must run
    (training, autograd on, no positions, or no table length published by ``sync_free_rope``). Also used by
    ``sequence_parallel``, so that its global attention rounds exactly as the single-process model does."""
    length = published_table_length(attn.rope)
    if attn.training or torch.is_grad_enabled() or pos is None or length is None:
        return None
    B, N, C = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim)
    table = rope_table(attn.rope, attn.head_dim // 2, length, x.device, compute_dtype(qkv))
    return qk_norm_rope(qkv, pos, attn.q_norm, attn.k_norm, *table)


def fits(attn: nn.Module) -> bool:
    """Whether ``attn`` normalises q and k with LayerNorms over its head dim and has a RoPE (``qk_norm=False``
    or ``rope_freq <= 0`` leave nothing to fuse: upstream's forward stays)."""
    return attn.rope is not None and all(
        isinstance(norm, nn.LayerNorm) and tuple(norm.normalized_shape) == (attn.head_dim,)
        for norm in (attn.q_norm, attn.k_norm)
    )


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    agg = aggregator_path(root)
    aggregator = aggregator_of(root)
    wrapper = make_wrapper(kernel_name(config))
    return [
        Target(join(agg, kind, str(i), "attn"), "forward", wrapper)
        for kind in ("frame_blocks", "global_blocks")
        for i, block in enumerate(getattr(aggregator, kind))
        if fits(block.attn)
    ]


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
