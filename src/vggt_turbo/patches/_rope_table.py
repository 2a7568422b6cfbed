"""The RoPE table that ``sync_free_rope`` makes and publishes, read by the patches that apply RoPE themselves
(``sync_free_rope``'s RoPE forward, ``fused_qk_norm_rope`` and, through it, ``kv_subsample`` and
``sequence_parallel``).

The patched ``Aggregator.forward`` publishes its RoPE's table length for the duration of its call
(``table_published``), computed on the host, so that no reader needs upstream's ``int(positions.max()) + 1``
sync. ``rope_table`` makes the table with upstream's own ``_compute_frequency_components``, in fp32 even under
autocast, and keeps it apart from upstream's ``frequency_cache`` (the reasons are in ``sync_free_rope``'s
docstring).
"""

from __future__ import annotations

import contextlib
import contextvars
import weakref
from typing import Iterator, Optional

import torch
from torch import nn

from ..autocast import autocast_dtype

# (the RoPE module, its table length) while a patched Aggregator.forward runs.
_TABLE: contextvars.ContextVar[Optional[tuple[nn.Module, int]]] = contextvars.ContextVar(
    "vggt_turbo_rope_table", default=None
)


@contextlib.contextmanager
def table_published(rope: nn.Module, length: int) -> Iterator[None]:
    """Publish ``rope``'s table length for the duration of the block (to it and to other patches' readers)."""
    token = _TABLE.set((rope, length))
    try:
        yield
    finally:
        _TABLE.reset(token)


def published_table_length(rope: nn.Module) -> Optional[int]:
    """The table length published for ``rope`` (by its patched aggregator's running forward), else None."""
    published = _TABLE.get()
    return published[1] if published is not None and published[0] is rope else None


# Per RoPE module (weakly held): (dim, length, device, dtype) -> (cos, sin)
_TABLES: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, tuple[torch.Tensor, torch.Tensor]]]" = weakref.WeakKeyDictionary()


def rope_table(rope: nn.Module, dim: int, length: int, device: torch.device,
               dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's ``rope._compute_frequency_components(dim, length, device, dtype)`` as upstream computes it outside
    autocast, without reading or writing upstream's ``frequency_cache`` (see ``sync_free_rope``'s docstring)."""
    key = (dim, length, device, dtype)
    tables = _TABLES.setdefault(rope, {})
    table = tables.get(key)
    if table is None:
        upstream_cache = rope.frequency_cache
        rope.frequency_cache = {}
        fp32 = torch.autocast(device.type, enabled=False) if autocast_dtype(device.type) else contextlib.nullcontext()
        try:
            with fp32:
                table = rope._compute_frequency_components(dim, length, device, dtype)
        finally:
            rope.frequency_cache = upstream_cache
        tables[key] = table
    return table
