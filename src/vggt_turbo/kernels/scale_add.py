"""``x + branch * gamma`` in one pass: a transformer block's LayerScale and residual add.

Why: upstream's ``Block.forward`` runs ``x = x + ls(branch)`` as two kernels, each reading and writing the whole
token tensor: the LayerScale product (``branch * gamma``, ``gamma`` broadcast over the tokens, which sends PyTorch
to its slower non-vectorised kernel) and the sum (their time in a profile: benchmarks/RESULTS.md). One
kernel reads ``x`` and ``branch`` once and writes the sum once.

Exact, bit for bit: PyTorch's arithmetic in the same order with the same roundings: the product is computed in
fp32 and rounded to its dtype (``branch``'s and ``gamma``'s promoted), then the sum is computed in fp32 and
rounded to the result dtype (``x``'s and the product's promoted). No fused multiply-add (it would round once).

``scale_add_norm`` also returns the LayerNorm of the sum that the block applies next (``norm2``), from the same
pass: the sum is read back from registers instead of from memory by a separate norm kernel. The sum stays bit for
bit; the norm is PyTorch's formula in fp32 (mean, then the mean square of the deviations, ``1/sqrt(var + eps)``)
with a different summation order than PyTorch's Welford kernel, so it can differ from it by an ulp of the output
dtype. ``norm_dtype`` writes the norm in another dtype than the sum's: under autocast the residual sum stays fp32
as upstream keeps it, while the norm goes straight to the bf16 that the next matmul would cast it to (one rounding
of the fp32 norm either way), so the pass writes half the bytes for it.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from . import triton_installed

KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def reference(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x + branch * gamma`` as upstream computes it (into ``out`` when given, which may be ``x``)."""
    if out is None:
        return x + branch * gamma
    return torch.add(x, branch * gamma, out=out)


def scale_add(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``reference(x, branch, gamma, out)``, by the Triton kernel when it covers the call."""
    product, dtype = _dtypes(x, branch, gamma)
    if x.is_cuda and triton_covers(x, branch, gamma, out, dtype):
        from ._scale_add_triton import scale_add_

        result = out if out is not None else torch.empty_like(x, dtype=dtype)
        scale_add_(x, branch, gamma, result, product)
        return result
    return reference(x, branch, gamma, out)


def reference_norm(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, out: Optional[torch.Tensor] = None, norm_dtype: Optional[torch.dtype] = None,
                   norm_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, layer_norm(s))`` with ``s = x + branch * gamma`` (written into ``out`` when given), as upstream's
    blocks compute them; the norm rounded to ``norm_dtype`` when given, and written into ``norm_out`` (of that
    dtype) when given."""
    total = reference(x, branch, gamma, out)
    normed = F.layer_norm(total, (total.shape[-1],), weight, bias, eps)
    normed = normed if norm_dtype is None else normed.to(norm_dtype)
    return total, normed if norm_out is None else norm_out.copy_(normed)


def scale_add_norm(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float, out: Optional[torch.Tensor] = None, norm_dtype: Optional[torch.dtype] = None,
                   norm_out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``reference_norm(...)``, by one Triton kernel when it covers the call: ``scale_add``'s conditions, rows of
    at most ``NORM_MAX_C`` elements (one program holds a whole row), a contiguous affine ``weight`` and ``bias`` of
    the sum's dtype, and a ``norm_out`` (if any) that is a fresh contiguous buffer like ``out``."""
    product, dtype = _dtypes(x, branch, gamma)
    normed_dtype = norm_dtype or dtype
    if (
        x.is_cuda
        and triton_covers(x, branch, gamma, out, dtype)
        and _norm_covered(x, weight, bias, dtype)
        and (norm_out is None or _fresh_buffer(norm_out, x, branch, normed_dtype))
    ):
        from ._scale_add_triton import scale_add_norm_

        total = out if out is not None else torch.empty_like(x, dtype=dtype)
        normed = norm_out if norm_out is not None else torch.empty_like(total, dtype=normed_dtype)
        scale_add_norm_(x, branch, gamma, weight, bias, eps, total, normed, product)
        return total, normed
    return reference_norm(x, branch, gamma, weight, bias, eps, out, norm_dtype, norm_out)


NORM_MAX_C = 1024  # the widest row one program normalises (VGGT's blocks and DINOv2 ViT-L: 1024)


def _norm_covered(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype) -> bool:
    C = x.shape[-1]
    return C <= NORM_MAX_C and all(
        isinstance(t, torch.Tensor) and t.shape == (C,) and t.dtype == dtype and t.device == x.device and t.is_contiguous()
        for t in (weight, bias)
    )


def _dtypes(x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor) -> tuple[torch.dtype, torch.dtype]:
    """The product's dtype and the result's, by PyTorch's promotion."""
    product = torch.promote_types(branch.dtype, gamma.dtype)
    return product, torch.promote_types(x.dtype, product)


def triton_covers(
    x: torch.Tensor, branch: torch.Tensor, gamma: torch.Tensor, out: Optional[torch.Tensor], dtype: torch.dtype
) -> bool:
    """Whether the kernel runs this call: contiguous ``x`` and ``branch`` of one shape, a contiguous 1-D ``gamma``
    over their last dimension, float dtypes, one device, and ``out`` either None, ``x`` of the result ``dtype``
    (elementwise, so in place is safe) or a fresh buffer (``_fresh_buffer``)."""
    if not (triton_installed() and x.dim() >= 1 and x.shape == branch.shape and gamma.dim() == 1):
        return False
    if gamma.shape[0] != x.shape[-1] or x.numel() == 0:
        return False
    if out is not None and not (out is x and x.dtype == dtype) and not (out is not x and _fresh_buffer(out, x, branch, dtype)):
        return False
    return all(t.dtype in KERNEL_DTYPES and t.device == x.device and t.is_contiguous() for t in (x, branch, gamma))


def _fresh_buffer(buffer: torch.Tensor, x: torch.Tensor, branch: torch.Tensor, dtype: torch.dtype) -> bool:
    """A contiguous tensor of ``x``'s shape and device, of ``dtype``, sharing memory with neither input (a slice of
    a preallocated result)."""
    own = buffer.untyped_storage().data_ptr()
    return (
        buffer.shape == x.shape
        and buffer.dtype == dtype
        and buffer.device == x.device
        and buffer.is_contiguous()
        and all(own != t.untyped_storage().data_ptr() for t in (x, branch))
    )
