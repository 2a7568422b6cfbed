"""qk-norm + RoPE-2D of VGGT's attention in one pass over the fused qkv projection's output.

Upstream normalises q and k (``LayerNorm`` over the head dim) and rotates them (RoPE-2D) in about ten elementwise
kernels, each reading and writing a full-size q or k. Under bf16 autocast the LayerNorm and RoPE run in fp32 (the
norms autocast to fp32 on CUDA) and SDPA then casts q and k back to bf16: several full-size fp32 temporaries per
layer. The Triton kernel reads q and k once from the (B, N, 3, H, D) projection output, does the same fp32
arithmetic in registers and writes them back *in place* into that buffer: no full-size temporary exists.

Arithmetic (both paths): LayerNorm and RoPE in ``compute_dtype`` (fp32; fp64 for fp64 inputs) with the caller's
table (upstream's own for that dtype, so the angles are upstream's bit for bit), then one rounding to the dtype SDPA
computes in (``attention_dtype``). Under bf16 autocast on CUDA that is upstream's arithmetic, the final rounding
being the one autocast makes before SDPA; in fp32 and fp64 too. For a model run natively in bf16 (no autocast)
upstream rounds after the norm and after each RoPE operation and uses a bf16 table; here nothing is rounded before
the store, which is closer to the fp32 result.

Two implementations with one signature: a Triton kernel (CUDA tensors, triton installed, fp32/fp16/bf16, head dim a
power of two) and a PyTorch reference for everything else, which reproduces upstream's operations one by one (on the
CPU in fp32 it equals upstream to the last bit). Only the kernel writes into ``qkv``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..autocast import autocast_dtype
from . import triton_installed

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The largest (2 * heads rounded up to a power of two) x D tile the kernel holds in registers, several fp32 copies
# of it at once: past 8192 elements (64 a thread at 4 warps) they would spill. VGGT's is 2 * 16 x 64 = 2048.
MAX_TILE = 8192

QKV = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def qk_norm_rope(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    q_norm: nn.LayerNorm,
    k_norm: nn.LayerNorm,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> QKV:
    """q, k, v in (B, H, N, D) for SDPA, q and k normalised and rotated; the Triton kernel when it applies.

    Args:
        qkv: (B, N, 3, H, D) output of the fused projection, last dim contiguous. Consumed: its q and k parts
            may be overwritten.
        positions: (B, N, 2) integer (y, x) positions, each in ``[0, len(cos))``.
        q_norm, k_norm: LayerNorms over (D,).
        cos, sin: (L, D // 2) tables, as upstream's ``RotaryPositionEmbedding2D._compute_frequency_components``
            gives them for ``compute_dtype(qkv)``.
    """
    check_inputs(qkv, positions, q_norm, k_norm, cos, sin)
    if qkv.is_cuda and triton_covers(qkv, q_norm, k_norm):
        return _triton(qkv, positions, q_norm, k_norm, cos, sin)
    return _reference(qkv, positions, q_norm, k_norm, cos, sin)


def qk_norm_rope_reference(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    q_norm: nn.LayerNorm,
    k_norm: nn.LayerNorm,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> QKV:
    """``qk_norm_rope`` in PyTorch operations, upstream's one for one; leaves ``qkv`` untouched."""
    check_inputs(qkv, positions, q_norm, k_norm, cos, sin)
    return _reference(qkv, positions, q_norm, k_norm, cos, sin)


def qk_norm_rope_triton(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    q_norm: nn.LayerNorm,
    k_norm: nn.LayerNorm,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> QKV:
    """``qk_norm_rope`` by the Triton kernel, in place: q and k are written into ``qkv`` and returned as views.

    Runs on CPU tensors too under ``TRITON_INTERPRET=1`` (how the kernel is tested without a GPU).
    """
    check_inputs(qkv, positions, q_norm, k_norm, cos, sin)
    if not triton_covers(qkv, q_norm, k_norm):
        raise ValueError(
            f"the Triton qk_norm_rope does not cover qkv {tuple(qkv.shape)} {qkv.dtype} with stride "
            f"{qkv.stride()}, attention dtype {attention_dtype(qkv)}, norms with weight and bias "
            f"{_affine(q_norm) and _affine(k_norm)}, triton {'installed' if triton_installed() else 'missing'}"
        )
    return _triton(qkv, positions, q_norm, k_norm, cos, sin)


def attention_dtype(qkv: torch.Tensor) -> torch.dtype:
    """The dtype upstream's SDPA computes in: autocast's when autocast is on (SDPA is on its lower-precision list,
    on CUDA and on the CPU), else that of the projection output (v reaches SDPA as it is)."""
    return autocast_dtype(qkv.device.type) or qkv.dtype


def compute_dtype(qkv: torch.Tensor) -> torch.dtype:
    """The dtype of upstream's qk-norm and RoPE under CUDA autocast (which runs norms in fp32): fp32 for half and
    single precision, fp64 for fp64."""
    return torch.promote_types(qkv.dtype, torch.float32)


def triton_covers(qkv: torch.Tensor, q_norm: nn.LayerNorm, k_norm: nn.LayerNorm) -> bool:
    """Whether the kernel handles these (checked) inputs: triton installed, a half or single precision buffer in
    the dtype SDPA computes in (the in-place store is the one rounding), a power-of-two head dim, a token's q and k
    tile of at most ``MAX_TILE`` elements, affine norms."""
    D = qkv.shape[-1]
    return (
        triton_installed()
        and qkv.dtype in KERNEL_DTYPES
        and attention_dtype(qkv) == qkv.dtype
        and qkv.stride(-1) == 1
        and D >= 4
        and D & (D - 1) == 0
        and 2 * _next_power_of_2(qkv.shape[3]) * D <= MAX_TILE
        and qkv.numel() // D < 2**31  # row numbers are int32 in the kernel
        and _affine(q_norm)
        and _affine(k_norm)
    )


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def check_inputs(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    q_norm: nn.LayerNorm,
    k_norm: nn.LayerNorm,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """Raise ``ValueError``/``TypeError`` naming what does not fit ``qk_norm_rope``'s contract."""
    if qkv.dim() != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv must be (B, N, 3, H, D), got {tuple(qkv.shape)}")
    B, N, _, _, D = qkv.shape
    if D % 4:
        raise ValueError(f"RoPE-2D needs a head dim divisible by 4, got {D}")
    if positions.shape != (B, N, 2):
        raise ValueError(f"positions must be (B, N, 2) = {(B, N, 2)}, got {tuple(positions.shape)}")
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise TypeError(f"positions must be integers, got {positions.dtype}")
    for name, norm in (("q_norm", q_norm), ("k_norm", k_norm)):
        if not isinstance(norm, nn.LayerNorm) or tuple(norm.normalized_shape) != (D,):
            raise TypeError(f"{name} must be a LayerNorm over ({D},), got {norm}")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] != D // 2:
        raise ValueError(f"cos and sin must be (L, {D // 2}) tables, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    devices = {t.device for t in (qkv, positions, cos, sin, *q_norm.parameters(), *k_norm.parameters())}
    if len(devices) > 1:
        raise ValueError(f"qkv, positions, tables and norms must be on one device, got {sorted(map(str, devices))}")


def _reference(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    q_norm: nn.LayerNorm,
    k_norm: nn.LayerNorm,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> QKV:
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    compute, out = compute_dtype(qkv), attention_dtype(qkv)
    cos_rows, sin_rows = _gather(cos, positions), _gather(sin, positions)
    q = _rotate(_layer_norm(q, q_norm, compute), cos_rows, sin_rows).to(out)
    k = _rotate(_layer_norm(k, k_norm, compute), cos_rows, sin_rows).to(out)
    return q, k, v


def _triton(
    qkv: torch.Tensor,
    positions: torch.Tensor,
    q_norm: nn.LayerNorm,
    k_norm: nn.LayerNorm,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> QKV:
    from ._qk_norm_rope_triton import qk_norm_rope_

    qk_norm_rope_(qkv, positions, q_norm, k_norm, cos, sin)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def _affine(norm: nn.LayerNorm) -> bool:
    return norm.weight is not None and norm.bias is not None


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm, dtype: torch.dtype) -> torch.Tensor:
    """The norm in ``dtype``: what CUDA autocast makes of upstream's call (no-op casts for fp32 inputs)."""
    weight = norm.weight.to(dtype) if norm.weight is not None else None
    bias = norm.bias.to(dtype) if norm.bias is not None else None
    return F.layer_norm(x.to(dtype), norm.normalized_shape, weight, bias, norm.eps)


def _gather(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, 1, N, D) table rows: the y position's for the first half of the features, the x position's for the
    second (what upstream's two ``F.embedding`` lookups give, side by side)."""
    return table[positions].flatten(-2).unsqueeze(1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotated(x) * sin``, where each half of the features (y, then x) turns its quarters (a, b) into
    (-b, a): upstream's RoPE-2D over both halves in one set of operations, the same per element."""
    a, b = x.unflatten(-1, (2, 2, -1)).unbind(-2)
    rotated = torch.stack((-b, a), dim=-2).flatten(-3)
    return x * cos + rotated * sin
