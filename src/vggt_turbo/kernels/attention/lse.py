"""Attention that also returns each query's log-sum-exp, on torch's fused kernels, and its PyTorch reference.

Why: attention over keys that come in parts (for ``kv_subsample``: keys shared by all queries, plus a few keys of
each query's own) is exact when the parts' normalised outputs are merged with weights ``exp(lse_part)``, so no
(queries x keys) score matrix has to exist. ``F.scaled_dot_product_attention`` does not return the log-sum-exp;
torch's kernel entry points do (all return the natural log-sum-exp of the scaled scores, in float32):

    device  name        op (torch.ops.aten.*)                           dtypes            log-sum-exp shape
    CUDA    flash       _scaled_dot_product_flash_attention             fp16, bf16        (B, H, N)
    CUDA    efficient   _scaled_dot_product_efficient_attention         fp16, bf16, fp32  (B, H, N rounded up to 32)
    CPU     flash       _scaled_dot_product_flash_attention_for_cpu     all float         (B, H, N)
    any     math        ``reference``: token-chunked matmul and softmax in fp32 (one chunk of queries' scores at a time)

Their signatures changed between torch releases (``efficient`` gained ``attn_bias`` and ``compute_log_sumexp``),
so the optional arguments are passed by the names the installed op's schema declares. cuDNN's entry point
(``_scaled_dot_product_cudnn_attention``) is not offered: in one earlier run on an H100 with torch 2.11 its
log-sum-exp came back as NaN in bf16; ``benchmarks/attention_backends.py`` later measured it correct at the
``kv_subsample`` shapes of 100-200 frames (within 2e-6 of float64), but it has not been checked at every shape, so
``sdpa_backend="cudnn"`` refuses calls that need the log-sum-exp instead of risking wrong results.
``reference`` is their PyTorch reference (the ``math`` backend): the same results in fp32, on any device.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .backend import KernelRefused

_OPS = {
    ("cuda", "flash"): "_scaled_dot_product_flash_attention",
    ("cuda", "efficient"): "_scaled_dot_product_efficient_attention",
    ("cpu", "flash"): "_scaled_dot_product_flash_attention_for_cpu",
}
# Given to every kernel whose schema names them: no mask, no dropout, not causal, and the log-sum-exp wanted.
_OPTIONS: dict[str, Any] = {
    "attn_bias": None,
    "compute_log_sumexp": True,
    "dropout_p": 0.0,
    "is_causal": False,
    "return_debug_mask": False,
}
_HALF = (torch.float16, torch.bfloat16)
_MATH_SCORES = 2**26  # score entries per chunk of the math reference (256 MiB in fp32)


def _op(device_type: str, name: str) -> Optional[Any]:
    """The installed kernel entry point, or None (looked up per call, so tests can spy on it)."""
    op_name = _OPS.get((device_type, name))
    return getattr(torch.ops.aten, op_name, None) if op_name is not None else None


def refusal(q: torch.Tensor, name: str) -> Optional[str]:
    """Why the kernel ``name`` cannot return the log-sum-exp for ``q``, or None."""
    if name == "math":
        return None
    if _op(q.device.type, name) is None:
        return f"no {name!r} attention kernel returning the log-sum-exp on {q.device.type} in torch {torch.__version__}"
    if name == "flash" and q.device.type == "cuda" and q.dtype not in _HALF:
        return f"dtype {q.dtype} (fp16 or bf16 needed)"
    return None


def fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``softmax(q kᵀ / sqrt(d)) v`` (q's dtype) and the log-sum-exp of each query's scaled scores (float32,
    (B, H, N)) on torch's kernel ``name``, for (B, H, N, d) queries and (B, H, K, d) keys and values of one dtype.
    Call only after ``refusal`` returned None; ``KernelRefused`` when the kernel refuses the call."""
    op = _op(q.device.type, name)
    assert op is not None
    names = {arg.name for arg in op.default._schema.arguments}
    try:
        result = op(q, k, v, **{key: value for key, value in _OPTIONS.items() if key in names})
    except RuntimeError as err:
        raise KernelRefused(str(err)) from err
    out, lse = result[0], result[1]
    lse = lse.flatten(2)[..., : q.shape[-2]]  # efficient pads N to a multiple of 32
    if lse.shape != q.shape[:-1]:
        raise KernelRefused(f"it returned a log-sum-exp of shape {tuple(result[1].shape)} (none computed?)")
    return out, lse.float()


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``fused``'s PyTorch reference (``sdpa_backend="math"``): the computation in fp32, a chunk of queries at a
    time (autocast off: fp32 is meant)."""
    B, H, N, d = q.shape
    rows = max(1, _MATH_SCORES // (B * H * k.shape[-2]))
    outs, lses = [], []
    with torch.autocast(q.device.type, enabled=False):
        keys_t, values = k.float().transpose(-2, -1), v.float()
        for chunk in q.split(rows, dim=-2):
            scores = (chunk.float() @ keys_t) * d**-0.5
            lse = torch.logsumexp(scores, dim=-1)
            outs.append((torch.exp(scores - lse.unsqueeze(-1)) @ values).to(q.dtype))
            lses.append(lse)
    return torch.cat(outs, dim=-2), torch.cat(lses, dim=-1)
