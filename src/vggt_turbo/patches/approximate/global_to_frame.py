"""global_to_frame_layers — replaces ``Aggregator._process_global_attention(tokens, B, S, P, C, global_idx, pos=None)``.

APPROXIMATION (changes outputs; off in the "exact" preset). The listed global blocks run as frame attention:
their own weights on the (B*S, P, C) layout, so each token attends within its frame only. A global layer costs
O((S*P)^2) and a frame layer O(S*P^2), so each swapped layer saves about (S-1)/S of its attention time. The
project's seed swapped layers 0-4 ("fast" preset); AVGGT (arXiv 2512.02541) reports that early global layers
attend mostly within a frame. The error this causes is reported by the benchmarks and the fidelity harness.

At S=1 frame and global attention coincide, so the swap is exact there. Non-listed layers run upstream's code.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...config import TurboConfig
from ...upstream import AGGREGATOR_LAYOUT, GLOBAL_STEP, Requirement, aggregator_of
from .._base import Patch, Target, Tier, aggregator_path
from .._blocks import run_blocks


def make_wrapper(layers: frozenset[int]):
    """The ``_process_global_attention`` wrapper that runs ``layers`` on the frame layout."""

    def process_global_attention(wrapped: Any, aggregator: nn.Module, args: tuple, kwargs: dict) -> Any:
        tokens, B, S, P, C, idx, pos = GLOBAL_STEP.bind(*args, **kwargs)
        if layers.isdisjoint(range(idx, idx + aggregator.aa_block_size)):
            return wrapped(*args, **kwargs)
        return run_blocks(aggregator, aggregator.global_blocks, tokens, B, S, P, C, idx, pos, frame_layout=layers.__contains__)

    return process_global_attention


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    depth = len(aggregator_of(root).global_blocks)
    bad = [i for i in config.global_to_frame_layers if i >= depth]
    if bad:
        raise ValueError(f"global_to_frame_layers {bad} out of range: this model has {depth} global blocks (0-{depth - 1})")
    wrapper = make_wrapper(frozenset(config.global_to_frame_layers))
    return [Target(aggregator_path(root), "_process_global_attention", wrapper)]


PATCH = Patch(
    name="global_to_frame_layers",
    tier=Tier.APPROXIMATE,
    sequence_parallel=True,
    summary="the listed global layers run as frame attention",
    requirements=AGGREGATOR_LAYOUT
    + (Requirement("Aggregator", "use_reentrant", aggregator_of), GLOBAL_STEP.requirement),
    enabled=lambda c: bool(c.global_to_frame_layers),
    targets=_targets,
)
