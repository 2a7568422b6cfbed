"""The Triton kernel behind ``conv_epilogue_``: imported only when it runs, since importing it needs triton.

The (N, C, H, W) tensor is walked as a 2-D (rows, cols) view of its memory: (N*H*W, C) in the channels-last layout,
where the bias runs along the columns, and (N*C, H*W) in the contiguous one, where it is constant along a row. One
program handles a ``BLOCK_R`` x ``BLOCK_C`` tile and loads the bias once for it; no per-element division.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _conv_epilogue_kernel(y_ptr, bias_ptr, res_ptr, rows, cols, C, BIAS_PER_COL: tl.constexpr,
                          RESIDUAL: tl.constexpr, RELU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = (r < rows)[:, None] & (c < cols)[None, :]
    offs = r[:, None] * cols + c[None, :]
    if BIAS_PER_COL:
        bias = tl.load(bias_ptr + c, mask=c < cols).to(tl.float32)[None, :]
    else:
        bias = tl.load(bias_ptr + r % C, mask=r < rows).to(tl.float32)[:, None]
    y = tl.load(y_ptr + offs, mask=live)
    out = (y.to(tl.float32) + bias).to(y.dtype)
    if RESIDUAL:
        out = (out.to(tl.float32) + tl.load(res_ptr + offs, mask=live).to(tl.float32)).to(y.dtype)
    if RELU:
        out = tl.where(out < 0, tl.zeros_like(out), out)  # NaN is not < 0: kept, as torch.relu keeps it
    tl.store(y_ptr + offs, out, mask=live)


def conv_epilogue_triton_(y: torch.Tensor, bias: torch.Tensor, residual: Optional[torch.Tensor], relu: bool,
                          channels_last: bool) -> None:
    """In place on ``y`` (N, C, H, W): ``y + bias``, ``+ residual``, ReLU (the caller checked layouts)."""
    N, C, H, W = y.shape
    rows, cols = (N * H * W, C) if channels_last else (N * C, H * W)
    block_c = min(triton.next_power_of_2(cols), 1024)
    block_r = max(1, 4096 // block_c)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(cols, block_c))
    _conv_epilogue_kernel[grid](
        y, bias, residual if residual is not None else y, rows, cols, C, BIAS_PER_COL=channels_last,
        RESIDUAL=residual is not None, RELU=relu, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4,
        enable_fp_fusion=False,
    )
