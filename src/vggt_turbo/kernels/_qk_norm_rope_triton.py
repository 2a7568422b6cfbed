"""The Triton kernel behind ``qk_norm_rope``: imported only when it runs, since importing it needs triton.

One program per token: its q and k of all heads as one (2 * HP, D) tile (HP: the head count rounded up to a power
of two, the extra rows masked). The positions, the cos/sin rows and the norm parameters are loaded once per
program, each element once; the RoPE partner of a feature (the other quarter of its half) comes from the normalised
tile with the quarters of each half swapped in registers. All arithmetic is fp32; the result is rounded once, by the
store. The tile is held in registers, so ``qk_norm_rope.triton_covers`` limits it to ``MAX_TILE`` elements.

It replaced a kernel (up to e32ca64) that ran one program per 32 rows of one head, loaded each element twice and
gathered the cos/sin tables per element (``benchmarks/qk_norm_rope_bench.py`` times both; figures in
benchmarks/RESULTS.md). The two gave equal outputs, bit for bit, in the Triton interpreter (the GPU tests compare this one with
the PyTorch reference).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NUM_WARPS = 4  # VGGT's tile, 2 * 16 heads of 64: 16 fp32 elements a thread in each copy of it


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
    HP: tl.constexpr,
):
    # One token: rows 0 .. HP - 1 of the tile are its q heads, HP .. 2 * HP - 1 its k heads (heads >= H masked).
    token = tl.program_id(0)
    n = (token % tokens).to(tl.int64)  # int64: a long sequence's offsets pass 2**31
    b = (token // tokens).to(tl.int64)
    r = tl.arange(0, 2 * HP)
    is_k = r // HP
    head = r % HP
    live = head < heads
    col = tl.arange(0, D)
    base = b * stride_b + n * stride_n
    offsets = base + (is_k * stride_qkv + head * stride_h)[:, None] + col[None, :]
    mask = live[:, None]
    x = tl.load(qkv_ptr + offsets, mask=mask, other=0.0).to(tl.float32)

    # LayerNorm over each row (biased variance, as torch), with q_norm's or k_norm's parameters, each loaded once.
    key = is_k[:, None] == 1
    weight = tl.where(key, tl.load(k_weight_ptr + col)[None, :], tl.load(q_weight_ptr + col)[None, :])
    bias = tl.where(key, tl.load(k_bias_ptr + col)[None, :], tl.load(q_bias_ptr + col)[None, :])
    mean = tl.sum(x, axis=1) / D
    centred = x - mean[:, None]
    var = tl.sum(centred * centred, axis=1) / D
    rstd = tl.rsqrt(var + tl.where(is_k == 1, k_eps, q_eps))[:, None]
    normed = centred * rstd * weight.to(tl.float32) + bias.to(tl.float32)
    # The RoPE partner of feature `col` is `col ^ (D // 4)`: the other quarter of the same half. Swapping the two
    # quarters of each half of the normed tile gives what the "rows" kernel computes from a second load (the same
    # operations on the same operands, the weight and bias swapped alike); tl.flip over a dimension of 2 is exact
    # (it moves bits).
    normed_p = tl.reshape(tl.flip(tl.reshape(normed, (2 * HP, 2, 2, D // 4)), 2), (2 * HP, D))

    # RoPE-2D: the first half of the features turns with the y position, the second with x; in each half the
    # first quarter pairs with the negated second quarter (upstream's rotate: cat(-x2, x1)). One token, one
    # (cos, sin) row of D for all its rows.
    half = D // 2
    pos_base = b * pos_stride_b + n * pos_stride_n
    pos_y = tl.load(pos_ptr + pos_base)
    pos_x = tl.load(pos_ptr + pos_base + pos_stride_axis)
    entry = tl.where(col < half, pos_y, pos_x) * table_stride + col % half
    cos = tl.load(cos_ptr + entry).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + entry).to(tl.float32)[None, :]
    sign = tl.where((col % half) < D // 4, -1.0, 1.0)[None, :]
    out = normed * cos + (sign * normed_p) * sin

    tl.store(qkv_ptr + offsets, out.to(qkv_ptr.dtype.element_ty), mask=mask)


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
    if B * N * H == 0:
        return
    _qk_norm_rope_kernel[(B * N,)](
        qkv, positions, cos, sin, q_norm.weight, q_norm.bias, k_norm.weight, k_norm.bias,
        N, H, *qkv.stride()[:4], *positions.stride(), cos.stride(0), float(q_norm.eps), float(k_norm.eps),
        D=D, HP=triton.next_power_of_2(H), num_warps=NUM_WARPS,
    )
