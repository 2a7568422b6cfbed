"""gelu_kernel: every MLP's GELU of the frame, global and DINOv2 blocks goes through ``kernels.gelu``, which is
PyTorch's GELU bit for bit (the Triton kernel on CUDA; PyTorch's own elsewhere)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import NO_FLAGS, assert_equal, count_calls, needs_cuda_triton, only, run

import vggt_turbo
from vggt_turbo.kernels import gelu as gk
from vggt_turbo.patches.aggregator import gelu_kernel as patch
from vggt_turbo.random_model import random_images


def test_every_block_gelu_is_wrapped_and_outputs_stay_upstreams(model, query_points) -> None:
    images = random_images(2)
    expected = run(model, images, query_points)
    vggt_turbo.apply_optimizations(model, only("gelu_kernel"))
    wrapped = vggt_turbo.describe(model).targets["gelu_kernel"]
    blocks = len(model.aggregator.frame_blocks) + len(model.aggregator.global_blocks)
    assert len(wrapped) == blocks and all(t.endswith("mlp.act.forward") for t in wrapped)
    assert_equal(run(model, images, query_points), expected)  # on the CPU, PyTorch's GELU runs
    vggt_turbo.revert_optimizations(model)
    assert "forward" not in vars(model.aggregator.frame_blocks[0].mlp.act)


def test_the_dino_blocks_gelu_is_wrapped_too(dino_model) -> None:
    agg = dino_model.aggregator
    vggt_turbo.apply_optimizations(dino_model, only("gelu_kernel"))
    try:
        wrapped = vggt_turbo.describe(dino_model).targets["gelu_kernel"]
        dino = [t for t in wrapped if ".patch_embed.blocks." in t]
        assert len(dino) == len(agg.patch_embed.blocks) > 0
        assert len(wrapped) == len(agg.frame_blocks) + len(agg.global_blocks) + len(dino)
    finally:
        vggt_turbo.revert_optimizations(dino_model)


def test_a_tanh_gelu_is_left_alone(model) -> None:
    model.aggregator.frame_blocks[0].mlp.act = nn.GELU(approximate="tanh")
    vggt_turbo.apply_optimizations(model, only("gelu_kernel"))
    wrapped = vggt_turbo.describe(model).targets["gelu_kernel"]
    assert not any(t.startswith("aggregator.frame_blocks.0.") for t in wrapped) and len(wrapped) > 0


def test_cpu_takes_pytorchs_gelu(model, monkeypatch) -> None:
    calls = count_calls(monkeypatch, patch, "gelu")
    vggt_turbo.apply_optimizations(model, only("gelu_kernel"))
    act = model.aggregator.frame_blocks[0].mlp.act
    x = torch.randn(3, 5)
    with torch.no_grad():
        assert torch.equal(act(x), F.gelu(x))
    assert calls[0] == 0


def test_kernel_refuses_what_it_does_not_cover() -> None:
    x = torch.randn(4, 6)
    assert not gk.triton_covers(x.t())  # strided
    assert not gk.triton_covers(x.double())
    assert not gk.triton_covers(torch.empty(0))


def _inputs(n: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=g) * 4
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-40, 30.0, -30.0, 5.5, -5.5])
    x[: len(special)] = special[: min(len(special), n)]
    return x.to("cuda", dtype)


@needs_cuda_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [11, 4095, 4096, 4097, 1374 * 4096, 3 * 1369 * 4096 + 5])
def test_gpu_kernel_equals_pytorch_bit_for_bit(n, dtype) -> None:
    x = _inputs(n, dtype)
    got = gk.gelu(x)
    assert gk.triton_covers(x) and got.dtype == dtype and torch.equal(got.isnan(), F.gelu(x).isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(F.gelu(x)))


@needs_cuda_triton
def test_gpu_kernel_over_every_bf16_value() -> None:
    """All 65,536 bf16 bit patterns: each rounds as PyTorch's GELU rounds it."""
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).cuda()
    got, expected = gk.gelu(x), F.gelu(x)
    same = (got.view(torch.int16) == expected.view(torch.int16)) | (got.isnan() & expected.isnan())
    assert bool(same.all()), f"{int((~same).sum())} values differ, e.g. at {x[~same][:5].tolist()}"


@needs_cuda_triton
@pytest.mark.parametrize("frames", [1, 3])
def test_gpu_model_equals_upstream_bit_for_bit(model, query_points, monkeypatch, frames) -> None:
    model = model.cuda()
    images, query_points = random_images(frames).cuda(), query_points.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = run(model, images, query_points)
        calls = count_calls(monkeypatch, patch, "gelu")
        vggt_turbo.apply_optimizations(model, NO_FLAGS.replace(gelu_kernel=True))
        got = run(model, images, query_points)
    assert_equal(got, expected)
    assert calls[0] == len(model.aggregator.frame_blocks) + len(model.aggregator.global_blocks)


@needs_cuda_triton
def test_gpu_autograd_takes_pytorchs_gelu(model, monkeypatch) -> None:
    """The kernel has no backward: with autograd on, PyTorch's GELU runs and gradients flow."""
    calls = count_calls(monkeypatch, patch, "gelu")
    model = model.cuda()
    vggt_turbo.apply_optimizations(model, only("gelu_kernel"))
    x = torch.randn(64, 32, device="cuda", requires_grad=True)
    model.aggregator.frame_blocks[0].mlp.act(x).sum().backward()
    assert calls[0] == 0 and x.grad is not None and torch.equal(x.grad, torch.ops.aten.gelu_backward(torch.ones_like(x), x))
