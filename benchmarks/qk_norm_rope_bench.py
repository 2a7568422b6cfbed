#!/usr/bin/env python
"""Micro-benchmark: upstream's q_norm + k_norm + RoPE-2D against the fused ``qk_norm_rope`` kernel, at VGGT's shapes.

    python benchmarks/qk_norm_rope_bench.py --out benchmarks/results/qk_norm_rope.json
    python benchmarks/qk_norm_rope_bench.py --frames 1,10 --modes autocast --repeats 5 --out /tmp/q.json

Shapes: 16 heads of 64 features; a frame is 1374 tokens (37 x 37 patches of a 518 px image + 5 special tokens at
position 0). ``frame`` layout: B*S sequences of 1374 tokens (frame attention); ``global``: B sequences of S*1374.

Modes: ``autocast`` (upstream's README: bf16 autocast, fp32 norm weights: qkv is bf16, the norms and RoPE run in
fp32 and SDPA's autocast casts q and k back to bf16 — that cast is timed as part of upstream's work), ``bf16``
(natively in bf16 with bf16 norm weights, as the ``bf16_weights`` patch runs it) and ``fp32``.

Parts: ``qk_norm_rope`` alone, and ``attention``: the same plus SDPA and the transpose to (B, N, C) that ``proj``
reads (the fused kernel hands SDPA strided views of the qkv buffer: this part shows what that layout costs or
saves in the attention kernel).

Upstream runs its own modules (``LayerNorm``, ``RotaryPositionEmbedding2D``) on the strided views of the qkv
buffer, with the RoPE table length published as the exact preset's ``sync_free_rope`` does (no host sync in the
timing). Each variant: ``--warmup`` calls, then ``--repeats`` calls each between CUDA events, median kept; eagerly
(host launch overhead included, as the model runs above ``cuda_graph_max_frames``) and replayed from a CUDA graph
(GPU time alone, as ``cuda_graphs`` runs short sequences). Peak memory: the most allocated during one eager call
above what was allocated before it. Relative error: fused against upstream, on the same input, in the dtype SDPA
computes in. Writes a table to stdout and JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from vggt_turbo.bench.fidelity import relative_error
from vggt_turbo.kernels.attention import AttentionPolicy
from vggt_turbo.kernels.qk_norm_rope import compute_dtype, qk_norm_rope, triton_covers, triton_installed
from vggt_turbo.patches._rope_table import table_published
from vggt_turbo.patches.aggregator.sync_free_rope import rope_forward

log = logging.getLogger("qk_norm_rope_bench")

HEADS, HEAD_DIM, GRID, SPECIAL = 16, 64, 37, 5
TOKENS = SPECIAL + GRID * GRID  # 1374
MODES = {"autocast": torch.bfloat16, "bf16": torch.bfloat16, "fp32": torch.float32}  # qkv dtype
LAYOUTS = ("frame", "global")
PARTS = ("qk_norm_rope", "attention")


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", default="1,10,100", help="frame counts S (default %(default)s)")
    p.add_argument("--batch", type=int, default=1, help="batch size B (default %(default)s)")
    p.add_argument("--layouts", default="frame,global", help="frame and/or global (default %(default)s)")
    p.add_argument("--modes", default="autocast,bf16", help=f"of {','.join(MODES)} (default %(default)s)")
    p.add_argument("--parts", default="qk_norm_rope,attention", help="default %(default)s")
    p.add_argument("--sdpa-backend", default="auto", help="as TurboConfig.sdpa_backend (default %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls first (default %(default)s)")
    p.add_argument("--repeats", type=int, default=20, help="timed calls (default %(default)s)")
    p.add_argument("--out", required=True, type=Path, help="JSON file to write")
    return p.parse_args(argv)


class Case:
    """One shape and mode: a qkv buffer, positions, the two norms and upstream's RoPE module."""

    def __init__(self, mode: str, layout: str, frames: int, batch: int) -> None:
        from vggt.layers.rope import PositionGetter, RotaryPositionEmbedding2D

        self.mode, self.layout, self.frames = mode, layout, frames
        self.autocast = mode == "autocast"
        sequences, tokens = (batch * frames, TOKENS) if layout == "frame" else (batch, frames * TOKENS)
        gen = torch.Generator(device="cuda").manual_seed(0)
        self.qkv = torch.randn(sequences, tokens, 3, HEADS, HEAD_DIM, device="cuda", generator=gen).to(MODES[mode])
        patches = PositionGetter()(batch * frames, GRID, GRID, torch.device("cuda")) + 1
        pos = torch.cat([patches.new_zeros(batch * frames, SPECIAL, 2), patches], dim=1)
        self.pos = pos.reshape(sequences, tokens, 2)
        self.table_length = GRID + 1
        self.rope = RotaryPositionEmbedding2D(frequency=100.0)
        norm_dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        self.q_norm, self.k_norm = (self._norm(gen, norm_dtype) for _ in range(2))

    @staticmethod
    def _norm(gen: torch.Generator, dtype: torch.dtype) -> nn.LayerNorm:
        norm = nn.LayerNorm(HEAD_DIM, device="cuda").requires_grad_(False)
        norm.weight.copy_(1 + 0.5 * torch.randn(HEAD_DIM, device="cuda", generator=gen))
        norm.bias.copy_(0.3 * torch.randn(HEAD_DIM, device="cuda", generator=gen))
        return norm.to(dtype)

    def context(self) -> torch.autocast:
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast)

    def upstream(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Upstream's modules, then the cast SDPA's autocast would make (a no-op without autocast)."""
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        with table_published(self.rope, self.table_length):
            q = rope_forward(self.rope.forward, self.rope, (self.q_norm(q), self.pos), {})
            k = rope_forward(self.rope.forward, self.rope, (self.k_norm(k), self.pos), {})
        return q.to(v.dtype), k.to(v.dtype), v

    def fused(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        dtype = compute_dtype(qkv)
        table = self.rope._compute_frequency_components(HEAD_DIM // 2, self.table_length, qkv.device, dtype)
        return qk_norm_rope(qkv, self.pos, self.q_norm, self.k_norm, *table)


def attention(qkv_fn: Callable[[torch.Tensor], tuple], backend: str) -> Callable[[torch.Tensor], torch.Tensor]:
    policy = AttentionPolicy.for_backend(backend)

    def run(qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = qkv_fn(qkv)
        out = policy.attend(q, k, v)
        return out.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)

    return run


def timed(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Milliseconds of each of ``repeats`` calls, between CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return times


def graph_timed(fn: Callable[[], Any], repeats: int, calls: int = 1) -> list[float]:
    """As ``timed``, per call of ``fn``, replaying ``calls`` calls of it captured in one CUDA graph (``fn`` already
    warmed up by an eager timing)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return [ms / calls for ms in timed(graph.replay, 1, repeats)]


def peak_mib(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def rel_err(a: Any, b: Any) -> float:
    """Max over the outputs of ‖a − b‖ / ‖b‖."""
    pairs = zip(a, b) if isinstance(a, tuple) else [(a, b)]
    return max(relative_error(x, y) for x, y in pairs)


def measure_variant(call: Callable[[], Any], args: argparse.Namespace) -> dict[str, Any]:
    """Eager and graph-replay times of ``call`` and its peak memory."""
    eager = timed(call, args.warmup, args.repeats)
    graph = graph_timed(call, args.repeats)
    return {
        "eager_ms": statistics.median(eager),
        "eager_ms_all": eager,
        "graph_ms": statistics.median(graph),
        "graph_ms_all": graph,
        "peak_mib": peak_mib(call),
    }


def measure(case: Case, part: str, args: argparse.Namespace) -> dict[str, Any]:
    fns = {"upstream": case.upstream, "fused": case.fused}
    if part == "attention":
        fns = {name: attention(fn, args.sdpa_backend) for name, fn in fns.items()}
    row: dict[str, Any] = {
        "mode": case.mode,
        "layout": case.layout,
        "frames": case.frames,
        "sequences": case.qkv.shape[0],
        "tokens": case.qkv.shape[1],
        "part": part,
    }
    with torch.no_grad(), case.context():
        row["fused_runs_triton"] = case.qkv.is_cuda and triton_covers(case.qkv, case.q_norm, case.k_norm)
        row["rel_err"] = rel_err(fns["fused"](case.qkv.clone()), fns["upstream"](case.qkv.clone()))
        for name, fn in fns.items():
            # the fused kernel writes q and k in place: every variant gets its own buffer
            row[name] = measure_variant(functools.partial(fn, case.qkv.clone()), args)
            torch.cuda.empty_cache()
    for kind in ("eager", "graph"):
        row[f"speedup_{kind}"] = row["upstream"][f"{kind}_ms"] / row["fused"][f"{kind}_ms"]
    return row


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'mode':<8} {'layout':<6} {'S':>4} {'part':<12} | {'eager ms up':>11} {'fused':>8} {'x':>5} | "
        f"{'graph ms up':>11} {'fused':>8} {'x':>5} | {'peak MiB up':>11} {'fused':>8} | {'rel err':>8}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        up, fu = r["upstream"], r["fused"]
        lines.append(
            f"{r['mode']:<8} {r['layout']:<6} {r['frames']:>4} {r['part']:<12} | {up['eager_ms']:>11.3f} "
            f"{fu['eager_ms']:>8.3f} {r['speedup_eager']:>5.2f} | {up['graph_ms']:>11.3f} {fu['graph_ms']:>8.3f} "
            f"{r['speedup_graph']:>5.2f} | {up['peak_mib']:>11.1f} {fu['peak_mib']:>8.1f} | {r['rel_err']:>8.1e}"
        )
    return "\n".join(lines)


def meta(args: argparse.Namespace) -> dict[str, Any]:
    import triton

    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "heads": HEADS,
        "head_dim": HEAD_DIM,
        "tokens_per_frame": TOKENS,
    }


def main(argv: Optional[list[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse(argv)
    if not torch.cuda.is_available():
        log.error("this benchmark needs a CUDA device (it times CUDA kernels with CUDA events)")
        return 2
    if not triton_installed():
        log.error("triton is not installed: the fused path would run the PyTorch reference")
        return 2
    for option, valid in (("modes", MODES), ("layouts", LAYOUTS), ("parts", PARTS)):
        unknown = set(getattr(args, option).split(",")) - set(valid)
        if unknown:
            log.error("unknown --%s %s; choose from %s", option, sorted(unknown), list(valid))
            return 2
    rows = []
    for mode in args.modes.split(","):
        for layout in args.layouts.split(","):
            for frames in (int(f) for f in args.frames.split(",")):
                case = Case(mode, layout, frames, args.batch)
                for part in args.parts.split(","):
                    log.info("%s %s S=%d %s", mode, layout, frames, part)
                    rows.append(measure(case, part, args))
                del case
                torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta(args), "rows": rows}, indent=1))
    print(table(rows))
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
