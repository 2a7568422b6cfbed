"""camera_skinny_linear: the camera head's fp32 products of at most 16 rows on a Triton kernel that is as close to
float64 as torch's fp32 product is (interpreter and GPU); it covers only what it should; the patch routes every
camera-head linear layer through it on CUDA and leaves CPU, autocast and training calls to upstream's ``F.linear``
(bit for bit on the CPU).

Run the interpreter tests with ``TRITON_INTERPRET=1 PYTHONPATH=<triton> python -m pytest tests/test_camera_skinny_linear.py``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_equal, needs_cuda_triton, needs_interpreter, only, run

import vggt_turbo
from vggt_turbo.kernels import skinny_linear as sl
from vggt_turbo.patches import camera_skinny_linear as patch
from vggt_turbo.random_model import random_images

# (rows, N, K, bias): one frame; ten; the most rows; widths that are not multiples of the kernel's blocks.
CASES = [(1, 64, 256, True), (10, 48, 384, False), (16, 33, 129, True), (3, 2048, 200, True)]


def _case(rows, N, K, bias, device="cpu"):
    g = torch.Generator().manual_seed(rows * N + K)
    x = torch.randn(rows, K, generator=g).to(device)
    w = (torch.randn(N, K, generator=g) / K**0.5).to(device)
    b = torch.randn(N, generator=g).to(device) if bias else None
    return x, w, b


def _rel64(out, x, w, b) -> float:
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    return ((out.double() - ref).norm() / ref.norm()).item()


def _check_kernel(device: str) -> None:
    from vggt_turbo.kernels._skinny_linear_triton import skinny_linear_

    for case in CASES:
        x, w, b = _case(*case, device=device)
        out = torch.empty(x.shape[0], w.shape[0], device=device)
        skinny_linear_(x, w, b, out)
        torch_fp32 = _rel64(F.linear(x, w, b), x, w, b)
        assert _rel64(out, x, w, b) <= max(2 * torch_fp32, 1e-7), case  # fp32 rounding, in another order


@needs_interpreter
def test_kernel_in_interpreter_is_fp32_accurate() -> None:
    _check_kernel("cpu")


@needs_cuda_triton
def test_kernel_on_cuda_is_fp32_accurate() -> None:
    _check_kernel("cuda")


def test_covers_only_fp32_few_rows_contiguous_without_autograd() -> None:
    x, w, b = _case(4, 32, 64, True)
    if not sl.triton_installed():
        assert not sl.triton_covers(x, w, b)
        return
    assert sl.triton_covers(x, w, b) and sl.triton_covers(x.view(2, 2, 64), w, None)
    assert not sl.triton_covers(torch.randn(17, 64), w, b)  # more rows than the kernel pads to
    assert not sl.triton_covers(x.bfloat16(), w.bfloat16(), b.bfloat16())
    assert not sl.triton_covers(x, w.t().contiguous().t(), b)  # a transposed weight
    assert not sl.triton_covers(x, w, torch.randn(31))
    assert not sl.triton_covers(x.requires_grad_(), w, b)
    with torch.no_grad():
        assert sl.triton_covers(x, w, b)


def _counting(monkeypatch) -> list[int]:
    calls = [0]
    real = patch.skinny_linear

    def counted(*args):
        calls[0] += 1
        return real(*args)

    monkeypatch.setattr(patch, "skinny_linear", counted)
    return calls


def _linears(model) -> int:
    return sum(type(m) is torch.nn.Linear for m in model.camera_head.modules())


def test_cpu_runs_upstream_bit_for_bit(model, images) -> None:
    expected = run(model, images)
    vggt_turbo.apply_optimizations(model, only("camera_skinny_linear"))
    assert len(vggt_turbo.describe(model).targets["camera_skinny_linear"]) == _linears(model)
    assert_equal(run(model, images), expected)


@needs_cuda_triton
@pytest.mark.parametrize("frames", [1, 10])
def test_cuda_camera_head_within_fp32_rounding(model, frames, monkeypatch) -> None:
    model = model.cuda()
    images = random_images(frames).cuda()
    expected = run(model, images)
    calls = _counting(monkeypatch)
    vggt_turbo.apply_optimizations(model, only("camera_skinny_linear", single_key_attention=True))
    got = run(model, images)
    assert calls[0] > 0
    assert_close(got, expected, tol=1e-5)
    calls[0] = 0
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.camera_head([torch.randn(1, frames, 6, 2 * model.aggregator.patch_embed.proj.out_channels, device="cuda")])
    assert calls[0] == 0  # under autocast upstream's F.linear rounds to bf16: left to it


def test_training_and_autograd_run_upstream(model, monkeypatch) -> None:
    calls = _counting(monkeypatch)
    vggt_turbo.apply_optimizations(model, only("camera_skinny_linear"))
    linear = model.camera_head.trunk[0].mlp.fc1
    x = torch.randn(2, 1, linear.in_features)
    linear.train()
    with torch.no_grad():
        assert torch.equal(linear(x), F.linear(x, linear.weight, linear.bias))
    assert calls[0] == 0
