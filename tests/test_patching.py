"""apply / revert / describe / optimized: per-instance, atomic, idempotent, revertible, copy- and move-safe."""

from __future__ import annotations

import copy
import dataclasses
import pickle

import pytest
import torch
from torch import nn

from helpers import (
    needs_cuda,
    BOOL_FLAGS,
    NO_FLAGS,
    assert_close,
    assert_equal,
    assert_same_objects,
    assert_unchanged,
    class_dicts,
    errors,
    layer_outputs,
    patched_methods,
    run,
    snapshot,
)

import vggt_turbo
from vggt_turbo import IncompatibleUpstreamError, TurboConfig, describe
from vggt_turbo import patching
from vggt_turbo.patches import ALL_PATCHES, Target, Tier, patch_tiers

EXACT = TurboConfig.preset("exact")
# every exact-tier patch, those off by default included
# Every exact patch installed; offloading "auto" (installed, decides per call): forced on, it excludes concurrent_heads
EVERY_EXACT = TurboConfig(**{f: patch_tiers().get(f, Tier.EXACT) is Tier.EXACT for f in BOOL_FLAGS}).replace(
    offload_intermediates="auto"
)


# --- revert ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["exact", "fast"])
def test_revert_restores_bit_identical_outputs_and_leaves_nothing(model, images, query_points, config) -> None:
    before = snapshot(model)
    expected = run(model, images, query_points)
    vggt_turbo.apply_optimizations(model, config, nvtx=True)
    assert patched_methods(model), "nothing was patched"
    vggt_turbo.revert_optimizations(model)
    assert_unchanged(model, before)
    assert not patched_methods(model)
    assert describe(model).config is None
    assert_equal(run(model, images, query_points), expected)


@pytest.mark.parametrize("config", ["exact", "fast"])
def test_patched_calls_leave_no_trace_in_upstreams_caches(model, images, config) -> None:
    """Upstream's RoPE caches its cos/sin table per (dim, length, device, dtype), computed in the autocast state of
    the first call: a table a patched call left there would be read after revert (issue #17: the reverted model
    then differed from an unpatched twin). The patches keep their tables apart."""
    rope = model.aggregator.rope
    before = dict(rope.frequency_cache)  # what the model's earlier (unpatched) calls left there
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with vggt_turbo.optimized(model, config):
                model(images)
    assert rope.frequency_cache.keys() == before.keys()
    assert all(rope.frequency_cache[k] is before[k] for k in before)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
@pytest.mark.parametrize("bf16_weights", [False, True])
def test_revert_after_patched_calls_matches_an_unpatched_twin(model, images, bf16_weights, device) -> None:
    """Issue #17's sequence: calls of a patched model under autocast, then the same in-place weight edits on it and
    on an unpatched twin, then revert: the reverted model equals the twin bit for bit, in fp32 and under autocast.
    The bug it guards against: a RoPE table that a patched call left in upstream's cache, made in another autocast
    state than upstream's call would make it (CUDA autocast runs upstream's ``einsum`` in bf16; the CPU's does
    not, so only the CUDA case could show the numbers move; ``..._leave_no_trace_...`` checks the cache itself)."""
    model, images = model.to(device), images.to(device)
    twin = copy.deepcopy(model)
    vggt_turbo.apply_optimizations(model, "exact", bf16_weights=bf16_weights)
    for frames in (1, 2):
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
            model(images[:, :frames])
    with torch.no_grad():
        for m in (model, twin):
            m.depth_head.scratch.output_conv2[-1].weight.mul_(1.5)
            m.camera_head.trunk[0].attn.proj.weight.mul_(0.7)
    vggt_turbo.revert_optimizations(model)
    keys = ("pose_enc", "depth", "world_points")
    for autocast in (False, True):
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
            got, expected = model(images), twin(images)
        assert_equal({k: got[k] for k in keys}, {k: expected[k] for k in keys})


def test_revert_on_an_unpatched_model_is_a_no_op(model) -> None:
    before = snapshot(model)
    assert vggt_turbo.revert_optimizations(model) is model
    assert_unchanged(model, before)


def test_no_class_is_mutated_and_other_instances_keep_upstream_behaviour(
    model, pristine, images, query_points, reference
) -> None:
    classes = class_dicts(model)
    vggt_turbo.apply_optimizations(model, "fast", nvtx=True)
    run(model, images, query_points)
    assert class_dicts(model) == classes
    assert not patched_methods(pristine)
    assert describe(pristine).config is None
    assert_equal(run(pristine, images, query_points), reference)


# --- apply: idempotent, replacing, atomic ---------------------------------------------------------------------


def test_apply_twice_is_apply_once(model, images, query_points, reference) -> None:
    vggt_turbo.apply_optimizations(model)
    wrappers, described = patched_methods(model), describe(model)
    out = run(model, images, query_points)
    assert vggt_turbo.apply_optimizations(model, EXACT) is model
    assert_same_objects(patched_methods(model), wrappers)
    assert describe(model) == described
    assert_equal(run(model, images, query_points), out)
    vggt_turbo.revert_optimizations(model)
    assert not patched_methods(model), "the second apply saved the first one's wrappers as originals"


def test_applying_another_config_replaces_the_previous(model, images, query_points, reference) -> None:
    before = snapshot(model)
    vggt_turbo.apply_optimizations(model, "fast", nvtx=True)
    vggt_turbo.apply_optimizations(model, NO_FLAGS.replace(fused_frame_batching=True))
    assert describe(model).config == NO_FLAGS.replace(fused_frame_batching=True)
    assert list(patched_methods(model)) == ["aggregator._process_frame_attention"]
    assert_close(run(model, images, query_points), reference)
    vggt_turbo.revert_optimizations(model)
    assert_unchanged(model, before)


def _broken(patch_name: str, at_install: bool):
    """``ALL_PATCHES`` with the patch ``patch_name`` broken: its ``targets`` raise (planning fails before anything
    is touched) or, ``at_install``, return its real targets plus one on a module that does not exist (installing
    fails after the real ones are set, exercising the rollback)."""
    missing = Target("aggregator.no_such_module", "forward", lambda wrapped, instance, args, kwargs: None)

    def targets(root, config):
        if not at_install:
            raise RuntimeError("boom")
        return original.targets(root, config) + [missing]

    original = next(p for p in ALL_PATCHES if p.name == patch_name)
    return tuple(dataclasses.replace(p, targets=targets) if p is original else p for p in ALL_PATCHES)


@pytest.mark.parametrize("at_install", [False, True], ids=["plan", "install"])
def test_failure_midway_leaves_the_model_unpatched(model, monkeypatch, at_install) -> None:
    monkeypatch.setattr(patching, "ALL_PATCHES", _broken("nvtx", at_install))
    before = snapshot(model)
    with pytest.raises((RuntimeError, AttributeError)):
        vggt_turbo.apply_optimizations(model, "exact", nvtx=True)
    assert_unchanged(model, before)
    assert describe(model).config is None


@pytest.mark.parametrize("at_install", [False, True], ids=["plan", "install"])
def test_failure_midway_keeps_the_previous_config(model, images, query_points, reference, monkeypatch, at_install):
    monkeypatch.setattr(patching, "ALL_PATCHES", _broken("nvtx", at_install))  # only breaks configs with nvtx on
    vggt_turbo.apply_optimizations(model, "fast")
    fast = run(model, images, query_points)
    with pytest.raises((RuntimeError, AttributeError)):
        vggt_turbo.apply_optimizations(model, "exact", nvtx=True)
    assert describe(model).config == TurboConfig.preset("fast")
    assert_equal(run(model, images, query_points), fast)
    monkeypatch.undo()
    vggt_turbo.apply_optimizations(model, "exact")  # replaces "fast" cleanly: its saved state was intact
    assert_close(run(model, images, query_points), reference)
    vggt_turbo.revert_optimizations(model)
    assert not patched_methods(model)


def test_layers_out_of_range_refused_atomically(model, images, query_points, reference) -> None:
    before = snapshot(model)
    with pytest.raises(ValueError, match="out of range"):
        vggt_turbo.apply_optimizations(model, global_to_frame_layers=(0, 24))
    assert_unchanged(model, before)
    vggt_turbo.apply_optimizations(model)
    wrappers = patched_methods(model)
    with pytest.raises(ValueError, match="out of range"):
        vggt_turbo.apply_optimizations(model, "fast", global_to_frame_layers=(99,))
    assert describe(model).config == EXACT
    assert_same_objects(patched_methods(model), wrappers)
    assert_close(run(model, images, query_points), reference)


def test_incompatible_upstream_keeps_the_previous_config(model) -> None:
    vggt_turbo.apply_optimizations(model, NO_FLAGS.replace(sdpa=True))
    before = snapshot(model)

    class RopeWithoutTable(nn.Module):
        def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return tokens

    model.aggregator.rope.__class__ = RopeWithoutTable
    with pytest.raises(IncompatibleUpstreamError, match="_compute_frequency_components"):
        vggt_turbo.apply_optimizations(model, "exact")
    assert_unchanged(model, before)
    assert describe(model).config == NO_FLAGS.replace(sdpa=True)


# --- state_dict, deepcopy, pickle, .to --------------------------------------------------------------------------


@pytest.mark.parametrize("config", ["exact", "fast"])
def test_state_dict_unchanged(model, config) -> None:
    before = model.state_dict()
    vggt_turbo.apply_optimizations(model, config, nvtx=True)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(after[k].data_ptr() == before[k].data_ptr() and torch.equal(after[k], before[k]) for k in before)


def test_deepcopy_is_patched_and_independent(model, images, query_points, reference) -> None:
    vggt_turbo.apply_optimizations(model, EVERY_EXACT)
    twin = copy.deepcopy(model)
    assert describe(twin) == describe(model)
    assert patched_methods(twin).keys() == patched_methods(model).keys()
    frame_step = twin.aggregator.__dict__["_process_frame_attention"]
    assert frame_step.__wrapped__.__self__ is twin.aggregator, "the copy's wrapper calls the original's module"
    assert_equal(run(twin, images, query_points), run(model, images, query_points))

    with torch.no_grad():  # the copy runs its own weights
        twin.aggregator.global_blocks[3].attn.proj.weight.mul_(2)
    changed = run(twin, images, query_points)
    assert max(errors(changed, reference).values()) > 1e-3
    assert_close(run(model, images, query_points), reference)
    vggt_turbo.revert_optimizations(twin)
    assert_equal(run(twin, images, query_points), changed)
    assert not patched_methods(twin)
    assert describe(model).config == EVERY_EXACT and patched_methods(model)

    twin = copy.deepcopy(model)
    vggt_turbo.revert_optimizations(model)
    assert describe(twin).config == EVERY_EXACT
    assert_close(run(twin, images, query_points), reference)


def test_patched_model_refuses_pickling_but_its_state_dict_pickles(model) -> None:
    vggt_turbo.apply_optimizations(model)
    with pytest.raises(TypeError, match="state_dict"):
        pickle.dumps(model)
    restored = pickle.loads(pickle.dumps(model.state_dict()))
    assert restored.keys() == model.state_dict().keys()


def test_survives_to_cpu_and_float64(model, pristine, images, query_points) -> None:
    vggt_turbo.apply_optimizations(model, "exact", nvtx=True)
    patched = patched_methods(model)
    assert model.to("cpu") is model
    model.to(torch.float64)
    assert_same_objects(patched_methods(model), patched)
    assert describe(model).config == EXACT.replace(nvtx=True)
    assert next(model.parameters()).dtype == torch.float64
    upstream64 = copy.deepcopy(pristine).to(torch.float64)
    expected = run(upstream64, images.double(), query_points.double())
    out = run(model, images.double(), query_points.double())
    assert all(v.dtype == torch.float64 for v in out.values())
    assert_close(out, expected, tol=1e-10)


# --- optimized() ------------------------------------------------------------------------------------------------


def test_optimized_restores_the_unpatched_model(model, images, query_points, reference) -> None:
    before = snapshot(model)
    with vggt_turbo.optimized(model, "fast") as inside:
        assert inside is model and describe(model).config == TurboConfig.preset("fast")
    assert_unchanged(model, before)
    with pytest.raises(KeyError), vggt_turbo.optimized(model):
        raise KeyError("raised inside the block")
    assert_unchanged(model, before)
    assert_equal(run(model, images, query_points), reference)


def test_optimized_restores_a_previous_config(model, images, query_points) -> None:
    vggt_turbo.apply_optimizations(model, "fast")
    expected = run(model, images, query_points)
    with vggt_turbo.optimized(model, "exact", nvtx=True):
        assert describe(model).config == EXACT.replace(nvtx=True)
    assert describe(model).config == TurboConfig.preset("fast")
    assert_equal(run(model, images, query_points), expected)


# --- bad input ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "flags", "error"),
    [
        (None, {"turbo": True}, TypeError),
        ("exact", {"sdpa_backend": "x"}, ValueError),
        (None, {"global_to_frame_layers": (-1,)}, ValueError),
        (None, {"global_to_frame_layers": ("a",)}, TypeError),
        (None, {"global_to_frame_layers": (1, 1)}, ValueError),
        (None, {"global_to_frame_layers": (True,)}, TypeError),
        (None, {"global_to_frame_layers": (24,)}, ValueError),
        (None, {"sdpa": 1}, TypeError),
        (None, {"nvtx": "yes"}, TypeError),
        ("turbo", {}, ValueError),
        (42, {}, TypeError),
    ],
)
def test_bad_config_refused_and_nothing_patched(model, config, flags, error) -> None:
    before = snapshot(model)
    with pytest.raises(error):
        vggt_turbo.apply_optimizations(model, config, **flags)
    assert_unchanged(model, before)


@pytest.mark.parametrize("thing", [nn.Linear(2, 2), "model", None, object()])
def test_non_vggt_refused(thing) -> None:
    with pytest.raises(TypeError, match="VGGT or vggt.models.aggregator.Aggregator"):
        vggt_turbo.apply_optimizations(thing)


def test_a_head_is_not_a_model(model) -> None:
    with pytest.raises(TypeError):
        vggt_turbo.apply_optimizations(model.camera_head)


def test_bare_aggregator_can_be_patched(model, images) -> None:
    aggregator = model.aggregator
    with torch.no_grad():
        expected, start = aggregator(images)
        vggt_turbo.apply_optimizations(aggregator, "exact", nvtx=True)
        out, patched_start = aggregator(images)
    assert describe(aggregator).config == EXACT.replace(nvtx=True) and describe(model).config is None
    assert patched_start == start and len(out) == len(expected) == 24
    assert [o is None for o in out] == [e is None for e in expected]
    assert_close(layer_outputs(out), layer_outputs(expected))


def test_aggregator_refused_after_its_vggt(model, images, query_points, reference) -> None:
    vggt_turbo.apply_optimizations(model)
    before = snapshot(model)
    with pytest.raises(ValueError, match="already patched"):
        vggt_turbo.apply_optimizations(model.aggregator)
    assert_unchanged(model, before)
    assert_close(run(model, images, query_points), reference)


def test_aggregator_refused_after_its_vggt_even_with_disjoint_flags(model) -> None:
    """The VGGT's patches and the aggregator's would not overlap here; nesting is still refused."""
    vggt_turbo.apply_optimizations(model)
    before = snapshot(model)
    with pytest.raises(ValueError):
        vggt_turbo.apply_optimizations(model.aggregator, NO_FLAGS.replace(nvtx=True))
    assert_unchanged(model, before)


def test_vggt_refused_after_its_aggregator(model) -> None:
    vggt_turbo.apply_optimizations(model.aggregator)
    before = snapshot(model)
    with pytest.raises(ValueError, match="revert_optimizations"):
        vggt_turbo.apply_optimizations(model)
    assert_unchanged(model, before)
    vggt_turbo.revert_optimizations(model.aggregator)
    vggt_turbo.apply_optimizations(model)
    assert describe(model).config == EXACT


# --- describe -------------------------------------------------------------------------------------------------


def test_describe_unpatched(model) -> None:
    d = describe(model)
    assert d.config is None and d.targets == {} and d.exact
    assert "not applied" in str(d)


def test_describe_reports_config_and_targets(model) -> None:
    vggt_turbo.apply_optimizations(model, EVERY_EXACT)
    d = describe(model)
    assert d.config == EVERY_EXACT and d.exact
    enabled = {p.name for p in ALL_PATCHES if p.enabled(d.config)}
    assert set(d.targets) == enabled
    assert "aggregator._process_frame_attention" in d.targets["fused_frame_batching"]
    assert "aggregator.rope.forward" in d.targets["sync_free_rope"]
    assert len(d.targets["sdpa"]) == 48
    assert "global_to_frame_layers" not in d.targets
    assert "(exact)" in str(d) and "APPROXIMATE" not in str(d) and "sdpa [exact]" in str(d)
    block = d.stacks["aggregator.frame_blocks.0.forward"]  # outermost first, as ALL_PATCHES stacks them
    assert block == ["nvtx", "compile", "fused_layer_scale", "chunked_mlp"]
    assert d.stacks["aggregator.frame_blocks.0.attn.forward"][-1] == "sdpa"  # innermost: the others call it
    assert "  aggregator.frame_blocks.N.forward: " + " > ".join(block) in str(d)
    d.targets.clear()
    assert describe(model).targets, "describe() returned the live state, not a copy"


def test_describe_flags_fast_as_approximate(model) -> None:
    vggt_turbo.apply_optimizations(model, "fast")
    d = describe(model)
    assert not d.exact and d.tier is Tier.APPROXIMATE
    assert d.targets["global_to_frame_layers"] == ["aggregator._process_global_attention"]
    assert "(APPROXIMATE)" in str(d) and "global_to_frame_layers=(0, 1, 2, 3, 4)" in str(d)
    assert "bf16_weights [reduced precision]" in str(d) and "kv_subsample [approximate]" in str(d)


def test_describe_names_reduced_precision(model) -> None:
    vggt_turbo.apply_optimizations(model, "exact", bf16_weights=True)
    d = describe(model)
    assert not d.exact and d.tier is Tier.REDUCED and "(REDUCED PRECISION)" in str(d)
