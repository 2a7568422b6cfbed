"""The Triton kernel behind ``skinny_linear``: imported only when it runs, since importing it needs triton.

One program computes ``BLOCK_N`` output columns for every row (padded to 16, the smallest ``tl.dot``): it loads its
``(BLOCK_N, BLOCK_K)`` weight tiles once each, in order along K, and accumulates the (16, BLOCK_N) fp32 result with
IEEE fp32 ``tl.dot`` (fused multiply-adds, no TF32); the bias is added last.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

ROWS = 16  # tl.dot's smallest M
BLOCK_N = 16
BLOCK_K = 128
NUM_WARPS = 4
NUM_STAGES = 4


@triton.jit
def _skinny_linear_kernel(x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, ROWS)
    live_n, live_m = n < N, m < M
    acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        live_k = k < K
        w = tl.load(w_ptr + n[:, None].to(tl.int64) * K + k[None, :], mask=live_n[:, None] & live_k[None, :], other=0.0)
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=live_m[:, None] & live_k[None, :], other=0.0)
        acc += tl.dot(x, tl.trans(w), input_precision="ieee")
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=live_n, other=0.0)[None, :]
    tl.store(out_ptr + m[:, None] * N + n[None, :], acc, mask=live_m[:, None] & live_n[None, :])


def skinny_linear_(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], out: torch.Tensor) -> None:
    """Write ``x @ weight.T + bias`` into ``out`` (rows x N; the caller checked dtypes, shapes and layouts)."""
    M, K = x.shape
    N = weight.shape[0]
    grid = (triton.cdiv(N, BLOCK_N),)
    _skinny_linear_kernel[grid](x, weight, bias if bias is not None else weight, out, M, N, K, HAS_BIAS=bias is not None,
                                ROWS=ROWS, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=NUM_WARPS, num_stages=NUM_STAGES)
