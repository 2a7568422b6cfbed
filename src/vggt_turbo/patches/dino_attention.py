"""dino_attention — replaces ``MemEffAttention.forward(x, attn_bias=None, pos=None)`` of the patch embed's (DINOv2
ViT-L) blocks.

Why faster: upstream's DINOv2 attention calls ``F.scaled_dot_product_attention``, which torch 2.11 runs on cuDNN
on an H100, while the aggregator's own attention at the same shape (one frame's 1374 tokens, head dim 64) runs on
FlashAttention-4 under the ``flash_attention_4`` flag. Measured on an H100 (profile of the ``exact`` preset at
one frame, graphs off): the 24 DINOv2 attention calls took 0.78 ms against 0.48 ms for the 24 frame blocks' calls
on FlashAttention-4. Here the DINOv2 blocks run FlashAttention-4 first too (``sdpa.attend``; it is an optional
package, and where it is missing or refuses the call torch's kernel runs), or, when ``sdpa`` forces a backend
for an ablation, that backend.

Measured in one process against the same model without this patch (``benchmarks/ab_flag.py``, H100, ``exact``):
one frame's CUDA-graph replay 13.59 → 13.24 ms; at 10 frames no difference beyond noise (151.1 vs 150.4 ms).

Exact to bf16 rounding: the same projections and softmax(q kᵀ/√d) v; only the attention kernel may differ from the
one torch picks, which changes results by that kernel's rounding. Where FlashAttention-4 refuses the call (CPU,
fp32, autograd on) torch's default kernel runs on the same q, k, v as upstream's, so the outputs are upstream's
bit for bit. On the H100, with bf16 autocast, the outputs moved by that rounding carried through the 48 layers
after the patch embed: pose_enc 9.9e-3, world points 1.1e-3, depth 3.4e-5 (‖a−b‖/‖b‖, one frame). Upstream runs
unchanged in training mode, with an ``attn_bias`` or ``pos`` (the xFormers
nested-tensor path), and when the module computes its attention without SDPA (``fused_attn=False``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ..config import TurboConfig
from ..upstream import ATTENTION_PARTS, aggregator_of, dino_blocks, members
from ._base import Patch, Target, Tier, aggregator_path, join
from .sdpa import FA4_FIRST, attend, backend, kernel_name


def _x(x: torch.Tensor, attn_bias: Any = None, pos: Any = None) -> tuple[torch.Tensor, Any, Any]:
    return x, attn_bias, pos


def make_wrapper(backend_name: str):
    """The DINOv2 ``MemEffAttention.forward`` wrapper for one kernel choice."""

    def attention_forward(wrapped: Any, attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        x, attn_bias, pos = _x(*args, **kwargs)
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
        out = attend(q, k, v, backend_name)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, C)))

    return attention_forward


def _first_dino_attention(root: nn.Module) -> Optional[nn.Module]:
    blocks = dino_blocks(root)
    return blocks[0].attn if blocks else None


def kernel(config: TurboConfig) -> str:
    """The kernel choice for the DINOv2 attention: the backend ``sdpa`` forces, else FlashAttention-4 first."""
    name = kernel_name(config)
    return name if name not in ("auto", FA4_FIRST) else FA4_FIRST


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    name = kernel(config)
    if name not in ("fa4", FA4_FIRST):
        backend(name)  # ValueError now, not at the first forward
    wrapper = make_wrapper(name)
    path = join(aggregator_path(root), "patch_embed", "blocks")
    return [Target(join(path, str(i), "attn"), "forward", wrapper) for i in range(len(dino_blocks(root)))]


PATCH = Patch(
    name="dino_attention",
    tier=Tier.EXACT,
    sequence_parallel=True,  # attention within each frame of the patch embed: each rank embeds its own frames
    summary="the patch embed's (DINOv2) attention on FlashAttention-4 where it runs the call",
    requirements=members("Aggregator", aggregator_of, ("patch_embed", None))
    + members("MemEffAttention", _first_dino_attention, ("forward", ("x", "attn_bias", "pos")), *ATTENTION_PARTS),
    enabled=lambda c: c.dino_attention,
    targets=_targets,
)
