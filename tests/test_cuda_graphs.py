"""cuda_graphs: eager fallback with a logged reason on CPU, and on a GPU replay that equals eager execution,
never returns stale or aliased outputs, and recaptures when shapes or parameters change."""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import needs_cuda

import vggt_turbo
from vggt_turbo.patches.runtime import cuda_graphs
from vggt_turbo.random_model import build_vggt, random_images

OUTPUTS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_needs_its_prerequisites(model):
    """Refused at apply time, before anything is touched, with the call that works."""
    with pytest.raises(ValueError, match=r"needs \['sync_free_rope'\].*cuda_graphs=False.*fused_qk_norm_rope=False"):
        vggt_turbo.apply_optimizations(model, sync_free_rope=False)
    with pytest.raises(ValueError, match="cached_positions"):
        vggt_turbo.apply_optimizations(model, cached_positions=False)
    assert vggt_turbo.describe(model).config is None
    vggt_turbo.apply_optimizations(model, cuda_graphs=False, fused_qk_norm_rope=False, sync_free_rope=False)
    assert "cuda_graphs" not in vggt_turbo.describe(model).targets


@pytest.mark.parametrize("bad", [0, -3])
def test_max_frames_validated(bad):
    with pytest.raises(ValueError):
        vggt_turbo.TurboConfig(cuda_graph_max_frames=bad)
    with pytest.raises(TypeError):
        vggt_turbo.TurboConfig(cuda_graph_max_frames=2.0)


def test_storage_signature_sees_every_change_the_graph_could_miss():
    """The per-call signature (a flat walk, not ``parameters()``) must change with what would make a replay stale."""
    model = build_vggt("small", enable_track=False)
    sign = cuda_graphs.storage_signature
    first = sign(model)
    assert sign(model) == first  # stable between calls
    weight = model.depth_head.scratch.output_conv2[0].weight
    with torch.no_grad():
        weight.add_(0)  # in place: the version counter moves
    assert sign(model) != first
    second = sign(model)
    weight.data = weight.data.clone()  # moved: a new address, same Parameter
    assert sign(model) != second
    third = sign(model)
    model.camera_head.trunk[0].norm1 = torch.nn.LayerNorm(model.camera_head.trunk[0].norm1.normalized_shape)
    assert sign(model) != third  # a module replaced
    fourth = sign(model)
    model.camera_head.shared = model.camera_head.trunk  # a module reached twice is read once
    model.camera_head.itself = model.camera_head  # and a cycle ends
    assert sign(model) == fourth


def test_storage_signature_of_inference_tensors():
    with torch.inference_mode():
        model = build_vggt("small", enable_track=False)
    assert cuda_graphs.storage_signature(model) == cuda_graphs.storage_signature(model)


def test_cpu_runs_eagerly_and_says_why_once(caplog):
    model = build_vggt("small", enable_track=False)
    images = random_images(2)
    with torch.no_grad():
        ref = model(images)
        vggt_turbo.apply_optimizations(model)
        with caplog.at_level(logging.INFO, logger=cuda_graphs.__name__):
            out = model(images)
            model(images)
    reasons = [r.getMessage() for r in caplog.records if "running eagerly" in r.getMessage()]
    assert reasons == ["vggt_turbo cuda_graphs: running eagerly: input is not on a CUDA device"]
    for k in OUTPUTS:
        assert torch.equal(out[k], ref[k]), k


def _cuda_model(max_frames: int = 8):
    model = build_vggt("small", enable_track=False).cuda()
    return model, vggt_turbo.TurboConfig(cuda_graph_max_frames=max_frames)


def _run(model, images):
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        return model(images)


@needs_cuda
def test_replay_equals_eager_and_is_fresh_each_call():
    model, cfg = _cuda_model()
    a, b = random_images(3, seed=1).cuda(), random_images(3, seed=2).cuda()
    vggt_turbo.apply_optimizations(model, cfg.replace(cuda_graphs=False))
    eager_a, eager_b = _run(model, a), _run(model, b)
    vggt_turbo.apply_optimizations(model, cfg)
    graph_a = _run(model, a)  # captures
    graph_b = _run(model, b)  # replays with new inputs
    graph_a2 = _run(model, a)
    for k in OUTPUTS:
        assert rel(graph_a[k], eager_a[k]) < 1e-6, k
        assert rel(graph_b[k], eager_b[k]) < 1e-6, k
        assert rel(graph_a2[k], eager_a[k]) < 1e-6, k
        assert graph_a[k].data_ptr() != graph_a2[k].data_ptr(), "outputs must not alias the graph's buffers"
    assert graph_b["images"].data_ptr() == b.data_ptr()  # upstream returns the caller's images
    entries = cuda_graphs.graph_cache(model).entries
    assert len(entries) == 1 and next(iter(entries.values())).graph is not None


@needs_cuda
def test_new_shapes_recapture_within_the_bound_and_long_runs_stay_eager():
    model, cfg = _cuda_model(max_frames=4)
    vggt_turbo.apply_optimizations(model, cfg)
    for frames in (1, 2, 3):
        images = random_images(frames, seed=frames).cuda()
        out = _run(model, images)
        vggt_turbo.revert_optimizations(model)
        ref = _run(model, images)
        vggt_turbo.apply_optimizations(model, cfg)
        assert rel(out["depth"], ref["depth"]) < 2e-2
    # the cache was dropped by revert; fill it past its bound
    for frames in (1, 2, 3):
        _run(model, random_images(frames).cuda())
    assert len(cuda_graphs.graph_cache(model).entries) == cuda_graphs.MAX_GRAPHS
    _run(model, random_images(5).cuda())  # > max frames: eager, nothing captured
    assert all(k[0][1] != 5 for k in cuda_graphs.graph_cache(model).entries)


@needs_cuda
def test_parameters_replaced_or_reloaded_are_seen():
    model, cfg = _cuda_model()
    images = random_images(2).cuda()
    vggt_turbo.apply_optimizations(model, cfg)
    first = _run(model, images)
    state = {k: v * 1.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    model.load_state_dict(state)  # in place: the next replay must see it
    reloaded = _run(model, images)
    vggt_turbo.revert_optimizations(model)
    expected = _run(model, images)
    assert rel(reloaded["depth"], expected["depth"]) < 2e-2
    assert rel(reloaded["depth"], first["depth"]) > 1e-3
    vggt_turbo.apply_optimizations(model, cfg)
    _run(model, images)
    model.to(torch.float64).to(torch.float32)  # new storage: must recapture, not replay on freed memory
    moved = _run(model, images)
    assert rel(moved["depth"], expected["depth"]) < 2e-2


@needs_cuda
def test_replay_runs_before_the_storage_check(monkeypatch):
    """The check's host time overlaps the replay: a call launches the replay, then checks."""
    model, cfg = _cuda_model()
    images = random_images(1).cuda()
    vggt_turbo.apply_optimizations(model, cfg)
    _run(model, images)  # captures
    order = []
    entry = next(iter(cuda_graphs.graph_cache(model).entries.values()))

    class Logged:
        def replay(self, graph=entry.graph):
            order.append("replay")
            graph.replay()

    entry.graph = Logged()
    real = cuda_graphs.storage_signature
    monkeypatch.setattr(cuda_graphs, "storage_signature", lambda m: order.append("check") or real(m))
    _run(model, images)
    assert order == ["replay", "check"]


@needs_cuda
def test_a_parameter_change_drops_every_graph_and_the_stale_replay():
    model, cfg = _cuda_model()
    one, two = random_images(1, seed=1).cuda(), random_images(2, seed=2).cuda()
    vggt_turbo.apply_optimizations(model, cfg)
    _run(model, one), _run(model, two)
    cache = cuda_graphs.graph_cache(model)
    assert len(cache.entries) == 2
    weight = model.depth_head.scratch.output_conv2[0].weight
    old = next(iter(cache.entries.values())).held
    assert any(t.data_ptr() == weight.data_ptr() for t in old)  # the graph holds the storage it reads
    with torch.no_grad():
        weight.mul_(3)
    got = _run(model, one)  # replays (stale), sees the change, drops both graphs, captures anew
    assert [k[0] for k in cache.entries] == [tuple(one.shape)]
    vggt_turbo.revert_optimizations(model)
    expected = _run(model, one)
    assert rel(got["depth"], expected["depth"]) < 2e-2


@needs_cuda
def test_inference_mode_and_no_grad_get_their_own_graphs():
    model, cfg = _cuda_model()
    images = random_images(2).cuda()
    vggt_turbo.apply_optimizations(model, cfg)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        first = model(images)
    second = _run(model, images)  # no_grad: must not copy into the inference-mode graph's buffers
    assert rel(second["depth"], first["depth"]) < 1e-6
    assert len(cuda_graphs.graph_cache(model).entries) == 2


@needs_cuda
def test_grad_mode_runs_eagerly():
    model, cfg = _cuda_model()
    vggt_turbo.apply_optimizations(model, cfg)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(random_images(1).cuda())
    assert out["depth"].requires_grad
    assert not cuda_graphs.graph_cache(model).entries
    assert cuda_graphs.graph_cache(model).reported == {"autograd is enabled (call under torch.no_grad() or torch.inference_mode())"}
