"""dpt_channels_last: with one frame the DPT heads' first maps get canonical channels-last strides (a view: same
memory, same values), so the heads run channels-last; the outputs stay within fp32 rounding of upstream's on the
CPU (within TF32 rounding on the GPU); with two or more frames nothing changes, bit for bit."""

from __future__ import annotations

import pytest
import torch

from helpers import NO_FLAGS, assert_close, assert_equal, needs_cuda, only, run

import vggt_turbo
from vggt_turbo.patches.heads import dpt_channels_last as patch
from vggt_turbo.random_model import random_images



def _tokens_map(n: int, c: int = 8, h: int = 5, w: int = 7) -> torch.Tensor:
    """A map made as the heads make it: (N, H*W, C) tokens permuted and reshaped to (N, C, H, W)."""
    return torch.randn(n, h * w, c).permute(0, 2, 1).reshape(n, c, h, w)


def _is_channels_last(t: torch.Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_view_has_canonical_strides_and_the_same_memory() -> None:
    x = _tokens_map(1)
    assert x.stride()[0] != 8 * 5 * 7  # the reshape's stride on the size-1 batch dimension: why PyTorch goes NCHW
    view = patch.channels_last_view(x)
    assert view.stride() == (8 * 5 * 7, 1, 7 * 8, 8) and view.data_ptr() == x.data_ptr() and torch.equal(view, x)
    two = _tokens_map(2)
    assert patch.channels_last_view(two) is two  # already canonical
    contiguous = torch.randn(1, 8, 5, 7)
    assert patch.channels_last_view(contiguous) is contiguous  # not channels-last in memory: left alone
    strided = x[:, :, ::2]
    assert patch.channels_last_view(strided) is strided  # not dense


def _conv_output_layouts(model) -> list[bool]:
    seen: list[bool] = []
    for _, module in model.depth_head.named_modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, o: seen.append(_is_channels_last(o)))
    return seen


def test_one_frame_runs_channels_last_within_fp32_rounding(model, query_points) -> None:
    images = random_images(1)
    expected = run(model, images, query_points)
    vggt_turbo.apply_optimizations(model, only("dpt_channels_last"))
    layouts = _conv_output_layouts(model)
    got = run(model, images, query_points)
    assert layouts and all(layouts)  # every convolution of the depth head produced a channels-last map
    assert_close(got, expected, tol=1e-6)


def test_upstream_one_frame_is_contiguous(model, query_points) -> None:
    """The premise: without the patch, one frame runs the heads on contiguous maps."""
    layouts = _conv_output_layouts(model)
    run(model, random_images(1), query_points)
    assert layouts and not any(layouts)


def test_two_frames_unchanged_bit_for_bit(model, images, query_points) -> None:
    expected = run(model, images, query_points)
    vggt_turbo.apply_optimizations(model, only("dpt_channels_last"))
    assert_equal(run(model, images, query_points), expected)


def test_autograd_and_training_run_upstream(model) -> None:
    """The output's layout shows which input the convolution got: channels-last only from the restrided view."""
    vggt_turbo.apply_optimizations(model, only("dpt_channels_last"))
    conv = model.depth_head.projects[0]
    x = _tokens_map(1, c=conv.in_channels, h=4, w=4)
    layouts = [_is_channels_last(conv(x))]  # autograd on
    with torch.no_grad():
        conv.train()
        layouts.append(_is_channels_last(conv(x)))
        conv.eval()
        layouts.append(_is_channels_last(conv(x)))
    assert layouts == [False, False, True]


@needs_cuda
@pytest.mark.parametrize("frames", [1, 2])
def test_gpu_model_equals_upstream(model, query_points, frames) -> None:
    """One frame: other cuDNN kernels (TF32 sums), so close, not equal; two frames: bit for bit."""
    model = model.cuda()
    images, query_points = random_images(frames).cuda(), query_points.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = run(model, images, query_points)
        vggt_turbo.apply_optimizations(model, NO_FLAGS.replace(dpt_channels_last=True))
        got = run(model, images, query_points)
    if frames == 1:
        assert_close(got, expected, tol=1e-3)
    else:
        assert_equal(got, expected)
