"""The Triton kernel behind ``scale_add``: imported only when it runs, since importing it needs triton.

One program handles ``BLOCK_R`` rows of the (rows, C) view: ``gamma`` is loaded once per program and broadcast
over the rows; every element is read once from ``x`` and ``branch`` and written once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _scale_add_kernel(x_ptr, b_ptr, g_ptr, out_ptr, rows, C, PRODUCT: tl.constexpr, BLOCK_R: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = (r < rows)[:, None] & (c < C)[None, :]
    offs = r[:, None] * C + c[None, :]
    g = tl.load(g_ptr + c, mask=c < C).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=live).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=live).to(tl.float32)
    product = (b * g[None, :]).to(PRODUCT).to(tl.float32)
    tl.store(out_ptr + offs, (x + product).to(out_ptr.dtype.element_ty), mask=live)


@triton.jit
def _scale_add_norm_kernel(x_ptr, b_ptr, g_ptr, w_ptr, nb_ptr, out_ptr, norm_ptr, rows, C, eps,
                           PRODUCT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    live_c = c < C
    live = (r < rows)[:, None] & live_c[None, :]
    offs = r[:, None] * C + c[None, :]
    g = tl.load(g_ptr + c, mask=live_c).to(tl.float32)
    x = tl.load(x_ptr + offs, mask=live).to(tl.float32)
    b = tl.load(b_ptr + offs, mask=live).to(tl.float32)
    product = (b * g[None, :]).to(PRODUCT).to(tl.float32)
    total = (x + product).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + offs, total, mask=live)
    # LayerNorm of the stored (rounded) sum, in fp32: mean, then the mean square of the deviations
    s = tl.where(live, total.to(tl.float32), 0.0)
    mean = tl.sum(s, axis=1) / C
    dev = tl.where(live, s - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt_rn(tl.sum(dev * dev, axis=1) / C + eps)
    w = tl.load(w_ptr + c, mask=live_c).to(tl.float32)
    nb = tl.load(nb_ptr + c, mask=live_c).to(tl.float32)
    normed = dev * rstd[:, None] * w[None, :] + nb[None, :]
    tl.store(norm_ptr + offs, normed.to(norm_ptr.dtype.element_ty), mask=live)


def scale_add_norm_(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor, eps: float, out: torch.Tensor, normed: torch.Tensor, product: torch.dtype) -> None:
    """Write ``x + branch * gamma`` into ``out`` (which may be ``x``: each program reads its rows before writing
    them) and its LayerNorm into ``normed`` (whole rows per program; the caller checked shapes, layouts and that a
    row fits one block)."""
    C = x.shape[-1]
    rows = x.numel() // C
    block_c = triton.next_power_of_2(C)
    block_r = max(1, 4096 // block_c)
    grid = (triton.cdiv(rows, block_r),)
    _scale_add_norm_kernel[grid](x, branch, gamma, weight, bias, out, normed, rows, C, eps, PRODUCT=_TL[product],
                                 BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4, enable_fp_fusion=False)


def scale_add_(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor, out: torch.Tensor, product: torch.dtype) -> None:
    """Write ``x + (branch * gamma rounded to product)`` into ``out`` (the caller checked shapes and layouts)."""
    C = x.shape[-1]
    rows = x.numel() // C
    block_c = min(triton.next_power_of_2(C), 1024)
    block_r = max(1, 4096 // block_c)
    grid = (triton.cdiv(rows, block_r), triton.cdiv(C, block_c))
    _scale_add_kernel[grid](x, branch, gamma, out, rows, C, PRODUCT=_TL[product], BLOCK_R=block_r, BLOCK_C=block_c,
                            num_warps=4, enable_fp_fusion=False)
