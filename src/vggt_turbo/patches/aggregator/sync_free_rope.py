"""sync_free_rope — replaces ``RotaryPositionEmbedding2D.forward(tokens, positions)`` (and wraps
``Aggregator.forward(images)`` to tell it the patch grid).

Why faster: upstream sizes its cos/sin table with ``int(positions.max()) + 1`` in every call, a device-to-host
synchronisation in each of the 48 attention layers that stalls the CPU until the GPU catches up (the 1-frame
regime is host-bound). The aggregator already knows the largest position: patch positions are the grid indices
plus one (special tokens sit at 0), so the table length is ``max(H, W) // patch_size + 1``. The patched
aggregator publishes that length for the duration of its forward; the patched RoPE uses it and a table made by
upstream's own ``_compute_frequency_components`` (``_rope_table.rope_table``).

The table is computed in fp32 even under autocast. Upstream's ``einsum`` of positions and frequencies runs in
bf16 under CUDA autocast (it is on autocast's lower-precision list), so upstream-autocast's angles are rounded to
bf16 (up to about 0.07 rad at position 37) before their cosines, where upstream in fp32 computes them exactly;
here they are upstream's fp32 values: one rounding fewer than autocast, closer to the fp32 reference
(``precision.md``). The tables are kept apart from upstream's ``frequency_cache``, whose entry for a key is
whatever the first call made (an fp32 call and an autocast call store different tables under the same key): a
table left there by a patched call would be read by the reverted model, which would then no longer match an
unpatched one bit for bit.

Exact: the same table formula, lookups and arithmetic as upstream in fp32, with fewer roundings than
upstream-autocast (bit for bit with upstream outside autocast and on the CPU, where autocast leaves ``einsum`` in
fp32). Called outside its aggregator's forward (no length published), the RoPE falls back to upstream's code,
sync included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import TurboConfig
from ...upstream import AGGREGATOR_FORWARD, ROPE_FORWARD, aggregator_of, members, rope_of
from .._base import Patch, Target, Tier, aggregator_path, join
from .._rope_table import published_table_length, rope_table, table_published


def table_length(aggregator: nn.Module, height: int, width: int) -> int:
    """Upstream's ``int(positions.max()) + 1`` for a ``height`` x ``width`` image, computed on the host."""
    largest = max(height // aggregator.patch_size, width // aggregator.patch_size)  # grid index + 1
    if aggregator.patch_start_idx == 0:  # no special tokens: positions are not shifted by one
        largest -= 1
    return largest + 1


def aggregator_forward(wrapped: Any, aggregator: nn.Module, args: tuple, kwargs: dict) -> Any:
    images = AGGREGATOR_FORWARD.bind(*args, **kwargs)[0]
    with table_published(aggregator.rope, table_length(aggregator, images.shape[-2], images.shape[-1])):
        return wrapped(*args, **kwargs)


def rope_forward(wrapped: Any, rope: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    length = published_table_length(rope)
    if length is None:
        return wrapped(*args, **kwargs)
    tokens, positions = ROPE_FORWARD.bind(*args, **kwargs)
    half = tokens.size(-1) // 2
    cos, sin = rope_table(rope, half, length, tokens.device, tokens.dtype)
    vertical, horizontal = tokens.chunk(2, dim=-1)
    vertical = rope._apply_1d_rope(vertical, positions[..., 0], cos, sin)
    horizontal = rope._apply_1d_rope(horizontal, positions[..., 1], cos, sin)
    return torch.cat((vertical, horizontal), dim=-1)


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    if rope_of(root) is None:  # rope_freq <= 0: no RoPE, nothing to do
        return []
    agg = aggregator_path(root)
    return [Target(agg, "forward", aggregator_forward), Target(join(agg, "rope"), "forward", rope_forward)]


PATCH = Patch(
    name="sync_free_rope",
    tier=Tier.EXACT,
    sequence_parallel=True,
    summary="RoPE without upstream's `int(positions.max())` device-to-host sync in each attention layer",
    requirements=(AGGREGATOR_FORWARD.requirement,)
    + members("Aggregator", aggregator_of, ("patch_size", None), ("patch_start_idx", None))
    + (ROPE_FORWARD.requirement,)
    + members(
        "RotaryPositionEmbedding2D",
        rope_of,
        ("_compute_frequency_components", ("dim", "seq_len", "device", "dtype")),
        ("_apply_1d_rope", ("tokens", "positions", "cos_comp", "sin_comp")),
        ("frequency_cache", None),
    ),
    enabled=lambda c: c.sync_free_rope,
    targets=_targets,
)
