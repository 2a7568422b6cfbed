"""concurrent_heads: the camera, depth and point heads run on CUDA streams of their own (for calls of at most
``MAX_FRAMES`` frames, inference on CUDA), with outputs equal to upstream's bit for bit; elsewhere, and on the CPU,
upstream's order runs."""

from __future__ import annotations

import pytest
import torch

from helpers import NO_FLAGS, assert_equal, needs_cuda, only, run

import vggt_turbo
from vggt_turbo.patches.heads import concurrent_heads as patch
from vggt_turbo.random_model import random_images



def test_wraps_the_model_and_its_three_heads(model) -> None:
    vggt_turbo.apply_optimizations(model, only("concurrent_heads"))
    assert sorted(vggt_turbo.describe(model).targets["concurrent_heads"]) == [
        "camera_head.forward", "depth_head.forward", "forward", "point_head.forward",
    ]


def test_refused_with_forced_offload_and_not_applied_to_an_aggregator(model) -> None:
    forced = only("concurrent_heads", offload_intermediates=True, cached_positions=True)
    with pytest.raises(ValueError, match="concurrent_heads: does not run with offload_intermediates=True.*concurrent_heads=False"):
        vggt_turbo.apply_optimizations(model, forced)
    assert vggt_turbo.describe(model).config is None
    vggt_turbo.apply_optimizations(model, "exact", offload_intermediates=True, concurrent_heads=False)
    assert patch._targets(model.aggregator, only("concurrent_heads")) == []


def test_frames_of_both_input_shapes() -> None:
    assert patch._frames(torch.empty(2, 3, 3, 14, 14)) == 6
    assert patch._frames(torch.empty(5, 3, 14, 14)) == 5


def test_cpu_runs_upstreams_order(model, images, query_points, reference) -> None:
    vggt_turbo.apply_optimizations(model, only("concurrent_heads"))
    seen = []
    model.depth_head.norm.register_forward_pre_hook(lambda *_: seen.append(patch._FORK.get()))
    assert_equal(run(model, images, query_points), reference)
    assert seen and all(fork is None for fork in seen)  # no fork on the CPU


def _streams_seen(model) -> dict[str, list]:
    """The stream current when each head's first layer runs (forward pre-hooks inside the heads)."""
    seen: dict[str, list] = {"camera_head": [], "depth_head": [], "point_head": []}
    for name, first in (("camera_head", model.camera_head.token_norm), ("depth_head", model.depth_head.norm),
                        ("point_head", model.point_head.norm)):
        first.register_forward_pre_hook(lambda *_, name=name: seen[name].append(torch.cuda.current_stream()))
    return seen


@needs_cuda
def test_gpu_heads_on_their_own_streams_bit_for_bit(model) -> None:
    model = model.cuda()
    images = random_images(patch.MAX_FRAMES).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = run(model, images)  # no query points: the track head is not part of the fork
        vggt_turbo.apply_optimizations(model, NO_FLAGS.replace(concurrent_heads=True))
        seen = _streams_seen(model)
        got = run(model, images)
    assert_equal(got, expected)
    main = torch.cuda.current_stream()
    streams = [s[0] for s in seen.values()]
    assert all(s != main for s in streams) and len(set(streams)) == 3
    # the camera head's chain of small kernels goes first when the GPU is full (lower number: higher priority)
    assert seen["camera_head"][0].priority < seen["depth_head"][0].priority == seen["point_head"][0].priority == 0


@needs_cuda
def test_gpu_long_calls_and_autograd_keep_the_callers_stream(model) -> None:
    model = model.cuda()
    vggt_turbo.apply_optimizations(model, NO_FLAGS.replace(concurrent_heads=True))
    seen = _streams_seen(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        run(model, random_images(patch.MAX_FRAMES + 1).cuda())
        model(random_images(1).cuda())  # autograd on
    main = torch.cuda.current_stream()
    assert all(s == main for streams in seen.values() for s in streams)


@needs_cuda
def test_gpu_inside_a_cuda_graph_bit_for_bit(model) -> None:
    """With cuda_graphs the three heads are parallel branches of the captured graph; replays stay exact."""
    model = model.cuda()
    base = vggt_turbo.TurboConfig(concurrent_heads=False)
    a, b = random_images(1, seed=1).cuda(), random_images(1, seed=2).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        vggt_turbo.apply_optimizations(model, base)
        expected = [run(model, x) for x in (a, b, a)]
        vggt_turbo.apply_optimizations(model, base.replace(concurrent_heads=True))
        got = [run(model, x) for x in (a, b, a)]
    for g, e in zip(got, expected):
        assert_equal(g, e)
