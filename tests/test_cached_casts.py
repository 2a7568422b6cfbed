"""``cached_casts``: autocast's bf16 copies of the aggregator's linear and convolution weights, kept between calls.
Bit for bit with upstream-autocast; rebuilt when a weight changes; out of the way where autocast does not cast."""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import assert_equal, only, run

import vggt_turbo
from vggt_turbo.patches.aggregator import cached_casts

CONFIG = only("cached_casts")


def _shadow(model):
    wrapper = model.aggregator.__dict__["forward"]
    return wrapper._self_wrapper.shadows[model.aggregator]


def test_bit_for_bit_with_upstream_autocast(model, images, query_points) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = run(model, images, query_points)
        vggt_turbo.apply_optimizations(model, CONFIG)
        got = run(model, images, query_points)
        again = run(model, images, query_points)  # from the kept copies
    assert_equal(got, expected)
    assert_equal(again, expected)


def test_copies_only_the_matmul_weights_and_keeps_them_between_calls(model, images) -> None:
    vggt_turbo.apply_optimizations(model, CONFIG)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images)
        first = [c.data_ptr() for c in _shadow(model)._copies]
        model(images)
    shadow = _shadow(model)
    expected = list(cached_casts.matmul_parameters(model.aggregator))
    assert [id(p) for p in shadow._params] == [id(p) for p in expected] and expected
    assert all(c.dtype == torch.bfloat16 for c in shadow._copies)
    assert [c.data_ptr() for c in shadow._copies] == first, "copies were remade without a weight change"
    assert all(p.dtype == torch.float32 for p in model.parameters()), "a weight was left swapped"
    names = {n.rsplit(".", 2)[-2] for n, p in model.aggregator.named_parameters() if any(p is q for q in expected)}
    assert "norm1" not in names and "ls1" not in names


def test_an_in_place_edit_rebuilds_the_copies(model, images) -> None:
    twin = copy.deepcopy(model)
    vggt_turbo.apply_optimizations(model, CONFIG)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images)
        for m in (model, twin):
            m.aggregator.frame_blocks[3].mlp.fc1.weight.mul_(1.5)
        got, expected = model(images), twin(images)
    assert_equal({k: got[k] for k in ("pose_enc", "depth")}, {k: expected[k] for k in ("pose_enc", "depth")})


@pytest.mark.parametrize("case", ["fp32", "grad", "train"])
def test_upstream_runs_where_autocast_does_not_cast(model, images, case) -> None:
    vggt_turbo.apply_optimizations(model, CONFIG)
    if case == "train":
        model.train()
    with torch.set_grad_enabled(case == "grad"), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case != "fp32"):
        model(images)
    assert model.aggregator not in model.aggregator.__dict__["forward"]._self_wrapper.shadows


def test_is_not_used_under_bf16_weights(model, images) -> None:
    """bf16_weights turns autocast off inside the aggregator and swaps in copies of its own."""
    vggt_turbo.apply_optimizations(model, only("bf16_weights", cached_casts=True))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model(images)
    wrappers = model.aggregator.__dict__["forward"]
    while not hasattr(wrappers._self_wrapper, "shadows"):
        wrappers = wrappers.__wrapped__
    assert model.aggregator not in wrappers._self_wrapper.shadows
