#!/usr/bin/env python
"""How fast can an exact VGGT forward be on this GPU? A floor from FLOPs and measured kernel rates, running nothing
on the GPU.

    python benchmarks/roofline.py                       # H100 results folder, 1, 10, 100 and 200 frames
    python benchmarks/roofline.py --frames 1,10 --out /tmp/roofline

FLOPs are counted with ``torch.utils.flop_counter`` on the meta device (the full model, random weights, 518 px, no
track head, the ``exact`` preset's forward), split into the bf16 matrix products of the aggregator (linear layers
and the patch convolution), its attention within frames (patch embed and frame blocks) and across frames (global
blocks), and the DPT heads' fp32 convolutions (run as TF32 by cuDNN, as upstream runs them).

Two floors per frame count, each a sum of FLOPs over a rate, charging nothing for anything else (norms,
elementwise work, the camera head, launches), so the real forward can only be slower:

- ``measured``: each kind of work at the fastest rate measured for it on this GPU, from the committed results:
  ``kernel_profile_exact.json`` (the aggregator's matrix products and the heads' convolutions, from their kernel
  time in a profile of the ``exact`` preset at 10 frames) and ``attention_backends.json`` (every attention kernel
  at VGGT's shapes; per shape the fastest one, from CUDA-graph replays where measured);
- ``peak``: everything at the datasheet's dense peak (``--peak-bf16``, ``--peak-tf32``; defaults: H100 SXM5).

Against upstream's time (``latest.json``) a floor gives the largest speedup an exact forward can reach; for the
issue's targets it also gives the rate global attention would need, with everything else at its measured rate.
Writes ``<out>/roofline.json`` and ``<out>/roofline.md``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger("roofline")

RESULTS = Path("benchmarks/results/nvidia-h100-80gb-hbm3")
TARGETS = {1: 8.0, 10: 3.0, 100: 1.8, 200: 1.8}  # issue #4: exact preset vs upstream, same run
H100_SXM_DENSE_TFLOPS = {"bf16": 989.4, "tf32": 494.7}
HEADS, HEAD_DIM = 16, 64  # the aggregator's attention (and DINOv2's)


def count_flops(frames_list: list[int]) -> dict[int, dict[str, float]]:
    """FLOPs of one exact forward per frame count, by kind of work (counted on the meta device)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    import vggt_turbo
    from vggt_turbo.random_model import build_vggt

    model = build_vggt("full", seed=0, enable_track=False).eval().requires_grad_(False).to("meta")
    vggt_turbo.apply_optimizations(model, "exact")
    out = {}
    for frames in frames_list:
        counter = FlopCounterMode(display=False)
        with counter, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model(torch.empty(1, frames, 3, 518, 518, device="meta"))
        out[frames] = _split(counter.get_flop_counts())
    return out


def _split(counts: dict[str, dict[Any, int]]) -> dict[str, float]:
    def total(pattern: str, ops: tuple[str, ...]) -> float:
        return float(sum(n for module, per_op in counts.items() if re.fullmatch(pattern, module)
                         for op, n in per_op.items() if str(op).split(".")[1] in ops))

    agg = r"VGGT\.aggregator"
    return {
        "matmul_bf16": total(agg, ("addmm", "mm", "convolution")),  # linear layers and the patch convolution
        "attention_frame": total(rf"{agg}\.patch_embed", ("bmm",)) + total(rf"{agg}\.frame_blocks\.\d+", ("bmm",)),
        "attention_global": total(rf"{agg}\.global_blocks\.\d+", ("bmm",)),
        "heads_conv_tf32": total(r"VGGT\.(depth|point)_head", ("convolution",)),
    }


def attention_rates(path: Path) -> dict[str, float]:
    """Fastest measured TFLOP/s per shape name (``"frame 10"``, ``"global 100"``, ...) in attention_backends.json;
    a CUDA-graph replay time (``ms_graph``: no launch cost) counts where measured."""
    best: dict[str, float] = {}
    for row in json.loads(path.read_text())["rows"]:
        if "lse" in row["kernel"] or row["kernel"] == "math":
            continue
        flops = 4.0 * row["B"] * row["N"] * row["K"] * HEAD_DIM * HEADS
        ms = min(t for t in (row.get("ms"), row.get("ms_graph")) if t)
        best[row["shape"]] = max(best.get(row["shape"], 0.0), flops / (ms * 1e-3) / 1e12)
    return best


def nearest(rates: dict[str, float], kind: str, frames: int) -> float:
    """The rate measured for ``kind`` at ``frames``, else at the nearest measured frame count (global attention at
    1 frame is frame attention: the same shape)."""
    if kind == "global" and frames == 1 and f"global {frames}" not in rates:
        kind = "frame"
    measured = {int(name.split()[1]): rate for name, rate in rates.items() if name.split()[0] == kind}
    return measured[min(measured, key=lambda n: abs(n - frames))]


def profile_rates(path: Path, flops_10: dict[str, float]) -> dict[str, float]:
    """TF/s of the aggregator's matrix products and the heads' convolutions in the 10-frame profile of ``exact``."""
    phases = json.loads(path.read_text())["exact_eager_serial@10"]["phases_ms"]
    gemm_ms = sum(phases[p].get("gemm", 0.0) for p in ("patch_embed", "frame_block", "global_block"))
    conv_ms = sum(phases[p].get("gemm", 0.0) + phases[p].get("conv", 0.0) for p in ("depth_head", "point_head"))
    return {"matmul_bf16": flops_10["matmul_bf16"] / (gemm_ms * 1e-3) / 1e12,
            "heads_conv_tf32": flops_10["heads_conv_tf32"] / (conv_ms * 1e-3) / 1e12}


def seconds(latest: dict[str, Any], variant: str, frames: int) -> float:
    return next(r["seconds"] for r in latest["rows"]
                if r["variant"] == variant and r["part"] == "full" and r["frames"] == frames)


def analyse(frames_list: list[int], results: Path, peak_bf16: float, peak_tf32: float) -> dict[str, Any]:
    latest = json.loads((results / "latest.json").read_text())
    attention = attention_rates(results / "attention_backends.json")
    flops = count_flops(sorted(set(frames_list) | {10}))
    rates = profile_rates(results / "kernel_profile_exact.json", flops[10])
    rows = []
    for frames in frames_list:
        fl = flops[frames]
        rate = {**rates, "attention_frame": nearest(attention, "frame", frames),
                "attention_global": nearest(attention, "global", frames)}
        t_measured = {k: fl[k] / (rate[k] * 1e12) for k in fl}
        t_peak = {k: fl[k] / ((peak_tf32 if k == "heads_conv_tf32" else peak_bf16) * 1e12) for k in fl}
        upstream, exact = seconds(latest, "upstream", frames), seconds(latest, "exact", frames)
        row = {
            "frames": frames, "tflop": {k: round(v / 1e12, 3) for k, v in fl.items()},
            "rate_tflops_measured": {k: round(v, 1) for k, v in rate.items()},
            "floor_s_measured": round(sum(t_measured.values()), 4), "floor_s_peak": round(sum(t_peak.values()), 4),
            "upstream_s": upstream, "exact_s": exact, "exact_speedup": round(upstream / exact, 2),
            "max_speedup_measured": round(upstream / sum(t_measured.values()), 2),
            "max_speedup_peak": round(upstream / sum(t_peak.values()), 2),
        }
        if frames in TARGETS:
            budget = upstream / TARGETS[frames] - sum(v for k, v in t_measured.items() if k != "attention_global")
            row["target"] = TARGETS[frames]
            row["global_attention_tflops_needed"] = round(fl["attention_global"] / budget / 1e12, 1) if budget > 0 else None
        rows.append(row)
    meta = {k: latest["meta"].get(k) for k in ("gpu", "torch", "upstream_commit", "vggt_turbo_commit", "date")}
    meta.update(peak_tflops={"bf16": peak_bf16, "tf32": peak_tf32}, method=__doc__.split("Writes")[0].strip())
    return {"meta": meta, "rows": rows}


def _time(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms" if seconds < 1 else f"{seconds:.2f} s"


def markdown(result: dict[str, Any]) -> str:
    m = result["meta"]
    lines = [
        f"# Exact-forward floor: {m['gpu']}", "",
        f"FLOPs counted on the meta device; rates measured on this GPU (torch {m['torch']}, upstream "
        f"`{(m['upstream_commit'] or '')[:12]}`); upstream and exact times from `latest.json` (vggt-turbo "
        f"`{m['vggt_turbo_commit']}`). A floor charges only matrix products, attention and the heads' convolutions, "
        "at the fastest rate measured for each (`measured`) or at the datasheet's dense peak (`peak`: "
        f"{m['peak_tflops']['bf16']} bf16, {m['peak_tflops']['tf32']} TF32 TFLOP/s). See `benchmarks/roofline.py`.", "",
        "| frames | TFLOP (matmul / attn frame / attn global / heads TF32) | floor measured | floor peak | upstream "
        "| exact | max speedup measured / peak | target | global attention needed |",
        "|---:|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in result["rows"]:
        t = r["tflop"]
        need = r.get("global_attention_tflops_needed")
        rate = r["rate_tflops_measured"]["attention_global"]
        lines.append(
            f"| {r['frames']} | {t['matmul_bf16']:.1f} / {t['attention_frame']:.1f} / {t['attention_global']:.1f} / "
            f"{t['heads_conv_tf32']:.2f} | {_time(r['floor_s_measured'])} | {_time(r['floor_s_peak'])} | "
            f"{_time(r['upstream_s'])} | {_time(r['exact_s'])} ({r['exact_speedup']:.2f}×) | "
            f"{r['max_speedup_measured']:.2f}× / {r['max_speedup_peak']:.2f}× | {r.get('target', '–')}× | "
            + (f"{need:.0f} TFLOP/s (best measured {rate:.0f})" if need else "beyond any rate") + " |")
    rates = result["rows"][0]["rate_tflops_measured"]
    lines += ["", f"Measured rates (TFLOP/s): matmul {rates['matmul_bf16']:.0f} (bf16, 10-frame profile), heads' "
              f"convolutions {rates['heads_conv_tf32']:.0f} (TF32); attention per shape in `roofline.json`."]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", default="1,10,100,200", help="frame counts (default %(default)s)")
    p.add_argument("--results", type=Path, default=RESULTS, help="results folder to read (default %(default)s)")
    p.add_argument("--out", type=Path, help="folder to write roofline.json / .md (default: --results)")
    p.add_argument("--peak-bf16", type=float, default=H100_SXM_DENSE_TFLOPS["bf16"], help="dense TFLOP/s")
    p.add_argument("--peak-tf32", type=float, default=H100_SXM_DENSE_TFLOPS["tf32"], help="dense TFLOP/s")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    result = analyse([int(f) for f in args.frames.split(",")], args.results, args.peak_bf16, args.peak_tf32)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    (out / "roofline.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "roofline.md").write_text(markdown(result))
    log.info("%s", markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
