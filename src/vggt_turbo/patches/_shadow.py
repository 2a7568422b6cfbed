"""Copies of a module's fp32 parameters in another dtype or memory layout, kept between calls and swapped in for
one forward.

Shared by ``bf16_weights`` (every aggregator parameter, autocast off), ``cached_casts`` (the matmul weights
only, autocast on) and ``dpt_channels_last_weights`` (the DPT heads' convolution weights, channels-last). A copy
is rebuilt when its parameter is moved, replaced or changed in place (its storage address or version counter
moves), so an ``optimizer.step()`` or ``load_state_dict`` is never served stale copies. During the forward each
parameter's ``.data`` points at its copy (as ``Module.half()`` does) and is restored after, so a model must not run
the same module from two threads at once.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Callable, Iterable, Iterator, Optional

import torch
from torch import nn

# Which parameters of a module get copies: (module) -> parameters (fp32 ones are kept, others skipped).
Selector = Callable[[nn.Module], Iterable[nn.Parameter]]


class Shadow:
    """The ``dtype`` (and ``memory_format``) copies of the fp32 parameters ``select(module)`` names, valid while
    those keep address and version."""

    def __init__(self, select: Selector) -> None:
        self._select = select
        self._params: list[nn.Parameter] = []
        self._copies: list[torch.Tensor] = []
        self._key: Optional[tuple] = None

    def refresh(self, module: nn.Module, dtype: torch.dtype,
                memory_format: torch.memory_format = torch.preserve_format) -> None:
        params = [p for p in self._select(module) if p.dtype == torch.float32]
        key = (dtype, memory_format, tuple((p.data_ptr(), p._version) for p in params))
        if key != self._key:
            self._copies = []  # free the old copies before making the new ones
            with torch.no_grad(), torch.inference_mode(False):  # plain tensors: .data may be swapped to them
                self._copies = [p.detach().to(dtype, memory_format=memory_format, copy=True) for p in params]
            self._params, self._key = params, key

    def swap(self) -> None:
        """Exchange every parameter's data with its copy (called twice: in, then out)."""
        for i, p in enumerate(self._params):
            p.data, self._copies[i] = self._copies[i], p.data


class Shadows(weakref.WeakKeyDictionary):
    """A ``Shadow`` per module instance, weakly held: a patch's wrapper holds one, so its copies go with it on
    revert."""

    def __init__(self, select: Selector) -> None:
        super().__init__()
        self._select = select

    @contextlib.contextmanager
    def swapped(self, module: nn.Module, dtype: torch.dtype,
                memory_format: torch.memory_format = torch.preserve_format) -> Iterator[None]:
        """``module``'s copies, refreshed, in its parameters' ``.data`` for the ``with`` block."""
        shadow = self.get(module)
        if shadow is None:
            shadow = self[module] = Shadow(self._select)
        shadow.refresh(module, dtype, memory_format)
        shadow.swap()
        try:
            yield
        finally:
            shadow.swap()
