"""vggt-turbo: run-time patches that make an unmodified upstream VGGT faster and leaner.

    import vggt_turbo
    vggt_turbo.apply_optimizations(model)            # "exact" preset: upstream's outputs
    vggt_turbo.apply_optimizations(model, "fast")    # adds approximations (see README)
    vggt_turbo.revert_optimizations(model)           # upstream behaviour again
    vggt_turbo.plan(800, memory=24)                  # how many frames fit, before loading anything

The names are imported when first used (PEP 562), not by ``import vggt_turbo``: the library's modules import
torch, and a process that needs only a torch-free part of the package (the ``reconstruct`` command's preview
renderer, a process of its own: ``app/preview_process.py``) should not pay a second of torch's import for it.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import PRESETS, TurboConfig
    from .patching import Description, apply_optimizations, describe, optimized, revert_optimizations
    from .planner import Estimate, Plan, plan
    from .upstream import PINNED_COMMIT, IncompatibleUpstreamError

__version__ = "0.1.0"

# Each public name and the module that defines it.
_HOMES = {
    "PRESETS": "config",
    "TurboConfig": "config",
    "Estimate": "planner",
    "Plan": "planner",
    "plan": "planner",
    "Description": "patching",
    "apply_optimizations": "patching",
    "describe": "patching",
    "optimized": "patching",
    "revert_optimizations": "patching",
    "PINNED_COMMIT": "upstream",
    "IncompatibleUpstreamError": "upstream",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    """A public name from its module, imported now; a submodule (``vggt_turbo.patches``) likewise."""
    if name.startswith("__"):  # probes such as __wrapped__ or __file__: never a submodule
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    home = _HOMES.get(name)
    if home is not None:
        value = getattr(importlib.import_module(f".{home}", __name__), name)
        globals()[name] = value  # later lookups are plain attribute reads
        return value
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":  # the submodule exists but something it imports is missing
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__() -> list[str]:
    return sorted({*globals(), *_HOMES})


logging.getLogger(__name__).addHandler(logging.NullHandler())
