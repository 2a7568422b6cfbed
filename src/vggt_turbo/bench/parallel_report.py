"""Results of ``bench --sequence-parallel``: the JSON file, its Markdown table, and the largest frame count that
fits, predicted from the measured peaks.

Schema of ``sequence_parallel.json``::

    {"meta": {..., "gpus", "backend"},
     "rows": [{"variant", "gpus", "frames", "part": "full", "seconds", "seconds_all", "peak_gib" (max over GPUs),
               "peak_gib_per_gpu", "peak_reserved_gib_per_gpu", "base_gib", "config",
               N-GPU rows: "speedup_vs_1gpu", "peak_ratio_vs_1gpu", "errors", "max_rel_err_vs_1gpu"}],
     "max_frames": [{"variant", "gpus", "predicted_max_frames", "gib_per_frame", "fixed_gib", "capacity_gib",
                     "fitted_frames", "method"}] or null}
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from .report import fmt_err, fmt_seconds

NAME = "sequence_parallel"
FIT_METHOD = (
    "least-squares line through the peak reserved memory (max over GPUs) against frames, extended to the tightest "
    "GPU's free + reserved memory; activations grow linearly with frames under fused attention, so the line holds "
    "beyond the measured counts. A prediction: confirm it with --frames (a 1-GPU forward that long takes tens of "
    "minutes, too long to search by trial)"
)


def load_rows(out_dir: Path) -> list[dict]:
    """The rows of an earlier run in ``out_dir`` (for ``--merge``), or none."""
    path = out_dir / f"{NAME}.json"
    return json.loads(path.read_text())["rows"] if path.exists() else []


def max_frames(rows: list[dict], capacity_gib: float) -> list[dict[str, Any]]:
    """Per (variant, GPU count) measured at two frame counts or more: the largest frame count whose predicted peak
    fits in ``capacity_gib`` (see ``FIT_METHOD``)."""
    points: dict[tuple[str, int], list[tuple[int, float]]] = {}
    for r in rows:
        reserved = [x for x in r.get("peak_reserved_gib_per_gpu") or [] if x is not None]
        if reserved and not r.get("error"):
            points.setdefault((r["variant"], r["gpus"]), []).append((r["frames"], max(reserved)))
    fits = []
    for (variant, gpus), pts in sorted(points.items()):
        if len({f for f, _ in pts}) < 2:
            continue
        n = len(pts)
        mean_f, mean_g = sum(f for f, _ in pts) / n, sum(g for _, g in pts) / n
        slope = sum((f - mean_f) * (g - mean_g) for f, g in pts) / sum((f - mean_f) ** 2 for f, _ in pts)
        fixed = mean_g - slope * mean_f
        fits.append({
            "variant": variant,
            "gpus": gpus,
            "predicted_max_frames": math.floor((capacity_gib - fixed) / slope) if slope > 0 else None,
            "gib_per_frame": round(slope, 5),
            "fixed_gib": round(fixed, 3),
            "capacity_gib": round(capacity_gib, 3),
            "fitted_frames": sorted(f for f, _ in pts),
            "method": FIT_METHOD,
        })
    return fits


def markdown(meta: dict, rows: list[dict], fits: Optional[list[dict]]) -> str:
    lines = [
        f"# Sequence parallelism: {meta.get('gpu')} x {meta.get('gpus')}",
        "",
        f"torch {meta.get('torch')}, backend {meta.get('backend')}, vggt-turbo `{meta.get('vggt_turbo_commit')}`, "
        f"{meta.get('date')}. Model: {meta.get('size')}, images {meta.get('image_size')} px, B=1, autocast "
        f"{meta.get('autocast')}. Timer: {meta.get('timer')}, {meta.get('timing')}; median of {meta.get('repeats')} after {meta.get('warmup')} "
        "warm-up. Peak: per GPU, above weights and inputs (max over GPUs). Error: N GPUs vs 1 GPU, same config.",
        "",
        "| frames | variant | GPUs | seconds | speed-up vs 1 GPU | peak GiB per GPU | peak vs 1 GPU | max rel. error |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["frames"], r["variant"], r["gpus"])):
        if r.get("error"):
            lines.append(f"| {r['frames']} | {r['variant']} | {r['gpus']} | {r['error']} | | | | |")
            continue
        speedup = f"{r['speedup_vs_1gpu']:.2f}x" if r.get("speedup_vs_1gpu") else "–"
        peak = f"{r['peak_gib']:.2f}" if r.get("peak_gib") is not None else "–"
        ratio = f"{r['peak_ratio_vs_1gpu']:.2f}x" if r.get("peak_ratio_vs_1gpu") else "–"
        err = fmt_err(r.get("max_rel_err_vs_1gpu")) if r["gpus"] > 1 else "–"
        lines.append(f"| {r['frames']} | {r['variant']} | {r['gpus']} | {fmt_seconds(r.get('seconds'))} | {speedup} "
                     f"| {peak} | {ratio} | {err} |")
    if fits:
        lines += ["", "## Largest frame count that fits (predicted)", "", fits[0]["method"] + ".", "",
                  "| variant | GPUs | frames | GiB per frame | fixed GiB | capacity GiB | fitted on |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for f in fits:
            lines.append(f"| {f['variant']} | {f['gpus']} | {f['predicted_max_frames']} | {f['gib_per_frame']} | "
                         f"{f['fixed_gib']} | {f['capacity_gib']} | {', '.join(map(str, f['fitted_frames']))} |")
    return "\n".join(lines) + "\n"


def save(meta: dict, rows: list[dict], fits: Optional[list[dict]], out_dir: Path) -> list[Path]:
    """Write ``sequence_parallel.json`` (atomically: a killed job keeps the previous file) and ``.md``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{NAME}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows, "max_frames": fits}, indent=1) + "\n")
    tmp.replace(path)
    md = out_dir / f"{NAME}.md"
    md.write_text(markdown(meta, rows, fits))
    return [path, md]
