"""``offload_intermediates``: the kept layer outputs go to host memory as they are made and the heads fetch their
chunks back; outputs unchanged. The CPU run swaps the pinned copy for a plain one (there is no pinned memory
without CUDA) to exercise the wiring; the GPU test runs the real transfers."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import NO_FLAGS, assert_close, assert_equal, count_calls, needs_cuda, only, run

import vggt_turbo
from vggt_turbo import TurboConfig
from vggt_turbo.patches import _head_inputs
from vggt_turbo.patches.runtime import offload_intermediates
from vggt_turbo.random_model import random_images



def test_kept_layers_are_stored_as_made_and_outputs_unchanged(model, images, query_points, reference, monkeypatch):
    stored = []

    def fake_host(t: torch.Tensor, side: object = None) -> torch.Tensor:
        stored.append(t.shape)
        return t.clone()

    monkeypatch.setattr(offload_intermediates, "applies", lambda agg, images: True)
    monkeypatch.setattr(offload_intermediates, "to_host", fake_host)
    vggt_turbo.apply_optimizations(model, only("offload_intermediates"))
    assert_equal(run(model, images, query_points), reference)
    kept = len(getattr(model.aggregator, "cached_layer_indices", range(24)))
    assert len(stored) == kept and all(s == (1, 2, 21, 128) for s in stored)


def test_off_the_gpu_nothing_moves_and_an_aggregator_alone_is_untouched(model, images, query_points, reference):
    vggt_turbo.apply_optimizations(model, only("offload_intermediates"))
    assert_equal(run(model, images, query_points), reference)
    vggt_turbo.revert_optimizations(model)
    aggregator = copy.deepcopy(model.aggregator)
    vggt_turbo.apply_optimizations(aggregator, only("offload_intermediates"))
    assert vggt_turbo.describe(aggregator).targets["offload_intermediates"] == []


AUTO = NO_FLAGS.replace(offload_intermediates="auto", cached_positions=True)


@pytest.fixture
def host_copies(monkeypatch) -> list:
    """Make the patch apply on the CPU (as above); the list records the shape of every tensor sent to the host."""
    stored: list = []

    def fake_host(t: torch.Tensor, side: object = None) -> torch.Tensor:
        stored.append(t.shape)
        return t.clone()

    monkeypatch.setattr(offload_intermediates, "applies", lambda agg, images: True)
    monkeypatch.setattr(offload_intermediates, "to_host", fake_host)
    return stored


def test_auto_is_the_default_and_short_sequences_move_nothing(model, images, query_points, reference, host_copies):
    assert TurboConfig().offload_intermediates == "auto" and offload_intermediates.OFFLOAD_AUTO_FRAMES == 32
    vggt_turbo.apply_optimizations(model, AUTO)
    assert vggt_turbo.describe(model).targets["offload_intermediates"]  # applied: it decides per call
    assert_equal(run(model, images, query_points), reference)
    assert host_copies == []


@pytest.mark.parametrize("batch", [1, 2])
def test_auto_from_the_threshold_on_offloads_like_true(model, pristine, host_copies, monkeypatch, batch: int):
    """4 frames in all (B*S): offloaded at a threshold of 4, as ``True`` does; not at 5."""
    images = random_images(4 // batch, batch=batch, seed=7)
    expected = run(pristine, images)
    monkeypatch.setattr(offload_intermediates, "OFFLOAD_AUTO_FRAMES", 5)
    vggt_turbo.apply_optimizations(model, AUTO)
    assert_equal(run(model, images), expected)
    assert host_copies == []
    monkeypatch.setattr(offload_intermediates, "OFFLOAD_AUTO_FRAMES", 4)
    assert_equal(run(model, images), expected)
    auto = list(host_copies)
    host_copies.clear()
    vggt_turbo.apply_optimizations(model, only("offload_intermediates"))
    assert_equal(run(model, images), expected)
    kept = len(getattr(model.aggregator, "cached_layer_indices", range(24)))
    assert auto == host_copies and len(auto) == kept and auto[0] == (batch, 4 // batch, 21, 128)


def test_auto_applies_under_sequence_parallel_and_stands_aside_for_an_aggregator_alone(model, caplog):
    enabled = offload_intermediates.PATCH.enabled
    assert enabled(TurboConfig()) and enabled(TurboConfig(offload_intermediates=True))
    assert not enabled(TurboConfig(offload_intermediates=False))
    assert enabled(TurboConfig(sequence_parallel=True))  # each rank's own frames (tests/test_sequence_parallel.py)
    with caplog.at_level("INFO", logger=offload_intermediates.__name__):
        vggt_turbo.apply_optimizations(model.aggregator, AUTO)
    assert vggt_turbo.describe(model.aggregator).targets["offload_intermediates"] == []
    assert not [r for r in caplog.records if r.name == offload_intermediates.__name__]  # "auto": nothing to say


@needs_cuda
def test_on_the_gpu_outputs_are_bit_identical_and_memory_drops(model, monkeypatch):
    """The GPU memory held when the aggregator returns (what the heads start from) drops by the kept layers' size:
    they are on the host. (Not the call's peak: at a size this test can afford, the DPT heads' full-resolution
    convolutions set it.) Also: the second chunk of each DPT head arrives through the prefetch (fetched directly:
    first chunks only)."""
    model = model.cuda()
    images = random_images(9, 112, seed=4).cuda()  # 9 frames: the DPT heads fetch two chunks
    seen, held = [], []

    def after_aggregator(module, args, out) -> None:
        seen.append({t.device.type for t in out[0] if t is not None})
        held.append(torch.cuda.memory_allocated())

    model.aggregator.register_forward_hook(after_aggregator)

    def call() -> tuple[dict, int]:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = run(model, images)
        return out, held[-1] - base

    vggt_turbo.apply_optimizations(model, "exact", cuda_graphs=False)
    call()
    expected, on_gpu = call()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        kept_bytes = sum(t.nbytes for t in model.aggregator(images)[0] if t is not None)
    vggt_turbo.apply_optimizations(model, "exact", cuda_graphs=False, offload_intermediates=True, concurrent_heads=False)
    fetches = count_calls(monkeypatch, _head_inputs, "_fetch")
    call()
    out, offloaded = call()
    assert_close(out, expected, tol=1e-6)
    assert fetches[0] == 2 * 2  # two calls x (depth, point) heads: the first chunk; the second was prefetched
    assert seen[-1] == {"cpu"} and seen[0] == {"cuda"}
    assert kept_bytes > 0 and on_gpu - offloaded >= kept_bytes, (on_gpu, offloaded, kept_bytes)


def test_a_prefetch_is_taken_only_by_the_call_that_asks_for_its_frames() -> None:
    """Another chunk, or other layers, find nothing (and empty the slot): they fetch as without prefetching."""
    slot = _head_inputs._Prefetched()
    slot.put(((1, 2), (8, 16)), [torch.zeros(1)], done=None)
    assert slot.take(((1, 2), (16, 24))) is None
    assert slot.take(((1, 2), (8, 16))) is None  # emptied by the previous take
