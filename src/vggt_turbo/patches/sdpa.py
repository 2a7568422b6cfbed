"""sdpa — replaces ``Attention.forward(x, pos=None)`` of every frame and global block.

Why faster: upstream hands ``scaled_dot_product_attention`` a strided ``v`` (a permuted view of the fused qkv
projection) and leaves the kernel choice to torch's default order. This version makes q/k/v contiguous and runs
SDPA under an explicit backend: ``"auto"`` puts cuDNN first on CUDA (measured on an H100 at VGGT's shapes:
cuDNN 386-421 TFLOP/s, FlashAttention-2 284-307), falling back to flash, memory-efficient and math in that order
for what cuDNN cannot run; elsewhere it keeps torch's default. A forced backend that cannot run the call raises
a clear error instead of silently falling back.

Exact: the same projections, qk-norm and RoPE in the same order; only the attention kernel may differ from the
one torch picks by default, which changes results by that kernel's rounding (bf16 noise on the GPU; fp32 on the
CPU agrees to ~1e-6). In training mode the upstream forward runs unchanged (dropout, checkpointing).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TurboConfig
from ..upstream import AGGREGATOR_LAYOUT, Requirement, aggregator_of, first_attention
from ._base import Patch, Target, aggregator_path, join

try:
    from torch.nn.attention import SDPBackend, sdpa_kernel
except ImportError:  # torch < 2.3
    SDPBackend = sdpa_kernel = None  # type: ignore[assignment,misc]

_BACKEND_NAMES = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
_AUTO_ORDER = ("cudnn", "flash", "efficient", "math")
_HAS_PRIORITY = sdpa_kernel is not None and "set_priority" in inspect.signature(sdpa_kernel).parameters


def backend(name: str) -> Any:
    """The ``SDPBackend`` for a config name; ``ValueError`` if this torch has none."""
    member = getattr(SDPBackend, _BACKEND_NAMES[name], None) if SDPBackend is not None else None
    if member is None:
        raise ValueError(f"sdpa_backend={name!r} is not available in torch {torch.__version__}")
    return member


def _auto_context() -> Optional[ContextManager]:
    if not _HAS_PRIORITY:  # torch < 2.6: no priority order; keep torch's default choice
        return None
    order = [backend(n) for n in _AUTO_ORDER if getattr(SDPBackend, _BACKEND_NAMES[n], None) is not None]
    return sdpa_kernel(order, set_priority=True)


def _x_pos(x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    return x, pos


def make_wrapper(backend_name: str):
    """The ``Attention.forward`` wrapper for one backend choice."""

    def context(device: torch.device) -> ContextManager:
        if backend_name == "auto":
            ctx = _auto_context() if device.type == "cuda" else None
            return ctx if ctx is not None else contextlib.nullcontext()
        return sdpa_kernel([backend(backend_name)])

    def attention_forward(wrapped: Any, attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        if attn.training:
            return wrapped(*args, **kwargs)
        x, pos = _x_pos(*args, **kwargs)
        B, N, C = x.shape
        qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        if attn.rope is not None:
            q, k = attn.rope(q, pos), attn.rope(k, pos)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        try:
            with context(q.device):
                out = F.scaled_dot_product_attention(q, k, v)
        except RuntimeError as err:
            if backend_name == "auto":
                raise
            raise RuntimeError(
                f"vggt_turbo: sdpa_backend={backend_name!r} cannot run attention on q{tuple(q.shape)} "
                f"{q.dtype} on {q.device} ({err}); use sdpa_backend='auto'"
            ) from err
        return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, C)))

    return attention_forward


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    if config.sdpa_backend != "auto":
        backend(config.sdpa_backend)  # ValueError now, not at the first forward
    agg = aggregator_path(root)
    wrapper = make_wrapper(config.sdpa_backend)
    aggregator = aggregator_of(root)
    return [
        Target(join(agg, kind, str(i), "attn"), "forward", wrapper)
        for kind in ("frame_blocks", "global_blocks")
        for i in range(len(getattr(aggregator, kind)))
    ]


PATCH = Patch(
    name="sdpa",
    exact=True,
    requirements=AGGREGATOR_LAYOUT
    + tuple(
        Requirement("Attention", name, first_attention, params)
        for name, params in (
            ("forward", ("x", "pos")),
            ("qkv", None),
            ("q_norm", None),
            ("k_norm", None),
            ("rope", None),
            ("proj", None),
            ("proj_drop", None),
            ("num_heads", None),
            ("head_dim", None),
        )
    ),
    enabled=lambda c: c.sdpa,
    targets=_targets,
)
