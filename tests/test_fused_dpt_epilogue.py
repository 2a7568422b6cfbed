"""fused_dpt_epilogue: the DPT heads' convolutions without their bias, then bias (+ ReLU or residual) in one pass,
give upstream's outputs bit for bit; on CUDA every biased convolution of the heads takes the fused path (on the
CPU, whose convolutions add the bias inside, the units' ReLU and residual adds do); upstream's residual-unit semantics (in-place ReLU of the input) are kept; and
upstream runs where the patch does not apply.

Run the interpreter tests with ``TRITON_INTERPRET=1 PYTHONPATH=<triton> python -m pytest tests/test_fused_dpt_epilogue.py``.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from helpers import NO_FLAGS, assert_equal, count_calls, needs_cuda_triton, needs_interpreter, only, run

import vggt_turbo
from vggt_turbo.kernels import conv_epilogue as ce
from vggt_turbo.kernels import triton_installed
from vggt_turbo.patches.heads import fused_dpt_epilogue as patch
from vggt_turbo.random_model import random_images
from vggt_turbo.upstream import DPT_HEADS, dpt_heads


# (N, C, H, W, channels_last, residual, relu): DPT's shapes in small, both layouts, every epilogue combination,
# sizes that are not multiples of the kernel's block
CASES = [
    (2, 16, 37, 37, True, False, False),
    (1, 16, 37, 37, False, False, True),
    (2, 32, 9, 7, True, True, False),
    (1, 32, 9, 7, False, True, False),
    (3, 8, 5, 5, True, True, True),
    (1, 256, 1, 1, False, False, True),
]


def _case(n, c, h, w, channels_last, residual, relu, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(n * c * h * w)
    y = torch.randn(n, c, h, w, generator=g).to(device, dtype)
    bias = torch.randn(c, generator=g).to(device, dtype)
    res = torch.randn(n, c, h, w, generator=g).to(device, dtype) if residual else None
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
        res = res.contiguous(memory_format=torch.channels_last) if res is not None else None
    return y, bias, res, relu


def _expected(y, bias, res, relu):
    """Upstream's expressions, out of place: the bias add as PyTorch's cuDNN path does it, then the next op."""
    out = y + bias.reshape(1, -1, 1, 1)
    if res is not None:
        out = torch.add(out, res)
    return torch.relu(out) if relu else out


def _calls(model: nn.Module, images: torch.Tensor, query_points: torch.Tensor, counted,
           heads: tuple[str, ...] = DPT_HEADS) -> int:
    """How many times upstream calls the modules of ``heads`` that ``counted(name, module)`` selects in one
    forward (forward hooks on a copy)."""
    model = copy.deepcopy(model)
    calls = [0]
    for path, head in dpt_heads(model):
        if path not in heads:
            continue
        for name, module in head.named_modules():
            if counted(name, module):
                module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    run(model, images, query_points)
    return calls[0]


def _is_biased_conv(name: str, module: nn.Module) -> bool:
    return isinstance(module, patch.CONVS) and module.bias is not None


@pytest.mark.parametrize("frames", [1, 2])
def test_outputs_equal_upstream_bit_for_bit(model, query_points, monkeypatch, frames) -> None:
    """One frame gives contiguous feature maps, two channels-last ones (on the GPU as here). Off CUDA the
    convolutions keep their bias; a unit still fuses its ReLU and its residual add (two passes), ``output_conv2``
    its ReLU (one)."""
    images = random_images(frames)
    expected = run(model, images, query_points)
    units = _calls(model, images, query_points, lambda _, module: patch._is_unit(module))
    outputs = _calls(model, images, query_points, lambda name, _: name == "scratch.output_conv2")
    calls = count_calls(monkeypatch, patch, "conv_epilogue_")
    vggt_turbo.apply_optimizations(model, only("fused_dpt_epilogue"))
    assert_equal(run(model, images, query_points), expected)
    assert units > 10 and outputs == 2 and calls[0] == 2 * units + outputs  # every unit took the fused path


def test_cpu_convolutions_keep_their_bias(model, monkeypatch) -> None:
    """PyTorch's CPU kernels add the bias inside their accumulation: adding it after would not be bit for bit."""
    calls = count_calls(monkeypatch, patch, "conv_epilogue_")
    vggt_turbo.apply_optimizations(model, only("fused_dpt_epilogue"))
    conv = model.depth_head.scratch.output_conv1
    x = torch.randn(1, conv.in_channels, 6, 5)
    with torch.no_grad():
        assert torch.equal(conv(x), type(conv).forward(conv, x))
    assert calls[0] == 0 and not patch._bias_after(conv, x)


@pytest.mark.parametrize("inplace", [True, False])
def test_residual_unit_keeps_upstreams_semantics(model, inplace) -> None:
    """The residual is the input as upstream's activation leaves it: ``relu(x)`` with an in-place ReLU (which
    also modifies the caller's tensor), ``x`` itself without."""
    unit = copy.deepcopy(model.depth_head.scratch.refinenet1.resConfUnit1)
    unit.activation = nn.ReLU(inplace=inplace)
    channels = unit.conv1.in_channels
    x = torch.randn(2, channels, 6, 5).contiguous(memory_format=torch.channels_last)
    x_upstream, x_patched = x.clone(), x.clone()
    with torch.no_grad():
        expected = type(unit).forward(unit, x_upstream)
        got = patch.unit_forward(unit.forward, unit, (x_patched,), {})
    assert torch.equal(got, expected)
    assert torch.equal(x_patched, x_upstream)  # the input modified (or not) as upstream modifies it
    assert torch.equal(x_patched, torch.relu(x) if inplace else x)


def test_upstream_runs_where_the_patch_does_not_apply(model, monkeypatch) -> None:
    pristine = copy.deepcopy(model.depth_head.scratch.refinenet1.resConfUnit1)
    calls = count_calls(monkeypatch, patch, "conv_epilogue_")
    vggt_turbo.apply_optimizations(model, only("fused_dpt_epilogue"))
    unit = model.depth_head.scratch.refinenet1.resConfUnit1
    conv = model.depth_head.scratch.output_conv1
    x = torch.randn(2, unit.conv1.in_channels, 6, 5)

    def fresh():
        return x.clone()

    unit(fresh())  # autograd on
    conv(torch.randn(2, conv.in_channels, 6, 5))
    with torch.no_grad():
        unit.train()
        unit(fresh())
        unit.eval()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # would round the bias to bf16 before adding it
            unit(fresh())
            conv(torch.randn(2, conv.in_channels, 6, 5))
    assert calls[0] == 0
    with torch.no_grad():
        unit(fresh())
    assert calls[0] == 2  # the same unit does take the fused path otherwise
    with torch.no_grad():
        unit.norm1 = pristine.norm1 = nn.Identity()  # a unit built with norms: upstream's forward
        assert torch.equal(unit(fresh()), pristine(fresh()))
    assert calls[0] == 2


def test_reference_is_upstreams_expressions() -> None:
    for case in CASES:
        y, bias, res, relu = _case(*case)
        expected = _expected(y, bias, res, relu)
        got = ce.reference(y, bias, res, relu)
        assert got is y and torch.equal(got, expected)


def test_reference_promotes_as_torch_add() -> None:
    """A wider residual makes a wider sum, as upstream's ``torch.add(out, x)`` does; no silent in-place narrowing."""
    y, bias, res, _ = _case(*CASES[2])
    got = ce.reference(y.half(), bias.half(), res)
    assert got.dtype == torch.float32 and torch.equal(got, torch.add(y.half() + bias.half().reshape(1, -1, 1, 1), res))


def test_relu_keeps_nan() -> None:
    y = torch.tensor([float("nan"), -1.0, 2.0]).reshape(1, 3, 1, 1)
    got = ce.reference(y.clone(), torch.zeros(3), relu=True).flatten()
    assert torch.isnan(got[0]) and got[1:].tolist() == [0.0, 2.0]


def test_kernel_refuses_what_it_does_not_cover() -> None:
    y, bias, res, _ = _case(*CASES[2])
    assert ce.triton_covers(y, bias, res) == triton_installed()
    assert ce.triton_covers(y.contiguous(), bias, None) == triton_installed()
    assert not ce.triton_covers(y, None, res)  # no bias: nothing for the kernel to fuse
    assert not ce.triton_covers(y, bias, res.contiguous())  # the residual in another layout
    assert not ce.triton_covers(y[:, :, ::2], bias, None)  # not dense
    assert not ce.triton_covers(y, bias[:-1], None)
    assert not ce.triton_covers(y, bias.double(), None)
    assert not ce.triton_covers(y.double(), bias.double(), None)
    assert not ce.triton_covers(y.flatten(2), bias, None)  # not 4-D


@needs_interpreter
@pytest.mark.parametrize("case", CASES, ids=str)
def test_interpreted_kernel_equals_pytorch_bit_for_bit(case) -> None:
    from vggt_turbo.kernels._conv_epilogue_triton import conv_epilogue_triton_

    y, bias, res, relu = _case(*case)
    expected = _expected(y, bias, res, relu)
    conv_epilogue_triton_(y, bias, res, relu, channels_last=not y.is_contiguous())
    assert torch.equal(y, expected)


@needs_interpreter
def test_interpreted_kernel_keeps_nan() -> None:
    from vggt_turbo.kernels._conv_epilogue_triton import conv_epilogue_triton_

    y = torch.tensor([float("nan"), -1.0, 2.0]).reshape(1, 3, 1, 1)
    conv_epilogue_triton_(y, torch.zeros(3), None, True, channels_last=False)
    assert torch.isnan(y.flatten()[0]) and y.flatten()[1:].tolist() == [0.0, 2.0]


@needs_cuda_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES + [(8, 256, 148, 148, True, True, False), (1, 128, 296, 296, False, False, True)], ids=str)
def test_gpu_kernel_equals_pytorch_bit_for_bit(case, dtype) -> None:
    y, bias, res, relu = _case(*case, dtype=dtype, device="cuda")
    expected = _expected(y, bias, res, relu)
    got = ce.conv_epilogue_(y, bias, res, relu)
    assert got is y and torch.equal(got, expected)


@needs_cuda_triton
@pytest.mark.parametrize("frames", [1, 2])
def test_gpu_model_equals_upstream_bit_for_bit(model, query_points, monkeypatch, frames) -> None:
    """Under bf16 autocast, as users run it: one frame gives contiguous maps, two channels-last ones. Every biased
    convolution of the depth and point heads (which upstream runs in fp32, autocast off) adds its bias in the
    fused pass; the track head's feature extractor runs under the caller's autocast, so upstream's code."""
    model = model.cuda()
    images, query_points = random_images(frames).cuda(), query_points.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = run(model, images, query_points)
        convs = _calls(model, images, query_points, _is_biased_conv, heads=("depth_head", "point_head"))
        calls = count_calls(monkeypatch, patch, "conv_epilogue_")
        vggt_turbo.apply_optimizations(model, NO_FLAGS.replace(fused_dpt_epilogue=True))
        got = run(model, images, query_points)
    assert_equal(got, expected)
    assert convs > 40 and calls[0] == convs
