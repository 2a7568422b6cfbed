"""vggt-turbo: run-time patches that make an unmodified upstream VGGT faster and leaner.

    import vggt_turbo
    vggt_turbo.apply_optimizations(model)            # "exact" preset: upstream's outputs
    vggt_turbo.apply_optimizations(model, "fast")    # adds approximations (see README)
    vggt_turbo.revert_optimizations(model)           # upstream behaviour again
    vggt_turbo.plan(800, memory=24)                  # how many frames fit, before loading anything
"""

import logging

from .config import PRESETS, TurboConfig
from .planner import Estimate, Plan, plan
from .patching import Description, apply_optimizations, describe, optimized, revert_optimizations
from .upstream import PINNED_COMMIT, IncompatibleUpstreamError

__version__ = "0.1.0"

__all__ = [
    "PINNED_COMMIT",
    "Plan",
    "PRESETS",
    "Description",
    "Estimate",
    "IncompatibleUpstreamError",
    "TurboConfig",
    "apply_optimizations",
    "describe",
    "optimized",
    "plan",
    "revert_optimizations",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
