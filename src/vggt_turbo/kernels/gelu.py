"""GELU (erf form, PyTorch's ``approximate='none'``) in one pass at memory bandwidth.

Why: each MLP of VGGT's 72 transformer blocks (24 DINOv2, 48 aggregator) widens its tokens to 4x the model width,
and PyTorch applies the GELU to that wide bf16 activation with its generic elementwise kernel, which on an H200
reads and writes it at about two thirds of the memory bandwidth (profile in benchmarks/RESULTS.md). This kernel
is the same elementwise pass, vectorised over contiguous memory, so it runs at the bandwidth. The bias add stays
in the matmul (cuBLAS's epilogue), and cuBLAS's own GELU epilogue is the tanh approximation, not upstream's GELU.

Exact, bit for bit: PyTorch's formula with PyTorch's roundings: the input widened to fp32,
``x * 0.5 * (1 + erf(x * sqrt(1/2)))`` in fp32 (libdevice's ``erff``, the CUDA math library's), rounded once to
the input's dtype; no fused multiply-add (the compiler is told not to contract).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import triton_installed

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def reference(x: torch.Tensor) -> torch.Tensor:
    """Upstream's ``nn.GELU()`` (erf form)."""
    return F.gelu(x)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """``reference(x)``, by the Triton kernel when it covers the call."""
    if x.is_cuda and triton_covers(x):
        from ._gelu_triton import gelu_triton

        return gelu_triton(x)
    return reference(x)


def triton_covers(x: torch.Tensor) -> bool:
    """Whether the kernel runs this call: a contiguous, non-empty tensor of a kernel dtype (other calls, such as
    strided views, take ``reference``)."""
    return triton_installed() and x.dtype in KERNEL_DTYPES and x.is_contiguous() and x.numel() > 0
