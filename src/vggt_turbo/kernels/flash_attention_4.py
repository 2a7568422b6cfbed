"""FlashAttention-4 (PyPI ``flash-attn-4``: the CuTe-DSL FlashAttention, with Hopper and Blackwell kernels) as an
optional, auto-detected attention kernel; ``attention.fa4.FlashAttention4`` is its backend in the dispatcher.

Why: at 100+ frames VGGT's time is global attention at head dim 64, where FlashAttention's Hopper kernels
(warp-specialised ``wgmma`` pipelines that overlap the softmax of one tile with the matrix products of the next)
are the fastest known, ahead of torch's best there, cuDNN (``benchmarks/RESULTS.md``). It also returns each
query's log-sum-exp, which ``kv_subsample`` needs and which cuDNN does not give back through torch
(``attention/lse.py``).

It is optional: nothing here imports it until an attention call asks, and where it is missing, refuses the call
(CPU, fp32, a GPU other than Hopper or Blackwell, autograd on) or fails, torch's kernels run instead. A failure is
logged once and the package is not tried again by that attention policy (``attention/fa4.py``); a missing package
is not an error.

Exact to bf16 rounding: the same softmax(q kᵀ/√d) v in fp32 accumulation, rounded to the input dtype once; it
differs from cuDNN's result by the order of the accumulations (the benchmarks report the difference per output).
Its PyTorch reference is torch's SDPA (``attention/torch_sdpa.py``).

Layout: q, k, v come as (B, H, N, d) (torch's SDPA layout), usually strided views of VGGT's fused qkv projection,
whose memory is token-major. FlashAttention takes (B, N, H, d) with a unit last stride, so the transposed views go
in without a copy, and its token-major output comes back as a (B, H, N, d) view whose ``transpose(1, 2)`` before
the output projection is again a view.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable, Optional

import torch

log = logging.getLogger(__name__)

# Compute capabilities whose kernels the package ships (Hopper 9.x, Blackwell 10.x). Measured here on an H100 only.
_ARCHS = (9, 10)
_DTYPES = (torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def _function() -> Optional[Callable[..., Any]]:
    """``flash_attn.cute.flash_attn_func``, or None when the package (or its CUDA libraries) cannot be imported."""
    try:
        from flash_attn.cute import flash_attn_func
    except Exception as err:  # ImportError, or a CUDA library missing under it
        log.debug("vggt_turbo: FlashAttention-4 not available (%s: %s)", type(err).__name__, err)
        return None
    return flash_attn_func


def is_installed() -> bool:
    """Whether ``flash_attn.cute`` imports (it is an optional dependency: ``pip install flash-attn-4``)."""
    return _function() is not None


def refusal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Optional[str]:
    """Why FlashAttention-4 cannot run this call, or None when it can (checked on the host, before any launch)."""
    if not (q.is_cuda and k.is_cuda and v.is_cuda):
        return "tensors not on a CUDA device"
    if not (q.dtype == k.dtype == v.dtype and q.dtype in _DTYPES):
        return f"dtype {q.dtype} (fp16 or bf16 needed)"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "autograd on (inference only here)"
    if q.shape[-1] % 8 or not 8 <= q.shape[-1] <= 128 or v.shape[-1] != q.shape[-1]:
        return f"head dim {q.shape[-1]}"
    capability = torch.cuda.get_device_capability(q.device)
    if capability[0] not in _ARCHS:
        return f"compute capability {capability} (Hopper or Blackwell needed)"
    if not is_installed():
        return "flash-attn-4 is not installed"
    return None


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_lse: bool = False
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """softmax(q kᵀ/√d) v for (B, H, N, d) q and (B, H, K, d) k, v, as a (B, H, N, d) view of a token-major
    output, and (``return_lse``) the natural log-sum-exp of each query's scaled scores, fp32 (B, H, N).

    Call only after ``refusal`` returned None. Raises what the package raises (``attention.fa4`` turns that into a
    refusal).
    """
    function = _function()
    assert function is not None
    # The package compiles for and launches on the current device (and its current stream).
    with torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext():
        result = function(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
            softmax_scale=q.shape[-1] ** -0.5, causal=False, return_lse=return_lse,
        )
    out, lse = result if isinstance(result, tuple) else (result, None)
    if return_lse and (lse is None or tuple(lse.shape) != tuple(q.shape[:-1])):
        raise RuntimeError(f"FlashAttention-4 returned a log-sum-exp of shape {getattr(lse, 'shape', None)}")
    return out.transpose(1, 2), (lse.float() if return_lse else None)

