"""The confidence thresholds of the export: numpy's default percentile, computed where the values are.

``reconstruct`` keeps the points whose confidence is at least the ``--conf-percentile``-th percentile of all, for
points.ply (``world_points_conf``) and for the COLMAP model (``depth_conf``). ``np.percentile`` over millions of
values was most of what the export's first step (the confident points, which the preview waits for) spent on the
host; the GPU finds the two order statistics it needs in a fraction of that, before the predictions are copied
back (benchmarks/RESULTS.md).

The number is numpy's: ``np.percentile(values.astype(np.float64), q)`` (method "linear"), the same index
arithmetic and interpolation in float64 from the same two order statistics (which are values of the array, so
where they are found does not change them). Tested against numpy on the CPU and on the GPU.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SAMPLE = 1 << 20  # values sampled (every k-th) to bracket the two ranks on the GPU
MARGIN = 1 << 13  # sample positions each side of the estimated rank: the bracket holds about 1.6 % of the values


def percentile(values: torch.Tensor, q: float) -> float:
    """``float(np.percentile(values.double().numpy(), q))`` for ``q`` in [0, 100], computed on ``values``' device."""
    flat = values.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("percentile of no values")
    virtual = (n - 1) * (q / 100.0)
    below = math.floor(virtual)
    neighbours = _neighbours_numpy if flat.device.type == "cpu" else _neighbours_torch
    # q = 100 (or a single value): numpy takes the largest for both
    found = neighbours(flat, n - 1 if virtual >= n - 1 else below)
    if found is None:
        return math.nan  # numpy's answer when a value is NaN (NaN sorts last, and interpolates to NaN)
    a, b = found
    gamma = virtual - below
    diff = b - a
    return b - diff * (1.0 - gamma) if gamma >= 0.5 else a + diff * gamma  # numpy's _lerp, in float64


def at_least(threshold: float, dtype: np.dtype) -> np.generic:
    """The smallest value of the float ``dtype`` that is at least ``threshold``: values of that dtype compare
    with it as with the threshold itself (numpy would round a Python float to the array's dtype, to the nearest,
    and a float32 array would then keep values just below a float64 threshold)."""
    kind = np.dtype(dtype).type
    value = kind(threshold)
    return np.nextafter(value, kind(np.inf)) if float(value) < threshold else value


def _neighbours_torch(flat: torch.Tensor, rank: int) -> tuple[float, float] | None:
    """The values of rank ``rank`` and ``rank + 1`` (from 0, ascending; the last twice), None if any is NaN.

    For the GPU, where torch's selection of one long row runs on a single block: a sorted strided sample
    brackets the two ranks, one pass counts the values below the bracket and gathers those inside it (a few
    percent), and those are sorted. A bracket that misses (a sample unlike the whole) means sorting everything.
    """
    if math.isnan(float(flat.max())):  # max propagates NaN
        return None
    n = flat.numel()
    sample = torch.sort(flat[:: max(n // SAMPLE, 1)]).values
    at = rank * len(sample) // n  # the rank's estimated position in the sample
    low = sample[at - MARGIN] if at >= MARGIN else -math.inf  # beyond the sample's ends, no bound on that side
    high = sample[at + 1 + MARGIN] if at + 1 + MARGIN < len(sample) else math.inf
    below = int((flat < low).sum())
    inside = torch.sort(flat[(flat >= low) & (flat <= high)]).values
    last = min(rank + 1, n - 1)
    if not (below <= rank and last - below < len(inside)):  # the bracket missed a rank
        below, inside = 0, torch.sort(flat).values
    return float(inside[rank - below]), float(inside[last - below])


def _neighbours_numpy(flat: torch.Tensor, rank: int) -> tuple[float, float] | None:
    """As ``_neighbours_torch``, for a CPU tensor, with numpy's selection."""
    values = flat.numpy()
    if np.isnan(values).any():
        return None
    kth = [rank, rank + 1] if rank + 1 < len(values) else [rank]
    part = np.partition(values, kth)
    return float(part[rank]), float(part[kth[-1]])
