"""``bf16_weights``: under bf16 autocast the aggregator runs natively in bf16 from a bf16 copy of its weights; the
heads get fp32 inputs; outside bf16 autocast nothing changes.

The CPU has bf16 autocast too, so the whole mechanism (copies, swap, patch-embed cast, head upcasts, chunked DPT
heads, the track head's feature extractor) runs here. Its outputs cannot equal upstream-autocast bit for bit (more
places round to bf16), so they are checked against fp32: as close to it as upstream-autocast is, within a factor.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import assert_equal, errors, only, run

import vggt_turbo
from vggt_turbo.random_model import build_vggt, random_images

CONFIG = only("bf16_weights")


def bf16(model: nn.Module, images: torch.Tensor, query_points: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return run(model, images, query_points)


def assert_bf16_close(out: dict, upstream_bf16: dict, fp32: dict) -> None:
    """Each output as close to fp32 as upstream's autocast run is (3x, floor 2e-2), and close to upstream's."""
    ours, theirs = errors(out, fp32), errors(upstream_bf16, fp32)
    assert all(torch.isfinite(v).all() for v in out.values())
    too_far = {k: (ours[k], theirs[k]) for k in fp32 if not ours[k] <= max(2e-2, 3 * theirs[k])}
    assert not too_far, f"(ours, upstream-autocast) relative errors vs fp32: {too_far}"
    assert max(errors(out, upstream_bf16).values()) < 5e-2


@pytest.fixture(scope="module")
def expected(pristine, images, query_points) -> tuple[dict, dict]:
    """Upstream's predictions in fp32 and under CPU bf16 autocast."""
    return run(pristine, images, query_points), bf16(pristine, images, query_points)


def test_bf16_autocast_stays_close_to_upstream(model, images, query_points, expected) -> None:
    fp32, upstream_bf16 = expected
    vggt_turbo.apply_optimizations(model, CONFIG)
    assert_bf16_close(bf16(model, images, query_points), upstream_bf16, fp32)


def test_the_aggregator_really_runs_in_bf16_and_heads_in_fp32(model, images, query_points) -> None:
    vggt_turbo.apply_optimizations(model, CONFIG)
    seen: dict[str, torch.dtype] = {}

    def record(name: str, dtype_of):
        def hook(module, args, output) -> None:
            seen.setdefault(name, dtype_of(module, args, output))

        return hook

    agg = model.aggregator
    hooks = [
        agg.global_blocks[3].register_forward_hook(record("block", lambda m, a, o: o.dtype)),
        agg.global_blocks[3].mlp.fc1.register_forward_hook(record("weight", lambda m, a, o: m.weight.dtype)),
        model.depth_head.projects[0].register_forward_hook(record("head_in", lambda m, a, o: a[0].dtype)),
        model.camera_head.token_norm.register_forward_hook(record("camera_in", lambda m, a, o: a[0].dtype)),
    ]
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            tokens, _ = model.aggregator(images)
            model(images, query_points=query_points)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"block": torch.bfloat16, "weight": torch.bfloat16, "head_in": torch.float32, "camera_in": torch.float32}
    assert {t.dtype for t in tokens if t is not None} == {torch.bfloat16}  # stored at half upstream's size


def test_parameters_are_fp32_and_unchanged_after_a_call(model, images, query_points) -> None:
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = dict(model.named_parameters())
    vggt_turbo.apply_optimizations(model, CONFIG)
    bf16(model, images, query_points)
    assert dict(model.named_parameters()) == params  # the very same Parameter objects
    after = model.state_dict()
    assert all(after[k].dtype == v.dtype and torch.equal(after[k], v) for k, v in before.items())


def test_without_bf16_autocast_nothing_changes(model, images, query_points, reference) -> None:
    vggt_turbo.apply_optimizations(model, CONFIG)
    assert_equal(run(model, images, query_points), reference)  # fp32: bit-identical
    with torch.autocast("cpu", dtype=torch.float16):  # fp16 autocast: upstream's path
        upstream_fp16 = run(copy.deepcopy(model), images, query_points)
        vggt_turbo.revert_optimizations(model)
        assert_equal(upstream_fp16, run(model, images, query_points))


def test_autograd_on_runs_upstream(model, pristine, images) -> None:
    vggt_turbo.apply_optimizations(model, CONFIG)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = model(images)["depth"]
        theirs = pristine(images)["depth"]
    assert ours.requires_grad and torch.equal(ours, theirs)


def test_weights_changed_in_place_are_used_next_call(model, pristine, images, query_points) -> None:
    """The aggregator's weights reloaded in place (same storage): a stale bf16 copy would give ``first`` again."""
    vggt_turbo.apply_optimizations(model, CONFIG)
    first = bf16(model, images, query_points)
    new_weights = build_vggt("small", seed=1).aggregator.state_dict()
    model.aggregator.load_state_dict(new_weights)
    other = copy.deepcopy(pristine)
    other.aggregator.load_state_dict(new_weights)
    ours, theirs = bf16(model, images, query_points), bf16(other, images, query_points)
    assert_bf16_close(ours, theirs, run(other, images, query_points))
    moved, noise = errors(ours, first), errors(ours, theirs)
    assert moved["pose_enc"] > 10 * noise["pose_enc"] and moved["depth"] > 3 * noise["depth"], (moved, noise)


def test_an_error_inside_restores_the_fp32_weights(model) -> None:
    vggt_turbo.apply_optimizations(model, CONFIG)
    with pytest.raises(ValueError, match="3 input channels"), torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.rand(1, 2, 4, 56, 56))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_chunked_dpt_heads_and_aggregator_alone(model, pristine, query_points) -> None:
    """Nine frames: the DPT heads run in chunks of 8 frames, each chunk upcast on its own. An Aggregator patched
    alone returns fp32 intermediates, as upstream's."""
    images = random_images(9, seed=3)
    fp32 = run(pristine, images, query_points)
    vggt_turbo.apply_optimizations(model, CONFIG)
    assert_bf16_close(bf16(model, images, query_points), bf16(pristine, images, query_points), fp32)

    aggregator = copy.deepcopy(pristine.aggregator)
    vggt_turbo.apply_optimizations(aggregator, CONFIG)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _ = aggregator(images)
        theirs, _ = pristine.aggregator(images)
    kept = [i for i, t in enumerate(theirs) if t is not None]
    assert [i for i, t in enumerate(ours) if t is not None] == kept
    assert all(ours[i].dtype == torch.float32 for i in kept)
    assert max(errors({"t": ours[i]}, {"t": theirs[i]})["t"] for i in kept) < 5e-2


def test_revert_drops_the_bf16_copies(model, images, query_points, reference) -> None:
    vggt_turbo.apply_optimizations(model, CONFIG)
    bf16(model, images, query_points)
    vggt_turbo.revert_optimizations(model)
    assert_equal(run(model, images, query_points), reference)
    assert "forward" not in vars(model.aggregator)
