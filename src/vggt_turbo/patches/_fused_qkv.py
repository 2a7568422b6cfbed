"""q, k and v with qk-norm and RoPE-2D fused in one kernel (``kernels/qk_norm_rope.py``): ``fused_qk_norm_rope``'s
computation, shared with the patches that compute an attention of their own (``kv_subsample``,
``sequence_parallel``), so that their q, k and v round exactly as that patch's do.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..kernels.qk_norm_rope import compute_dtype, qk_norm_rope
from ._rope_table import published_table_length, rope_table


def fused_qkv(
    attn: nn.Module, x: torch.Tensor, pos: Optional[torch.Tensor]
) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """q, k, v (B, H, N, D) for SDPA with qk-norm and RoPE fused, or None where upstream's path must run
    (training, autograd on, no positions, or no table length published by ``sync_free_rope``)."""
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
