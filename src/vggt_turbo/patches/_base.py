"""What every patch module provides: a ``Patch`` naming its flag, its precision tier, its upstream requirements
and the (module, method, wrapper) targets it replaces on a given model."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from torch import nn

from ..config import TurboConfig
from ..upstream import Requirement, aggregator_of

# wrapt's wrapper convention: wrapper(wrapped, instance, args, kwargs) -> result
Wrapper = Callable[[Callable[..., Any], Any, tuple, dict], Any]


class Tier(enum.IntEnum):
    """How far a patch may move the outputs from upstream's, loosest last (a config's tier is its loosest patch's).

    The yardstick is upstream run in fp32: upstream's own bf16 autocast already differs from it, and that
    difference is the noise floor (``vggt-turbo bench --precision`` measures every flag against it).

    - ``EXACT``: upstream's operations; at most another summation order, another kernel for the same product, or
      fewer roundings than autocast. On the GPU every output stays within 1.25x of upstream-autocast's own error
      against fp32; on the CPU in fp32 within ~1e-5 relative of upstream.
    - ``REDUCED``: the same computation, rounded more often than upstream-autocast (e.g. a bf16 residual stream).
    - ``APPROXIMATE``: another computation (e.g. fewer keys in attention).
    """

    EXACT = 0
    REDUCED = 1
    APPROXIMATE = 2

    def __str__(self) -> str:
        return self.label

    @property
    def label(self) -> str:
        return {Tier.EXACT: "exact", Tier.REDUCED: "reduced precision", Tier.APPROXIMATE: "approximate"}[self]


@dataclass(frozen=True)
class Target:
    """Replace ``<root>.<path>.<attr>`` (``path`` empty: the root itself) by ``wrapper`` around the original."""

    path: str
    attr: str
    wrapper: Wrapper


@dataclass(frozen=True)
class Patch:
    """One optimization: ``enabled(config)`` says whether it is requested, ``targets`` where it goes, ``tier`` how
    far it may move the outputs (``Tier``).

    ``targets`` may raise ``ValueError`` for a config that does not fit the model (e.g. a layer index past the
    model's depth); it must not modify the model.
    """

    name: str  # its flag (a TurboConfig field)
    tier: Tier
    summary: str  # what it does, one line (the README's flag table is made from it)
    requirements: tuple[Requirement, ...]  # what it needs of upstream (checked before anything is touched)
    enabled: Callable[[TurboConfig], bool]
    targets: Callable[[nn.Module, TurboConfig], list[Target]]
    options: Mapping[str, str] = field(default_factory=dict)  # the other TurboConfig fields it reads: one line each
    requires: tuple[str, ...] = ()  # flags it works only on top of
    dependent_options: tuple[str, ...] = ()  # boolean options that work only with its own flag on
    conflicts: Optional[Callable[[TurboConfig], Optional[str]]] = None  # why it cannot run with this config, if so
    sequence_parallel: bool = False  # verified to give the single-process outputs under ``sequence_parallel``


def aggregator_path(root: nn.Module) -> str:
    """Path of the Aggregator inside ``root`` ("" when ``root`` is the Aggregator)."""
    return "aggregator" if aggregator_of(root) is not root else ""


def aggregator_blocks(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(path, block)`` of every frame block, then every global block, of ``root``'s Aggregator: the targets of
    the patches that wrap each block (or its attention)."""
    agg, path = aggregator_of(root), aggregator_path(root)
    return [
        (join(path, kind, str(i)), block)
        for kind in ("frame_blocks", "global_blocks")
        for i, block in enumerate(getattr(agg, kind))
    ]


def join(*parts: str) -> str:
    return ".".join(p for p in parts if p)
