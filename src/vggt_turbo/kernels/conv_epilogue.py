"""A convolution's bias add, then optionally a residual add and a ReLU, in one in-place pass.

Why: PyTorch's cuDNN convolution adds its bias in a separate kernel (``output.add_(bias.reshape(1, C, 1, 1))``),
and a broadcast bias sends that add to PyTorch's slower non-vectorised kernel. VGGT's DPT heads follow most of
their fp32 convolutions by a ReLU or a residual add, two more passes over a large feature map (their share of the
heads' time: benchmarks/RESULTS.md, ``fused_dpt_epilogue``). This kernel reads the
convolution's output once (and the residual once) and writes the result once.

Exact, bit for bit: PyTorch's arithmetic in PyTorch's order: ``y + bias`` rounded to ``y``'s dtype, then
``+ residual`` rounded again, then the ReLU (which keeps NaN, as ``torch.relu`` does). The convolution itself is
PyTorch's, called without its bias: the same cuDNN call as with it.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import triton_installed

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def reference(y: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None,
              relu: bool = False) -> torch.Tensor:
    """``y + bias`` (broadcast over dimension 1), ``+ residual``, then ReLU, in place on ``y``, which is returned
    (a new tensor only when the residual's dtype promotes the sum)."""
    if bias is not None:
        y.add_(bias.reshape((1, -1) + (1,) * (y.dim() - 2)))
    if residual is not None:  # in place unless the sum's dtype is wider (as torch.add would promote it)
        y = y.add_(residual) if torch.result_type(y, residual) == y.dtype else y + residual
    return y.relu_() if relu else y


def conv_epilogue_(y: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor] = None,
                   relu: bool = False) -> torch.Tensor:
    """``reference(y, bias, residual, relu)``, by the Triton kernel when it covers the call."""
    if y.is_cuda and triton_covers(y, bias, residual):
        from ._conv_epilogue_triton import conv_epilogue_triton_

        conv_epilogue_triton_(y, bias, residual, relu, channels_last=not y.is_contiguous())
        return y
    return reference(y, bias, residual, relu)


def triton_covers(y: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor]) -> bool:
    """Whether the kernel runs this call: a 4-D (N, C, H, W) tensor dense in the contiguous or channels-last
    layout, a contiguous (C,) bias and a residual of the same strides, one dtype and one device for all. Other
    calls (strided views, mixed dtypes) take ``reference``."""
    if not (triton_installed() and bias is not None and y.dim() == 4 and y.dtype in KERNEL_DTYPES and y.numel() > 0):
        return False
    if not (y.is_contiguous() or y.is_contiguous(memory_format=torch.channels_last)):
        return False
    if not (bias.dim() == 1 and bias.shape[0] == y.shape[1] and bias.is_contiguous()):
        return False
    if residual is not None and (residual.shape != y.shape or residual.stride() != y.stride()):
        return False
    return all(t.dtype == y.dtype and t.device == y.device for t in (bias, residual) if t is not None)
