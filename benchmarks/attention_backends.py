#!/usr/bin/env python
"""Micro-benchmark: every attention kernel available on this GPU at VGGT's attention shapes (16 heads of 64, bf16).

    python benchmarks/attention_backends.py --out benchmarks/results/nvidia-h100-80gb-hbm3/attention_backends.json

Shapes (a frame is 1374 tokens: 37 x 37 patches of a 518 px image + 5 special tokens):
  - ``frame S``: frame attention at S frames, B*S sequences of 1374 tokens;
  - ``global S``: global attention at S frames, one sequence of S*1374 tokens;
  - ``kv r S``: ``kv_subsample`` at stride r, S*1374 queries over the kept keys (5 + ceil(37/r)² per frame), with
    the log-sum-exp returned (the kernels that can).

Kernels: torch's SDPA backends forced one at a time (``cudnn``, ``flash`` = FlashAttention-2, ``efficient``;
``math`` only at the smallest shape), FlashAttention-4 when ``flash-attn-4`` imports (``fa4``), and for the ``kv``
shapes the log-sum-exp entry points (``flash+lse``, ``fa4+lse``, and cuDNN's, whose log-sum-exp is checked for NaN).
Each: ``--warmup`` calls, then ``--repeats`` calls between CUDA events, median (``ms``: one call at a time, its
host-side launch cost included when that exceeds the GPU time, as in an eager forward); ``ms_graph``: per call,
from ``GRAPH_CALLS`` calls (one for calls of 5 ms or more) captured in one CUDA graph (GPU time alone, as
``cuda_graphs`` replays a forward of a few frames, or as an eager forward whose GPU queue is full). TFLOP/s counts
4·N·K·d per head, from ``ms``.
Error: ‖out − ref‖/‖ref‖ on the first 512 queries of every head against float64 on the same inputs, and for
log-sum-exp the largest absolute difference. Writes a table to stdout and JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from qk_norm_rope_bench import graph_timed, timed  # this script's folder: benchmarks/
from vggt_turbo.kernels import flash_attention_4 as fa4
from vggt_turbo.kernels.attention import AttentionPolicy

log = logging.getLogger("attention_backends")

HEADS, HEAD_DIM, GRID, SPECIAL = 16, 64, 37, 5
TOKENS = SPECIAL + GRID * GRID  # 1374
REF_QUERIES = 512
GRAPH_CALLS = 20


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frame", default="10,100", help="frame attention at these frame counts (default %(default)s)")
    p.add_argument("--global", dest="global_", default="10,100,200", help="global attention frame counts (%(default)s)")
    p.add_argument("--kv", default="2:100,4:100,4:200", help="kv_subsample STRIDE:FRAMES shapes (%(default)s)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="JSON output path")
    return p.parse_args(argv)


def _ints(spec: str) -> list[int]:
    return [int(s) for s in spec.split(",") if s.strip()]


def _kernels(lse: bool) -> dict[str, Callable[..., Any]]:
    """Name -> callable(q, k, v) -> (out, lse or None), for the kernels this machine offers."""
    out: dict[str, Callable[..., Any]] = {}
    if lse:
        out["flash+lse"] = AttentionPolicy.for_backend("flash").attend_with_lse
        if fa4.is_installed():
            out["fa4+lse"] = lambda q, k, v: fa4.attention(q, k, v, return_lse=True)
        op = getattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", None)
        if op is not None:
            out["cudnn+lse"] = lambda q, k, v: _cudnn_lse(op, q, k, v)
        return out
    for name in ("cudnn", "flash", "efficient", *(("fa4",) if fa4.is_installed() else ())):
        out[name] = _plain(AttentionPolicy.for_backend(name))
    return out


def _plain(policy: AttentionPolicy) -> Callable[..., Any]:
    """``policy.attend`` as a kernel of this table: (out, no log-sum-exp)."""
    return lambda q, k, v: (policy.attend(q, k, v), None)


def _cudnn_lse(op: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    names = {a.name for a in op.default._schema.arguments}
    options = {"attn_bias": None, "compute_log_sumexp": True, "dropout_p": 0.0, "is_causal": False,
               "return_debug_mask": False}
    result = op(q, k, v, **{key: val for key, val in options.items() if key in names})
    return result[0], result[1].flatten(2)[..., : q.shape[-2]].float()


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 attention and log-sum-exp of the first ``REF_QUERIES`` queries of every head (keys in chunks)."""
    qs = q[:, :, :REF_QUERIES].double()
    scores = torch.cat([qs @ kc.double().transpose(-2, -1) for kc in k.split(65536, dim=2)], dim=-1)
    scores *= q.shape[-1] ** -0.5
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    del scores
    out = sum(pc @ vc.double() for pc, vc in zip(probs.split(65536, dim=-1), v.split(65536, dim=2)))
    return out, lse


def _inputs(batch: int, queries: int, keys: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, ...]:
    """q, k, v as VGGT's attention gets them: (B, H, N, d) strided views of a token-major qkv projection output;
    ``keys``: indices of the tokens whose k, v are kept (``kv_subsample``), gathered into new tensors."""
    qkv = torch.randn(batch, queries, 3, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    if keys is not None:
        k, v = k.index_select(2, keys), v.index_select(2, keys)
    return q, k, v


def _kept(frames: int, stride: int) -> torch.Tensor:
    rows = torch.arange(0, GRID, stride)
    local = torch.cat([torch.arange(SPECIAL), SPECIAL + (rows[:, None] * GRID + rows).flatten()])
    return (torch.arange(frames)[:, None] * TOKENS + local).flatten().cuda()


def measure(shape: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lse: bool, args: argparse.Namespace,
            math_ok: bool = False) -> list[dict[str, Any]]:
    B, H, N, d = q.shape
    flops = 4.0 * B * H * N * k.shape[2] * d
    ref_out, ref_lse = _reference(q, k, v)
    rows = []
    kernels = _kernels(lse)
    if math_ok and not lse:
        kernels["math"] = _plain(AttentionPolicy.for_backend("math"))
    for name, kernel in kernels.items():
        row: dict[str, Any] = {"shape": shape, "kernel": name, "B": B, "N": N, "K": k.shape[2]}
        try:
            with torch.no_grad():
                out, got_lse = kernel(q, k, v)
                part = out[:, :, :REF_QUERIES].double()
                row["rel_err"] = float((part - ref_out).norm() / ref_out.norm())
                if got_lse is not None:
                    diff = got_lse[:, :, :REF_QUERIES].double() - ref_lse
                    row["lse_nan"] = bool(torch.isnan(got_lse).any())
                    row["lse_max_abs_err"] = float(diff.abs().max())
                del out, got_lse
                seconds = statistics.median(timed(lambda: kernel(q, k, v), args.warmup, args.repeats)) / 1e3
                calls = GRAPH_CALLS if seconds < 0.005 else 1  # long calls: launch costs are nothing beside them
                graph_ms = statistics.median(graph_timed(lambda: kernel(q, k, v), args.repeats, calls))
            row.update(ms=round(seconds * 1e3, 3), tflops=round(flops / seconds / 1e12, 1), ms_graph=round(graph_ms, 4))
        except Exception as err:  # a kernel that cannot run this shape: recorded, the sweep goes on
            row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
            torch.cuda.empty_cache()
        log.info("%-14s %-10s %s", shape, name, {k_: v_ for k_, v_ in row.items() if k_ not in ("shape", "kernel")})
        rows.append(row)
    return rows


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    args = parse(argv)
    if not torch.cuda.is_available():
        log.error("attention_backends needs a CUDA device")
        return 2
    torch.manual_seed(0)
    rows: list[dict[str, Any]] = []
    for i, frames in enumerate(_ints(args.frame)):
        rows += measure(f"frame {frames}", *_inputs(frames, TOKENS), lse=False, args=args, math_ok=i == 0)
    for frames in _ints(args.global_):
        rows += measure(f"global {frames}", *_inputs(1, frames * TOKENS), lse=False, args=args)
        torch.cuda.empty_cache()
    for item in (s for s in args.kv.split(",") if s.strip()):
        stride, frames = (int(x) for x in item.split(":"))
        rows += measure(f"kv {stride} {frames}", *_inputs(1, frames * TOKENS, _kept(frames, stride)), lse=True,
                        args=args)
        torch.cuda.empty_cache()
    meta = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "flash_attn_4": _version("flash-attn-4"),
        "nvidia_cutlass_dsl": _version("nvidia-cutlass-dsl"),
        "python": platform.python_version(),
        "heads": HEADS, "head_dim": HEAD_DIM, "dtype": "bfloat16",
        "method": f"median of {args.repeats} calls after {args.warmup} warm-up calls, CUDA events (ms); ms_graph: "
                  f"median replay of {GRAPH_CALLS} calls (1 from 5 ms) captured in one CUDA graph, per call; rel_err on the "
                  f"first {REF_QUERIES} queries of every head against float64",
    }
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        log.info("wrote %s", args.out)
    return 0


def _version(dist: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
