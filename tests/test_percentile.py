"""The export's confidence thresholds (``app.percentile``) are numpy's percentile in float64, on either path."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from helpers import needs_cuda
from vggt_turbo.app import percentile as module
from vggt_turbo.app.percentile import at_least, percentile


def cases(seed: int, count: int) -> list[tuple[np.ndarray, float]]:
    """Random arrays of the kinds a confidence map can be and worse: ties, sorted runs, infinities, a NaN, one
    value; with the percentiles at both ends, the median, a repeating fraction and random ones."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        n = int(rng.integers(1, 2000))
        kind = i % 6
        if kind == 0:
            x = rng.standard_normal(n).astype(np.float32)
        elif kind == 1:
            x = rng.integers(0, 5, n).astype(np.float32)  # many ties
        elif kind == 2:
            x = np.sort(rng.random(n)).astype(np.float32)
        elif kind == 3:
            x = rng.standard_normal(n).astype(np.float32)
            x[rng.integers(0, n, 3)], x[rng.integers(0, n, 2)] = np.inf, -np.inf
        elif kind == 4:
            x = np.full(n, 2.5, np.float32)
        else:
            x = rng.standard_normal(n).astype(np.float32)
            x[rng.integers(0, n)] = np.nan
        out.append((x, float(rng.choice([0.0, 100.0, 50.0, 100 / 3, rng.random() * 100]))))
    return out


def numpys(x: np.ndarray, q: float) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # inf - inf in numpy's interpolation: NaN, as ours
        return float(np.percentile(x.astype(np.float64), q))


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


@pytest.mark.parametrize("path", ["numpy", "torch"])
def test_equals_numpys_percentile_in_float64(monkeypatch: pytest.MonkeyPatch, path: str) -> None:
    """Bit for bit with np.percentile on the float64 values, through the CPU's (numpy) selection and through the
    GPU's (torch) selection run on the CPU."""
    if path == "torch":
        monkeypatch.setattr(module, "_neighbours_numpy", module._neighbours_torch)
    wrong = [(len(x), q) for x, q in cases(0, 600) if not same(percentile(torch.from_numpy(x), q), numpys(x, q))]
    assert not wrong


@pytest.mark.parametrize("kind", ["exponential", "ties", "infinities"])
def test_the_gpus_bracket_on_millions_of_values(kind: str) -> None:
    """Past ``SAMPLE`` values the torch path brackets the ranks with a sample and sorts only what is inside."""
    rng = np.random.default_rng(3)
    n = 3 * module.SAMPLE + 12345
    x = {"exponential": lambda: 1 + rng.exponential(2.0, n), "ties": lambda: rng.integers(0, 7, n) / 4,
         "infinities": lambda: np.where(rng.random(n) < 0.3, np.inf, rng.standard_normal(n))}[kind]()
    values = torch.from_numpy(x.astype(np.float32))
    for q in (0.0, 0.5, 37.5, 50.0, 99.99, 100.0):
        rank = min(math.floor((n - 1) * q / 100), n - 1)
        assert module._neighbours_torch(values, rank) == module._neighbours_numpy(values, rank), q


def test_a_bracket_that_misses_sorts_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    """A strided sample unlike the whole (every 100th value huge): the bracket misses, the answer is still right."""
    monkeypatch.setattr(module, "SAMPLE", 100)
    monkeypatch.setattr(module, "MARGIN", 2)
    x = np.random.default_rng(4).random(10_000).astype(np.float32)
    x[::100] = 1000 + np.arange(100)
    sorts = []
    original = torch.sort
    monkeypatch.setattr(torch, "sort", lambda t, *a, **k: sorts.append(t.numel()) or original(t, *a, **k))
    assert module._neighbours_torch(torch.from_numpy(x), 5000) == module._neighbours_numpy(torch.from_numpy(x), 5000)
    assert sorts[-1] == len(x)  # the fallback ran


def test_a_confidence_map_and_its_shape() -> None:
    conf = 1 + np.random.default_rng(1).exponential(2.0, (3, 40, 50)).astype(np.float32)
    for q in (0.0, 12.5, 50.0, 99.9, 100.0):
        assert percentile(torch.from_numpy(conf), q) == numpys(conf, q)


def test_no_values_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile(torch.empty(0), 50.0)


def test_at_least_compares_as_the_real_threshold() -> None:
    """A float32 array compared with a float64 threshold between two of its values keeps exactly the values
    above it (numpy alone would round the threshold to float32 first, maybe down onto the lower value)."""
    lower = np.float32(2.0)
    upper = np.nextafter(lower, np.float32(3.0))
    threshold = (float(lower) + float(upper)) / 2 - 1e-12  # rounds to `lower` in float32
    values = np.array([lower, upper], np.float32)
    assert (values >= threshold).tolist() == [True, True]  # the trap
    assert (values >= at_least(threshold, values.dtype)).tolist() == [False, True]
    assert at_least(float(lower), values.dtype) == lower  # a representable threshold stays as it is
    assert (values >= at_least(math.inf, values.dtype)).tolist() == [False, False]


@needs_cuda
def test_on_the_gpu_the_same_number() -> None:
    for x, q in cases(2, 200):
        assert same(percentile(torch.from_numpy(x).cuda(), q), numpys(x, q)), (len(x), q)
    conf = 1 + torch.rand(28, 392, 518, device="cuda") * 3
    assert percentile(conf, 50.0) == numpys(conf.cpu().numpy(), 50.0)
