"""nvtx — wraps ``forward`` of the patch embed, every frame and global block and every head in an NVTX range.

Why: Nsight Systems (``nsys profile --trace=cuda,nvtx``) then shows where time goes per phase and per layer.
Cost: one range push/pop per module call (microseconds of host time); zero when the flag is off, since nothing
is wrapped. Exact: it only marks time.

Ranges (domain ``vggt_turbo``): ``patch_embed``, ``frame_block[i]``, ``global_block[i]``, ``camera_head``,
``depth_head``, ``point_head``, ``track_head``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...config import TurboConfig
from ...upstream import AGGREGATOR_LAYOUT, Requirement, aggregator_of
from .._base import Patch, Target, Tier, aggregator_path, join

DOMAIN = "vggt_turbo"
HEADS = ("camera_head", "depth_head", "point_head", "track_head")


def make_wrapper(name: str):
    """A wrapper that runs the wrapped call inside the NVTX range ``name``."""
    import nvtx as _nvtx  # here, not at import time: the package costs nothing until the flag is used

    def in_range(wrapped: Any, instance: nn.Module, args: tuple, kwargs: dict) -> Any:
        with _nvtx.annotate(name, domain=DOMAIN):
            return wrapped(*args, **kwargs)

    return in_range


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    agg = aggregator_path(root)
    aggregator = aggregator_of(root)
    targets = [Target(join(agg, "patch_embed"), "forward", make_wrapper("patch_embed"))]
    for kind, label in (("frame_blocks", "frame_block"), ("global_blocks", "global_block")):
        targets += [
            Target(join(agg, kind, str(i)), "forward", make_wrapper(f"{label}[{i}]"))
            for i in range(len(getattr(aggregator, kind)))
        ]
    if agg:  # a whole VGGT: its heads too (a head disabled upstream is None)
        targets += [Target(h, "forward", make_wrapper(h)) for h in HEADS if getattr(root, h, None) is not None]
    return targets


PATCH = Patch(
    name="nvtx",
    tier=Tier.EXACT,
    sequence_parallel=True,
    summary="NVTX ranges around the patch embed, every block and every head, for Nsight Systems",
    requirements=AGGREGATOR_LAYOUT + (Requirement("Aggregator", "patch_embed", aggregator_of),),
    enabled=lambda c: c.nvtx,
    targets=_targets,
)
