"""vggt-turbo: run-time patches that make an unmodified upstream VGGT faster and leaner.

    import vggt_turbo
    vggt_turbo.apply_optimizations(model)            # "exact" preset: upstream's outputs
    vggt_turbo.apply_optimizations(model, "fast")    # adds approximations (see README)
    vggt_turbo.revert_optimizations(model)           # upstream behaviour again
"""

import logging

from .config import PRESETS, TurboConfig
from .patching import Description, apply_optimizations, describe, optimized, revert_optimizations
from .upstream import PINNED_COMMIT, IncompatibleUpstreamError

__version__ = "0.1.0"

__all__ = [
    "PINNED_COMMIT",
    "PRESETS",
    "Description",
    "IncompatibleUpstreamError",
    "TurboConfig",
    "apply_optimizations",
    "describe",
    "optimized",
    "revert_optimizations",
]

logging.getLogger(__name__).addHandler(logging.NullHandler())
