"""The Triton kernel behind ``bilinear``: imported only when it runs, since importing it needs triton.

One program computes a tile of ``BLOCK_P`` output pixels by ``BLOCK_C`` channels. The interpolation weights and
source rows/columns are computed once per pixel and shared by the tile's channels; through the strides the same
kernel reads and writes channels-last (channel stride 1: a pixel's channels are contiguous, loaded as vectors) or
contiguous NCHW tensors. The arithmetic is PyTorch's CUDA kernels', in fp32: source index ``scale * dst``, truncated;
``val = h0 * (w0 * v00 + w1 * v01) + h1 * (w0 * v10 + w1 * v11)`` with the fused multiply-adds that nvcc made of it
in each of PyTorch's two kernels (channels-last of >= 16 channels, and the other), found by comparing bits on an
H100 with torch 2.11 (another build may contract otherwise: then the results differ in the last bit of fp32);
rounded to the output dtype. Then, when given, the addend is added in fp32 and the sum rounded again (what
upstream's separate ``x + pos_embed`` does). The addend is separable, as DPT's positional embedding is: channel c
of pixel (h, w) reads ``cols[w, c]`` for c < ``split`` and ``rows[h, c]`` otherwise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bilinear_kernel(
    x_ptr,
    out_ptr,
    cols_ptr,
    rows_ptr,
    pixels,
    channels,
    in_h,
    in_w,
    out_h,
    out_w,
    scale_h,
    scale_w,
    sx_n,
    sx_c,
    sx_h,
    sx_w,
    so_n,
    so_c,
    so_h,
    so_w,
    split,
    table_stride,
    HAS_ADD: tl.constexpr,
    NHWC_FMAS: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    live = (p < pixels)[:, None] & (c < channels)[None, :]
    w2 = p % out_w
    h2 = (p // out_w) % out_h
    n = (p // (out_w * out_h)).to(tl.int64)  # int64: large outputs pass 2**31 elements

    h1r = scale_h * h2.to(tl.float32)
    h1 = h1r.to(tl.int32)  # truncation (h1r >= 0): PyTorch's int conversion
    h1p = tl.where(h1 < in_h - 1, 1, 0)
    h1l = h1r - h1.to(tl.float32)
    h0l = 1.0 - h1l
    w1r = scale_w * w2.to(tl.float32)
    w1 = w1r.to(tl.int32)
    w1p = tl.where(w1 < in_w - 1, 1, 0)
    w1l = w1r - w1.to(tl.float32)
    w0l = 1.0 - w1l

    cc = c.to(tl.int64)[None, :] * sx_c
    row0 = (n * sx_n + h1.to(tl.int64) * sx_h)[:, None] + cc
    row1 = row0 + (h1p.to(tl.int64) * sx_h)[:, None]
    col0 = (w1.to(tl.int64) * sx_w)[:, None]
    col1 = col0 + (w1p.to(tl.int64) * sx_w)[:, None]
    v00 = tl.load(x_ptr + row0 + col0, mask=live, other=0.0).to(tl.float32)
    v01 = tl.load(x_ptr + row0 + col1, mask=live, other=0.0).to(tl.float32)
    v10 = tl.load(x_ptr + row1 + col0, mask=live, other=0.0).to(tl.float32)
    v11 = tl.load(x_ptr + row1 + col1, mask=live, other=0.0).to(tl.float32)
    h0 = h0l[:, None]
    h1w = h1l[:, None]
    w0 = w0l[:, None]
    w1w = w1l[:, None]
    # PyTorch's two CUDA kernels compile this sum with different fused multiply-adds (nvcc contracts them; Triton
    # would contract others, so fusion is off and each is written out): the same FMAs give the same bits.
    bottom = tl.fma(w0, v10, w1w * v11)
    if NHWC_FMAS:  # upsample_bilinear2d_nhwc_out_frame
        top = tl.fma(w1w, v01, w0 * v00)
    else:  # upsample_bilinear2d_out_frame
        top = tl.fma(w0, v00, w1w * v01)
    val = tl.fma(h0, top, h1w * bottom)
    val = val.to(out_ptr.dtype.element_ty)
    if HAS_ADD:
        from_cols = (c < split)[None, :]
        col_entry = (w2 * table_stride)[:, None] + c[None, :]
        row_entry = (h2 * table_stride)[:, None] + c[None, :]
        addend = tl.where(
            from_cols,
            tl.load(cols_ptr + col_entry, mask=live & from_cols, other=0.0),
            tl.load(rows_ptr + row_entry, mask=live & (c >= split)[None, :], other=0.0),
        ).to(tl.float32)
        val = (val.to(tl.float32) + addend).to(out_ptr.dtype.element_ty)
    o = (n * so_n + h2.to(tl.int64) * so_h + w2.to(tl.int64) * so_w)[:, None] + c.to(tl.int64)[None, :] * so_c
    tl.store(out_ptr + o, val, mask=live)


def bilinear_(
    x: torch.Tensor,
    out: torch.Tensor,
    add: "tuple[torch.Tensor, torch.Tensor, int] | None",
    scale_h: float,
    scale_w: float,
) -> None:
    """Write the align-corners bilinear resize of ``x`` (N, C, H1, W1) into ``out`` (N, C, H2, W2), plus the
    separable addend ``(rows (H2, C), cols (W2, C), split)`` when given (contiguous tables); the caller checked
    the inputs and computed the fp32 scales."""
    N, C, H1, W1 = x.shape
    _, _, H2, W2 = out.shape
    pixels = N * H2 * W2
    if pixels == 0 or C == 0:
        return
    channels_last = out.stride(1) == 1  # PyTorch runs its NHWC kernel for channels-last tensors of >= 16 channels
    # 2048 elements per program: a channels-last tile is up to 64 channels (contiguous) by 32+ pixels; an NCHW
    # tile 256 pixels (contiguous along a row) by a few channels.
    block_c = min(triton.next_power_of_2(C), 64 if channels_last else 8)
    block_p = 2048 // block_c
    rows, cols, split = add if add is not None else (out, out, 0)
    grid = (triton.cdiv(pixels, block_p), triton.cdiv(C, block_c))
    _bilinear_kernel[grid](
        x, out, cols, rows, pixels, C, H1, W1, H2, W2, scale_h, scale_w,
        *x.stride(), *out.stride(), split, C,
        HAS_ADD=add is not None, NHWC_FMAS=channels_last and C >= 16, BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=4, enable_fp_fusion=False,
    )
