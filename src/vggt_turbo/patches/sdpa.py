"""sdpa — replaces ``Attention.forward(x, pos=None)`` of every frame and global block.

What it adds: the attention kernel becomes a choice. ``"auto"`` keeps torch's own selection, which on an H100
with torch 2.11 already picks cuDNN at VGGT's shapes (measured: upstream at 100 frames 6.0 s, forced cuDNN 6.0 s,
forced FlashAttention-2 7.4 s, memory-efficient 15.1 s), preceded by FlashAttention-4 where the
``flash_attention_4`` flag is on and the package runs the call (``kernels/flash_attention_4.py``); ``"fa4"`` forces
FlashAttention-4. A forced backend is for ablations and for torch versions whose default is slower, and one that
cannot run the call raises a clear error instead of silently falling back. ``attend`` and ``kernel_name`` are the
one place where the attention wrappers of the other patches choose their kernel too.
q and k reach the kernel contiguous (RoPE writes them); v stays the strided view of the fused qkv projection:
an explicit copy was measured to cost 0.5 GiB at 100 frames and no time.

Exact: the same projections, qk-norm and RoPE in the same order; only the attention kernel may differ from the
one torch picks by default, which changes results by that kernel's rounding (bf16 noise on the GPU; fp32 on the
CPU agrees to ~1e-6). In training mode the upstream forward runs unchanged (dropout, checkpointing).
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TurboConfig
from ..kernels import flash_attention_4 as fa4
from ..upstream import AGGREGATOR_LAYOUT, ATTENTION_MEMBERS, aggregator_of
from ._base import Patch, Target, Tier, aggregator_path, join

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None  # type: ignore[assignment,misc]

_BACKEND_NAMES = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
# The kernel choice of an unforced backend with the flash_attention_4 flag on: FlashAttention-4, else torch's choice.
FA4_FIRST = "fa4-first"


def kernel_name(config: TurboConfig) -> str:
    """The attention kernel the wrappers use under ``config``: ``sdpa_backend`` when ``sdpa`` is on, else
    ``"auto"``; an ``"auto"`` becomes ``FA4_FIRST`` when ``flash_attention_4`` is on."""
    name = config.sdpa_backend if config.sdpa else "auto"
    return FA4_FIRST if name == "auto" and config.flash_attention_4 else name


def backend(name: str) -> Any:
    """The ``SDPBackend`` for a config name; ``ValueError`` if this torch has none."""
    member = getattr(SDPBackend, _BACKEND_NAMES[name], None) if SDPBackend is not None else None
    if member is None:
        raise ValueError(f"sdpa_backend={name!r} is not available in torch {torch.__version__}")
    return member


def _x_pos(x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    return x, pos


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend_name: str) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v)`` on the kernel ``kernel_name`` chose (``"auto"``: torch's choice;
    ``FA4_FIRST``: FlashAttention-4 where it runs the call, else torch's choice); a forced backend that cannot run
    the call raises an error saying so instead of silently falling back."""
    if backend_name == "fa4":
        return fa4.forced(q, k, v)[0]
    if backend_name == FA4_FIRST:
        got = fa4.attention_or_none(q, k, v)
        if got is not None:
            return got[0]
        backend_name = "auto"
    context: ContextManager = (
        contextlib.nullcontext() if backend_name == "auto" else sdpa_kernel([backend(backend_name)])
    )
    try:
        with context:
            return F.scaled_dot_product_attention(q, k, v)
    except RuntimeError as err:
        if backend_name == "auto":
            raise
        raise RuntimeError(
            f"vggt_turbo: sdpa_backend={backend_name!r} cannot run attention on q{tuple(q.shape)} "
            f"{q.dtype} on {q.device} ({err}); use sdpa_backend='auto'"
        ) from err


def make_wrapper(backend_name: str):
    """The ``Attention.forward`` wrapper for one backend choice."""

    def attention_forward(wrapped: Any, attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        if attn.training:
            return wrapped(*args, **kwargs)
        x, pos = _x_pos(*args, **kwargs)
        B, N, C = x.shape
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if attn.rope is not None:  # one at a time, so the pre-RoPE q is freed before k is rotated
            q = attn.rope(q, pos)
            k = attn.rope(k, pos)
        out = attend(q, k, v, backend_name)
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, C)))

    return attention_forward


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    if config.sdpa_backend not in ("auto", "fa4"):
        backend(config.sdpa_backend)  # ValueError now, not at the first forward
    agg = aggregator_path(root)
    wrapper = make_wrapper(kernel_name(config))
    aggregator = aggregator_of(root)
    return [
        Target(join(agg, kind, str(i), "attn"), "forward", wrapper)
        for kind in ("frame_blocks", "global_blocks")
        for i in range(len(getattr(aggregator, kind)))
    ]


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
