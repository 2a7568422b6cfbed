"""``F.linear(x, weight, bias)`` in fp32 for a few rows: one pass over the weight at the memory's speed.

Why: the camera head multiplies one token per frame by fp32 weights (2048-wide blocks, 4 iterations), so with a few
frames its matrix products are bound by reading the weights. cuBLAS reads them well for one row (a gemv, about 70 %
of the H100's memory bandwidth) but for 2–16 rows it runs a GEMM kernel made for many rows: measured on an H100 at
10 frames, the camera head's fp32 products took 3.96 ms for 3.5 GB of weights, about a quarter of the bandwidth.
Here each program owns ``BLOCK_N`` output columns for all rows and streams its weight rows once, in ``BLOCK_K``
slices, multiplying them by the (at most 16) input rows with fp32 fused multiply-adds.

Exact to fp32 rounding: the same products and sums as the GEMM, in fp32, in another order (the running sum over
``BLOCK_K`` slices, then the bias); results differ from cuBLAS's by a few ulps.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import triton_installed

MAX_ROWS = 16  # the kernel pads the rows to this: more would waste its arithmetic, and cuBLAS does well there


def reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``reference(x, weight, bias)``, by the Triton kernel when it covers the call."""
    if x.is_cuda and triton_covers(x, weight, bias):
        from ._skinny_linear_triton import skinny_linear_

        rows = x.reshape(-1, x.shape[-1])
        out = torch.empty(rows.shape[0], weight.shape[0], device=x.device, dtype=torch.float32)
        skinny_linear_(rows, weight, bias, out)
        return out.view(*x.shape[:-1], weight.shape[0])
    return reference(x, weight, bias)


def triton_covers(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether the kernel runs this call: fp32 throughout, at most ``MAX_ROWS`` rows, contiguous rows and weight,
    one device, and no autograd (the kernel has no backward)."""
    if not triton_installed() or x.dim() < 1 or weight.dim() != 2 or x.shape[-1] != weight.shape[1]:
        return False
    rows = x.numel() // max(x.shape[-1], 1)
    tensors = [x, weight] + ([bias] if bias is not None else [])
    if not 1 <= rows <= MAX_ROWS or weight.shape[0] == 0 or x.shape[-1] == 0:
        return False
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return all(t.dtype == torch.float32 and t.device == x.device and t.is_contiguous() for t in tensors)
