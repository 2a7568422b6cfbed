"""dpt_channels_last_weights: the DPT heads' k x k convolution weights kept in channels-last copies between calls,
swapped in for each head's forward: bit for bit (the convolutions would convert them to that layout themselves),
rebuilt when a weight changes, upstream's weights untouched outside the call; needs dpt_channels_last."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import assert_equal, needs_cuda, run

import vggt_turbo
from vggt_turbo.patches.heads.dpt_channels_last_weights import spatial_weights
from vggt_turbo.random_model import random_images


def _exact(model: nn.Module, **flags: bool) -> nn.Module:
    vggt_turbo.apply_optimizations(model, "exact", camera_head_matmul=False, **flags)  # its own rounding: off here
    return model


def _layouts_seen(model: nn.Module) -> list[bool]:
    """Whether each k x k convolution of the depth head found its weight channels-last when called."""
    seen: list[bool] = []
    for module in model.depth_head.modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module.weight.shape[-1] > 1:
            module.register_forward_pre_hook(
                lambda m, _: seen.append(m.weight.is_contiguous(memory_format=torch.channels_last)))
    return seen


@pytest.mark.parametrize("frames", [1, 2, 9])
def test_bit_for_bit_with_tracks(model, query_points, frames: int) -> None:
    images = random_images(frames, seed=frames)
    without = _exact(copy.deepcopy(model), dpt_channels_last_weights=False)
    expected = run(without, images, query_points)
    patched = _exact(model)
    assert_equal(run(patched, images, query_points), expected)
    assert_equal(run(patched, images, query_points), expected)  # from the kept copies


def test_copies_are_used_and_the_weights_restored(model, images) -> None:
    weights = list(spatial_weights(model.depth_head))
    before = [(w.data_ptr(), w.is_contiguous()) for w in weights]
    assert weights and all(contiguous for _, contiguous in before)
    _exact(model)
    seen = _layouts_seen(model)
    run(model, images)
    assert seen and all(seen)  # every k x k convolution got the channels-last copy
    assert [(w.data_ptr(), w.is_contiguous()) for w in weights] == before  # upstream's tensors back after the call


def test_a_weight_changed_in_place_is_copied_again(model, images) -> None:
    reference = copy.deepcopy(model)
    _exact(model)
    run(model, images)
    for m in (model, reference):
        with torch.no_grad():
            m.depth_head.scratch.output_conv1.weight.mul_(1.5)
    assert_equal(run(model, images), run(_exact(reference, dpt_channels_last_weights=False), images))


def test_autograd_training_and_revert_use_upstreams_weights(model, images) -> None:
    _exact(model)
    seen = _layouts_seen(model)
    model.depth_head(*_head_args(model, images))  # autograd on
    with torch.no_grad():
        model.depth_head.train()
        model.depth_head(*_head_args(model, images))
        model.depth_head.eval()
    assert seen and not any(seen)
    vggt_turbo.revert_optimizations(model)
    seen.clear()
    run(model, images)
    assert seen and not any(seen)


def _head_args(model: nn.Module, images: torch.Tensor) -> tuple:
    with torch.no_grad():
        tokens, start = model.aggregator(images)
    return tokens, images, start


def test_needs_dpt_channels_last(model) -> None:
    with pytest.raises(ValueError, match="dpt_channels_last"):
        vggt_turbo.apply_optimizations(model, "exact", dpt_channels_last=False)
    assert not hasattr(model.depth_head.forward, "__wrapped__")  # nothing was touched


@needs_cuda
@pytest.mark.parametrize("frames", [1, 2, 10])
def test_on_the_gpu_bit_for_bit_in_graphs(model, frames: int) -> None:
    model = model.cuda()
    images = random_images(frames, seed=frames).cuda()
    without = _exact(copy.deepcopy(model), dpt_channels_last_weights=False)
    patched = _exact(model)
    expected = run(without, images)
    for _ in range(3):  # warm-ups, capture, replay
        assert_equal(run(patched, images), expected)
    for m in (patched, without):  # a weight changed in place: copied again, the graph captured again
        with torch.no_grad():
            m.depth_head.scratch.output_conv1.weight.mul_(1.5)
    expected = run(without, images)
    for _ in range(3):
        assert_equal(run(patched, images), expected)
