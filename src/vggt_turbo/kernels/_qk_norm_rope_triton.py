"""The Triton kernel behind ``qk_norm_rope``: imported only when it runs, since importing it needs triton.

One program normalises and rotates ``ROWS`` rows, a row being the ``D`` features of one token's q (or k) in one
head. Rows are numbered in the memory order of the fused projection's output (token, then q/k, then head), so
consecutive programs stream through it. All arithmetic is fp32; the result is rounded once, by the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

ELEMENTS_PER_PROGRAM = 2048  # 32 rows of 64 features: enough work per program to hide the index arithmetic
NUM_WARPS = 4


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    q_weight_ptr,
    q_bias_ptr,
    k_weight_ptr,
    k_bias_ptr,
    rows,
    tokens,
    heads,
    stride_b,
    stride_n,
    stride_qkv,
    stride_h,
    pos_stride_b,
    pos_stride_n,
    pos_stride_axis,
    table_stride,
    q_eps,
    k_eps,
    D: tl.constexpr,
    ROWS: tl.constexpr,
):
    row = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    live = row < rows
    head = row % heads
    is_k = (row // heads) % 2
    token = row // (2 * heads)
    n = (token % tokens).to(tl.int64)  # int64: a long sequence's offsets pass 2**31
    b = (token // tokens).to(tl.int64)
    base = b * stride_b + n * stride_n + is_k * stride_qkv + head * stride_h

    col = tl.arange(0, D)
    partner = col ^ (D // 4)  # the feature RoPE pairs with `col`: same half, other quarter
    mask = live[:, None]
    x = tl.load(qkv_ptr + base[:, None] + col[None, :], mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(qkv_ptr + base[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)

    # LayerNorm over the row (biased variance, as torch), with q_norm's or k_norm's parameters.
    key = is_k[:, None] == 1
    weight = tl.where(key, tl.load(k_weight_ptr + col), tl.load(q_weight_ptr + col)).to(tl.float32)
    bias = tl.where(key, tl.load(k_bias_ptr + col), tl.load(q_bias_ptr + col)).to(tl.float32)
    weight_p = tl.where(key, tl.load(k_weight_ptr + partner), tl.load(q_weight_ptr + partner)).to(tl.float32)
    bias_p = tl.where(key, tl.load(k_bias_ptr + partner), tl.load(q_bias_ptr + partner)).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    centred = x - mean[:, None]
    var = tl.sum(centred * centred, axis=1) / D
    rstd = tl.rsqrt(var + tl.where(is_k == 1, k_eps, q_eps))[:, None]
    normed = centred * rstd * weight + bias
    normed_p = (x_partner - mean[:, None]) * rstd * weight_p + bias_p

    # RoPE-2D: the first half of the features turns with the y position, the second with x; in each half the
    # first quarter pairs with the negated second quarter (upstream's rotate: cat(-x2, x1)).
    half = D // 2
    pos_base = b * pos_stride_b + n * pos_stride_n
    pos_y = tl.load(pos_ptr + pos_base, mask=live, other=0)
    pos_x = tl.load(pos_ptr + pos_base + pos_stride_axis, mask=live, other=0)
    pos = tl.where(col[None, :] < half, pos_y[:, None], pos_x[:, None])
    entry = pos * table_stride + (col % half)[None, :]
    cos = tl.load(cos_ptr + entry, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + entry, mask=mask, other=0.0).to(tl.float32)
    sign = tl.where((col % half) < D // 4, -1.0, 1.0)[None, :]
    out = normed * cos + (sign * normed_p) * sin

    tl.store(qkv_ptr + base[:, None] + col[None, :], out.to(qkv_ptr.dtype.element_ty), mask=mask)


def qk_norm_rope_(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    q_norm: torch.nn.LayerNorm,
    k_norm: torch.nn.LayerNorm,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """Overwrite q and k in ``qkv`` (B, N, 3, H, D) with RoPE(LayerNorm(.)); the caller checked the inputs."""
    B, N, _, H, D = qkv.shape
    rows = B * N * 2 * H
    if rows == 0:
        return
    block = max(1, ELEMENTS_PER_PROGRAM // D)
    _qk_norm_rope_kernel[(triton.cdiv(rows, block),)](
        qkv,
        positions,
        cos,
        sin,
        q_norm.weight,
        q_norm.bias,
        k_norm.weight,
        k_norm.bias,
        rows,
        N,
        H,
        qkv.stride(0),
        qkv.stride(1),
        qkv.stride(2),
        qkv.stride(3),
        positions.stride(0),
        positions.stride(1),
        positions.stride(2),
        cos.stride(0),
        float(q_norm.eps),
        float(k_norm.eps),
        D=D,
        ROWS=block,
        num_warps=NUM_WARPS,
    )
