"""The Triton kernel behind ``gelu``: imported only when it runs, since importing it needs triton.

A flat pass over contiguous memory, ``BLOCK`` elements per program: 16-byte loads and stores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _gelu_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    live = offs < n
    x = tl.load(x_ptr + offs, mask=live).to(tl.float32)
    y = x * 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))  # PyTorch's order: (x * 0.5) * (1 + erf(x / sqrt 2))
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=live)


def gelu_triton(x: torch.Tensor) -> torch.Tensor:
    """GELU of contiguous ``x`` into a new tensor of its dtype (the caller checked the layout)."""
    y = torch.empty_like(x)
    n = x.numel()
    _gelu_kernel[(triton.cdiv(n, BLOCK),)](x, y, n, BLOCK=BLOCK, num_warps=8, enable_fp_fusion=False)
    return y
