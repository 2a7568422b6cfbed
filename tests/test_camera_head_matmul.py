"""camera_head_matmul: the camera head's fp32 products of ``ROWS`` rows computed as W x^T (another cuBLAS kernel on
the GPU); outputs within fp32 rounding of upstream's; other row counts, autocast, training and autograd run
upstream's ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import assert_close, assert_equal, count_calls, needs_cuda, only, run

import vggt_turbo
from vggt_turbo.patches.heads import camera_head_matmul
from vggt_turbo.random_model import build_vggt, random_images


def _linears(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.camera_head.modules() if type(m) is nn.Linear]


def test_eight_frames_within_fp32_rounding_without_f_linear_in_the_camera_head(model, monkeypatch) -> None:
    images = random_images(8)
    expected = run(model, images)
    vggt_turbo.apply_optimizations(model, only("camera_head_matmul"))
    assert_close(run(model, images), expected, tol=1e-5)
    tokens = _tokens(model, 8)
    calls = count_calls(monkeypatch, F, "linear")
    with torch.no_grad():
        model.camera_head(tokens)
    assert calls[0] == 0  # every product of the head went through mm / addmm


def _tokens(model: nn.Module, frames: int) -> list[torch.Tensor]:
    """Aggregated tokens as the aggregator hands them to the heads (B=1): what the camera head reads."""
    with torch.no_grad():
        tokens, _ = model.aggregator(random_images(frames))
    return tokens


def test_outside_rows_it_calls_upstream_bit_for_bit(model, images) -> None:
    expected = run(model, images)  # 2 frames: 2 rows, below ROWS
    vggt_turbo.apply_optimizations(model, only("camera_head_matmul"))
    assert_equal(run(model, images), expected)


@pytest.mark.parametrize("rows", [7, 8, 100, 101])
def test_the_rows_bounds(monkeypatch, rows: int) -> None:
    linear = nn.Linear(16, 24).eval()
    x = torch.randn(1, rows, 16)
    calls = count_calls(monkeypatch, F, "linear")
    with torch.no_grad():
        got = camera_head_matmul.linear_forward(linear.forward, linear, (x,), {})
    assert calls[0] == (0 if rows in camera_head_matmul.ROWS else 1)
    torch.testing.assert_close(got, F.linear(x, linear.weight, linear.bias), rtol=1e-6, atol=1e-6)
    assert got.is_contiguous() and got.shape == (1, rows, 24)


def test_without_bias_autocast_training_and_autograd(monkeypatch) -> None:
    linear = nn.Linear(16, 24, bias=False).eval()
    x = torch.randn(10, 16)
    calls = count_calls(monkeypatch, F, "linear")
    with torch.no_grad():
        torch.testing.assert_close(camera_head_matmul.linear_forward(linear.forward, linear, (x,), {}),
                                   x @ linear.weight.t(), rtol=1e-6, atol=1e-6)
        assert calls[0] == 0
        with torch.autocast("cpu", dtype=torch.bfloat16):
            camera_head_matmul.linear_forward(linear.forward, linear, (x,), {})
        linear.train()
        camera_head_matmul.linear_forward(linear.forward, linear, (x,), {})
        linear.eval()
    camera_head_matmul.linear_forward(linear.forward, linear, (x,), {})  # autograd on
    assert calls[0] == 3


def test_reverted_model_calls_f_linear_again(model, monkeypatch) -> None:
    vggt_turbo.apply_optimizations(model, only("camera_head_matmul"))
    vggt_turbo.revert_optimizations(model)
    tokens = _tokens(model, 8)
    calls = count_calls(monkeypatch, F, "linear")
    with torch.no_grad():
        model.camera_head(tokens)
    assert calls[0] > 0


@needs_cuda
def test_on_the_gpu_within_fp32_rounding_of_upstream() -> None:
    model = build_vggt("small").cuda()
    images = random_images(16).cuda()
    expected = run(model, images)
    vggt_turbo.apply_optimizations(model, only("camera_head_matmul"))
    assert_close(run(model, images), expected, tol=1e-5)
