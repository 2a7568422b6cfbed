"""Tensors that a captured CUDA graph reads but that a patch's cache owns.

A graph reads memory by address. A patch that hands a forward a tensor from a bounded cache (``cached_positions``
keeps 8 shapes) may evict it later, while a graph captured with it still exists: its replay would then read freed
memory, reused by other tensors. ``hold`` lets the capture (``cuda_graphs``) keep such a tensor alive as long as
the graph.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch

_HELD: contextvars.ContextVar[Optional[list[torch.Tensor]]] = contextvars.ContextVar("vggt_turbo_graph_refs", default=None)


def hold(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, kept alive by the graph being captured (if any) for as long as that graph lives."""
    held = _HELD.get()
    if held is not None:
        held.append(tensor)
    return tensor


@contextlib.contextmanager
def holding() -> Iterator[list[torch.Tensor]]:
    """Collect what ``hold`` is given inside the block (a capture)."""
    held: list[torch.Tensor] = []
    token = _HELD.set(held)
    try:
        yield held
    finally:
        _HELD.reset(token)
