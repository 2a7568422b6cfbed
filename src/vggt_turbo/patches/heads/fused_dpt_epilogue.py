"""fused_dpt_epilogue — replaces, in the DPT heads (depth, points, track features), ``ResidualConvUnit.forward(x)``,
the forward of ``scratch.output_conv2`` (``nn.Sequential`` of conv, ReLU, conv) and ``forward`` of every other
``nn.Conv2d`` / ``nn.ConvTranspose2d`` with a bias.

Why faster: the heads run in fp32 and PyTorch adds each convolution's bias in a pass of its own, after cuDNN's
kernel, by its slower non-vectorised broadcast kernel; a ReLU or a residual add then makes another pass over the
same feature map. In a residual unit, the elementwise passes after upstream's ``relu_(x)`` (``+ b1``, ``relu_``,
``+ b2``, ``+ x``) read or write the feature map 9 times; here 5: each convolution runs without its bias and
``kernels.conv_epilogue`` adds the bias and then the ReLU (after conv1) or the residual (after conv2) in one
vectorised pass, in place on the convolution's output. The same pass adds the bias (and the ReLU, for
``output_conv2``) after every other convolution (the heads' elementwise time before and after:
benchmarks/RESULTS.md).

Exact, bit for bit: where PyTorch runs a convolution on cuDNN (CUDA, cuDNN enabled, one group), it adds the bias
after it too (``output.add_(bias)``); the kernel adds it, then the residual, then applies the ReLU, each rounded
as PyTorch rounds it. Elsewhere (the CPU, whose kernels add the bias inside their accumulation for contiguous
maps) the convolution keeps its bias and only the ReLU or residual add runs in the same pass (PyTorch's ops
off CUDA). The residual unit keeps upstream's in-place ReLU of its input, so the input is modified as upstream
modifies it and the residual is that ReLU's output, as in upstream. In training, with autograd on, under
autocast (which would round the bias to its dtype first), for a unit with norms or an activation other than
``nn.ReLU``, or a convolution with a padding mode other than zeros, upstream runs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...autocast import autocast_dtype
from ...config import TurboConfig
from ...kernels.conv_epilogue import KERNEL_DTYPES, conv_epilogue_
from ...upstream import RESIDUAL_UNIT_FORWARD, dpt_heads, first_residual_unit, members
from .._base import Patch, Target, Tier

CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def _runs_upstream(module: nn.Module, x: Any) -> bool:
    """Whether upstream's code must run: training, autograd, autocast on the input's device, or not a tensor."""
    if module.training or torch.is_grad_enabled() or not isinstance(x, torch.Tensor):
        return True
    return autocast_dtype(x.device.type) is not None


def _covered(conv: nn.Module) -> bool:
    """A plain convolution (not a subclass with its own forward) with zero padding, which this patch calls itself."""
    return type(conv) in CONVS and conv.padding_mode == "zeros"


def _bias_after(conv: nn.Module, x: torch.Tensor) -> bool:
    """Whether PyTorch runs this convolution on cuDNN, where it adds the bias in a pass of its own after the
    convolution: only then is adding it in the epilogue the same arithmetic. (PyTorch's CPU kernels add it inside
    their accumulation for contiguous maps, which rounds differently.)"""
    cudnn = torch.backends.cudnn
    return x.is_cuda and cudnn.enabled and cudnn.is_available() and conv.groups == 1 and x.dtype in KERNEL_DTYPES


def _conv_no_bias(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` without the bias: the same functional call upstream's module makes, with ``bias=None``."""
    if type(conv) is nn.ConvTranspose2d:
        return F.conv_transpose2d(x, conv.weight, None, conv.stride, conv.padding, conv.output_padding, conv.groups,
                                  conv.dilation)
    return F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)


def _conv_then(conv: nn.Module, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
               relu: bool = False) -> torch.Tensor:
    """``conv(x)``, ``+ residual``, ReLU: the bias in the same pass where cuDNN runs the convolution, else the
    convolution's own call followed by the other two in one pass."""
    if _bias_after(conv, x):
        return conv_epilogue_(_conv_no_bias(conv, x), conv.bias, residual, relu)
    return conv_epilogue_(conv(x), None, residual, relu)


def conv_forward(wrapped: Any, conv: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """``conv(x)`` with the bias added by the vectorised kernel where cuDNN runs it (``ConvTranspose2d`` with
    ``output_size``, or anywhere else: upstream)."""
    if len(args) != 1 or kwargs or _runs_upstream(conv, args[0]) or not _bias_after(conv, args[0]):
        return wrapped(*args, **kwargs)
    return conv_epilogue_(_conv_no_bias(conv, args[0]), conv.bias)


def _unit_fusable(unit: nn.Module) -> bool:
    return (
        unit.norm1 is None
        and unit.norm2 is None
        and type(unit.activation) is nn.ReLU
        and type(unit.skip_add).__name__ == "FloatFunctional"  # add(a, b): torch.add, then an Identity
        and type(getattr(unit.skip_add, "activation_post_process", None)) is nn.Identity
        and _covered(unit.conv1)
        and _covered(unit.conv2)
    )


def unit_forward(wrapped: Any, unit: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """``ResidualConvUnit.forward``: ``conv2(relu(conv1(relu(x)) + b1)) + b2 + x`` in upstream's order, where
    upstream's ``nn.ReLU(inplace=True)`` has turned ``x`` into ``relu(x)`` by the time it is added."""
    x = RESIDUAL_UNIT_FORWARD.bind(*args, **kwargs)[0]
    if _runs_upstream(unit, x) or not _unit_fusable(unit):
        return wrapped(*args, **kwargs)
    out = unit.activation(x)  # upstream's own ReLU module: in place (modifying x) when upstream's is
    return _conv_then(unit.conv2, _conv_then(unit.conv1, out, relu=True), residual=x)


def _head_output_fusable(seq: nn.Module) -> bool:
    return len(seq) == 3 and _covered(seq[0]) and type(seq[1]) is nn.ReLU


def head_output_forward(wrapped: Any, seq: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """``output_conv2``: ReLU(conv0(x) + b0) in one pass, then its last convolution (itself patched)."""
    if len(args) != 1 or kwargs or _runs_upstream(seq, args[0]) or not _head_output_fusable(seq):
        return wrapped(*args, **kwargs)
    return seq[2](_conv_then(seq[0], args[0], relu=True))


def _is_unit(module: nn.Module) -> bool:
    return type(module).__name__ == "ResidualConvUnit"


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    targets = []
    for path, head in dpt_heads(root):
        for name, module in head.named_modules():
            where = f"{path}.{name}" if name else path
            if _is_unit(module):
                targets.append(Target(where, "forward", unit_forward))
            elif name == "scratch.output_conv2" and isinstance(module, nn.Sequential):
                targets.append(Target(where, "forward", head_output_forward))
            elif _covered(module) and module.bias is not None:
                targets.append(Target(where, "forward", conv_forward))
    return targets


PATCH = Patch(
    name="fused_dpt_epilogue",
    tier=Tier.EXACT,
    sequence_parallel=True,  # the heads' convolutions, on each rank's own frames
    summary="in the DPT heads, each convolution's bias with the ReLU or residual add after it, in one pass",
    requirements=(RESIDUAL_UNIT_FORWARD.requirement,)
    + members(
        "ResidualConvUnit",
        first_residual_unit,
        ("conv1", None),
        ("conv2", None),
        ("activation", None),
        ("norm1", None),
        ("norm2", None),
        ("skip_add", None),
    ),
    enabled=lambda c: c.fused_dpt_epilogue,
    targets=_targets,
)
