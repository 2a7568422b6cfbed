"""fused_frame_batching — replaces ``Aggregator._process_frame_attention(tokens, B, S, P, C, frame_idx, pos=None)``.

What it does: each frame-attention step runs as one block call over all B*S frames on a contiguous
(B*S, P, C) layout, positions reshaped once, no per-frame loop and no copies.

Honest note: upstream already batches the B*S frames in one call and its reshapes are views, so on its own this
patch removes only a few shape comparisons per layer; the benchmark reports its effect (expected: within noise).
It exists as the single entry point of the frame pass that later optimizations build on.

Exact: the same blocks on the same tensors. In training mode upstream's method runs unchanged.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...config import TurboConfig
from ...upstream import AGGREGATOR_LAYOUT, FRAME_STEP
from .._base import Patch, Target, Tier, aggregator_path
from .._blocks import run_blocks


def process_frame_attention(wrapped: Any, aggregator: nn.Module, args: tuple, kwargs: dict) -> Any:
    if aggregator.training:
        return wrapped(*args, **kwargs)
    tokens, B, S, P, C, idx, pos = FRAME_STEP.bind(*args, **kwargs)
    return run_blocks(aggregator, aggregator.frame_blocks, tokens, B, S, P, C, idx, pos, frame_layout=lambda i: True)


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    return [Target(aggregator_path(root), "_process_frame_attention", process_frame_attention)]


PATCH = Patch(
    name="fused_frame_batching",
    tier=Tier.EXACT,
    sequence_parallel=True,
    summary="the frame-attention step as one call over all B·S frames (upstream already batches)",
    requirements=AGGREGATOR_LAYOUT + (FRAME_STEP.requirement,),
    enabled=lambda c: c.fused_frame_batching,
    targets=_targets,
)
