"""What every patch module provides: a ``Patch`` naming its flag, its exactness, its upstream requirements and
the (module, method, wrapper) targets it replaces on a given model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..config import TurboConfig
from ..upstream import Requirement, aggregator_of

# wrapt's wrapper convention: wrapper(wrapped, instance, args, kwargs) -> result
Wrapper = Callable[[Callable[..., Any], Any, tuple, dict], Any]


@dataclass(frozen=True)
class Target:
    """Replace ``<root>.<path>.<attr>`` (``path`` empty: the root itself) by ``wrapper`` around the original."""

    path: str
    attr: str
    wrapper: Wrapper


@dataclass(frozen=True)
class Patch:
    """One optimization: ``enabled(config)`` says whether it is requested, ``targets`` where it goes.

    ``targets`` may raise ``ValueError`` for a config that does not fit the model (e.g. a layer index past the
    model's depth); it must not modify the model.
    """

    name: str
    exact: bool
    requirements: tuple[Requirement, ...]
    enabled: Callable[[TurboConfig], bool]
    targets: Callable[[nn.Module, TurboConfig], list[Target]]


def aggregator_path(root: nn.Module) -> str:
    """Path of the Aggregator inside ``root`` ("" when ``root`` is the Aggregator)."""
    return "aggregator" if aggregator_of(root) is not root else ""


def join(*parts: str) -> str:
    return ".".join(p for p in parts if p)
