"""Benchmark results: the JSON schema, merging, the Markdown report, the plots and the text table.

Nothing here runs a model (``benchmarks/report.py`` uses it to regenerate reports). matplotlib is imported inside
``plot`` only.

Schema::

    {"meta": {"gpu", "torch", "cuda", "upstream_commit", "vggt_turbo_commit", "date", ...},
     "rows": [{"variant", "frames", "part": "full"|"aggregator", "seconds", "peak_gib", "speedup_vs_upstream",
               "max_rel_err_vs_upstream", "pose_rot_err_deg", "errors", "exact", ...}],
     "phases": [{"variant", "frames", "phase", "seconds", ...}]}
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from ..config import PRESETS, field_names

log = logging.getLogger(__name__)

UPSTREAM = "upstream"
PARTS = ("full", "aggregator")
PHASES = ("patch_embed", "frame_blocks", "global_blocks", "camera_head", "depth_head", "point_head")
PLOT_VARIANTS = (UPSTREAM, "exact", "fast")
# Rows measured under different values of these cannot be merged into one table.
META_MUST_MATCH = ("gpu", "size", "image_size", "batch", "autocast")

# --------------------------------------------------------------------------------------------------------------
# Results: rows, merge, JSON
# --------------------------------------------------------------------------------------------------------------


def sig3(x: Optional[float], digits: int = 3) -> Optional[float]:
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def round_or_none(x: Optional[float], places: int) -> Optional[float]:
    return None if x is None else round(x, places)


def _clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def row_key(row: dict) -> tuple:
    return (row["variant"], row["frames"], row["part"])


def phase_key(row: dict) -> tuple:
    return (row["variant"], row["frames"], row["phase"])


def finalize(data: dict) -> dict:
    """Sort rows and phases; (re)compute ``speedup_vs_upstream`` from the upstream row of the same frames and part."""
    rows = sorted(data.get("rows", []), key=lambda r: (PARTS.index(r["part"]) if r["part"] in PARTS else 9, r["frames"], variant_order(r["variant"])))
    upstream = {(r["frames"], r["part"]): r.get("seconds") for r in rows if r["variant"] == UPSTREAM}
    for r in rows:
        base, sec = upstream.get((r["frames"], r["part"])), r.get("seconds")
        r["speedup_vs_upstream"] = round(base / sec, 3) if base and sec else None
    data["rows"] = rows
    if "phases" in data:
        data["phases"] = sorted(
            data["phases"], key=lambda p: (p["frames"], variant_order(p["variant"]), phase_order(p["phase"]))
        )
    return data


def _variant_names() -> tuple[str, ...]:
    """upstream, the TurboConfig fields in their order, then the presets: the order of tables and plots."""
    return (UPSTREAM, *field_names(), *PRESETS)


def variant_order(name: str) -> tuple[int, str]:
    names = _variant_names()
    return (names.index(name), name) if name in names else (len(names), name)


def phase_order(name: str) -> int:
    order = list(PHASES) + ["other", "total"]
    return order.index(name) if name in order else len(order)


def merge(base: dict, new: dict) -> dict:
    """Rows of ``new`` replace those of ``base`` with the same key, and its phase splits replace ``base``'s of the same
    variant and frame count; the others are kept.

    Raises ``ValueError`` when the two come from different setups (GPU, model size, image size, autocast).
    """
    bm, nm = base.get("meta", {}), new.get("meta", {})
    for k in META_MUST_MATCH:
        if k in bm and k in nm and bm[k] != nm[k]:
            raise ValueError(f"cannot merge results of different setups: meta[{k!r}] is {bm[k]!r} vs {nm[k]!r}")
    for k in ("torch", "upstream_commit", "vggt_turbo_commit"):
        if k in bm and k in nm and bm[k] != nm[k]:
            log.warning("merging rows measured with different %s: %s and %s", k, bm[k], nm[k])
    rows = {row_key(r): r for r in base.get("rows", [])}
    rows.update({row_key(r): r for r in new.get("rows", [])})
    # A variant's phase split is one measurement: where ``new`` has one (if only its total, when a CUDA graph hid the
    # phases), ``base``'s phases of that variant and frame count go, so that no table mixes two runs' phases.
    remeasured = {(p["variant"], p["frames"]) for p in new.get("phases", [])}
    phases = {phase_key(p): p for p in base.get("phases", []) if (p["variant"], p["frames"]) not in remeasured}
    phases.update({phase_key(p): p for p in new.get("phases", [])})
    meta = {k: v for k, v in nm.items() if k != "skipped_for_deadline"}  # per run, in meta["runs"]
    runs = [run for run in bm.get("runs", [run_summary(bm)]) if run] + [run_summary(nm)]
    meta["runs"] = [r for i, r in enumerate(runs) if r not in runs[:i]]
    return finalize({"meta": meta, "rows": list(rows.values()), "phases": list(phases.values())})


def run_summary(meta: dict) -> dict:
    keys = ("time_utc", "vggt_turbo_commit", "upstream_commit", "torch", "cuda", "argv", "warmup", "repeats",
            "skipped_for_deadline")
    return {k: meta[k] for k in keys if k in meta}


def load_json(path: Path) -> dict:
    with open(path) as f:
        data = json.load(f)
    if not isinstance(data, dict) or "meta" not in data or "rows" not in data:
        raise ValueError(f"{path} is not a vggt-turbo benchmark JSON (needs 'meta' and 'rows')")
    data.setdefault("phases", [])
    return data


def write_json(data: dict, out_dir: Path, dated: bool = True) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_clean(data), indent=1) + "\n"
    latest = out_dir / "latest.json"
    tmp = latest.with_suffix(".json.tmp")
    tmp.write_text(text)
    tmp.replace(latest)  # atomic: a command killed mid-write leaves the previous file
    if dated:
        date = data.get("meta", {}).get("date") or datetime.date.today().isoformat()
        (out_dir / f"{date}.json").write_text(text)
    return latest


# --------------------------------------------------------------------------------------------------------------
# Report: Markdown, plots, stdout table
# --------------------------------------------------------------------------------------------------------------


def fmt_seconds(x: Optional[float]) -> str:
    if x is None:
        return "–"
    return f"{x:.3f}" if x >= 0.1 else f"{x * 1e3:.1f} ms"


def fmt_err(x: Optional[float]) -> str:
    return "–" if x is None else ("0" if x == 0 else f"{x:.1e}")


def _cell(row: Optional[dict], what: str) -> str:
    if row is None:
        return ""
    if row.get("error"):
        return str(row["error"])
    if what == "latency":
        sp = row.get("speedup_vs_upstream")
        alone = " †" if row.get("aggregator_timing") else ""
        return fmt_seconds(row.get("seconds")) + (f" ({sp:.2f}×)" if sp else "") + alone
    if what in ("memory", "reserved"):
        p = row.get("peak_gib" if what == "memory" else "reserved_gib")
        return "–" if p is None else f"{p:.2f}"
    return fmt_err(row.get("max_rel_err_vs_upstream"))


def _pivot(rows: list[dict], part: str) -> tuple[list[int], list[str], dict[tuple, dict]]:
    sel = [r for r in rows if r["part"] == part]
    frames = sorted({r["frames"] for r in sel})
    variants = sorted({r["variant"] for r in sel}, key=variant_order)
    return frames, variants, {(r["variant"], r["frames"]): r for r in sel}


def _frame_size(meta: dict) -> str:
    """W×H of the run's frames (``image_hw``; runs before it recorded the side of square frames only)."""
    height, width = meta.get("image_hw") or (meta.get("image_size"),) * 2
    return f"{width}×{height}"


def markdown(data: dict) -> str:
    meta, rows, phases = data.get("meta", {}), data.get("rows", []), data.get("phases", [])
    exact = {r["variant"]: r.get("exact") for r in rows}
    lines = [f"# VGGT benchmark: {meta.get('gpu', '?')}", ""]
    lines.append(
        f"torch {meta.get('torch')}, CUDA {meta.get('cuda')}, upstream vggt `{str(meta.get('upstream_commit'))[:12]}`, "
        f"vggt-turbo `{meta.get('vggt_turbo_commit')}`, {meta.get('date')}. Model: {meta.get('size')} "
        f"({meta.get('weights', 'random init')}), images {_frame_size(meta)}, "
        f"B={meta.get('batch', 1)}, autocast {meta.get('autocast')}. {_calls_text(meta)}, {meta.get('timer')}, all "
        "variants of a run in one process on the same weights and inputs."
    )
    if meta.get("aggregator_timing"):
        lines.append(f"Aggregator: {meta['aggregator_timing']}.")
    lines += ["", "Variants: `upstream` = unpatched; a flag name = that optimization alone; `exact` / `fast` = the presets. "
              "Errors: max over outputs of ‖a−b‖/‖b‖ (float32) vs upstream in fp32 (TF32 off) on the same inputs (the upstream row: bf16 autocast's own error, the noise floor); "
              "an `*` marks variants outside the exact tier (reduced precision or approximate; the row's `tier` says which).", ""]
    titles = {"full": "Full model (no track head)", "aggregator": "Aggregator"}
    for part in PARTS:
        frames, variants, cells = _pivot(rows, part)
        if not frames:
            continue
        for what, title in (
            ("latency", "seconds (speedup vs upstream)"),
            ("memory", "peak GiB above weights"),
            ("reserved", "peak GiB reserved above the start (includes CUDA-graph pools; – = not measured)"),
            ("error", "max rel. error vs upstream fp32"),
        ):
            key = {"memory": "peak_gib", "reserved": "reserved_gib"}.get(what)
            if key and all(cells[k].get(key) is None for k in cells):
                continue
            lines += [f"## {titles[part]}: {title}", ""]
            lines.append("| variant | " + " | ".join(f"{s} frame{'' if s == 1 else 's'}" for s in frames) + " |")
            lines.append("|---|" + "---:|" * len(frames))
            for v in variants:
                name = v + ("" if exact.get(v, True) else " *")
                lines.append(f"| {name} | " + " | ".join(_cell(cells.get((v, s)), what) for s in frames) + " |")
            lines.append("")
            if what == "latency" and any(r.get("aggregator_timing") for r in cells.values()):
                lines += ["† the aggregator patched and called alone: the full forward replays as one CUDA graph, "
                          "so no hook inside it fires.", ""]
    if phases:
        for frames in sorted({p["frames"] for p in phases}):
            sel = [p for p in phases if p["frames"] == frames]
            variants = sorted({p["variant"] for p in sel}, key=variant_order)
            names = sorted({p["phase"] for p in sel}, key=phase_order)
            table = {(p["variant"], p["phase"]): p["seconds"] for p in sel}
            lines += [f"## Phase split at {frames} frames: seconds", ""]
            lines.append("| phase | " + " | ".join(variants) + " |")
            lines.append("|---|" + "---:|" * len(variants))
            for name in names:
                lines.append(f"| {name} | " + " | ".join(fmt_seconds(table.get((v, name))) for v in variants) + " |")
            lines.append("")
        lines.append("Phases: CUDA events (perf_counter on CPU) in forward hooks on the patch embed, every frame and "
                     "global block (summed), and the heads; `other` = total minus those. Swapped global layers of "
                     "`fast` still count as global blocks.")
        lines.append("")
    return "\n".join(lines)


def _calls_text(meta: dict) -> str:
    runs = meta.get("runs") or [meta]
    counts = {(r.get("warmup"), r.get("repeats")) for r in runs}
    if len(counts) == 1:
        warmup, repeats = counts.pop()
        return f"Median of {repeats} timed calls after {warmup} warm-up"
    return f"Median of the timed calls ({len(runs)} runs merged; warm-up and repeats per run in meta.runs)"


def plot(data: dict, out_dir: Path) -> list[Path]:
    """``latency.png`` and ``memory.png`` (log-log, upstream vs presets) and ``phases.png`` when phases exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, written = data.get("rows", []), []
    parts = [p for p in PARTS if any(r["part"] == p for r in rows)] or ["full"]
    title = data.get("meta", {}).get("gpu", "")
    for what, key, ylabel in (("latency", "seconds", "seconds"), ("memory", "peak_gib", "peak GiB above weights")):
        fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.2), squeeze=False)
        for ax, part in zip(axes[0], parts):
            drawn = False
            for variant in PLOT_VARIANTS:
                pts = sorted((r["frames"], r.get(key)) for r in rows if r["part"] == part and r["variant"] == variant and r.get(key))
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=variant)
                    drawn = True
            ax.set_title(f"{part} ({title})")
            ax.set_xlabel("frames")
            ax.set_ylabel(ylabel)
            if drawn:
                ax.set_xscale("log")
                ax.set_yscale("log")
                ticks = sorted({r["frames"] for r in rows if r["part"] == part})
                ax.set_xticks(ticks, [str(t) for t in ticks])
                ax.minorticks_off()
                ax.legend()
                ax.grid(True, which="both", alpha=0.3)
            else:
                ax.text(0.5, 0.5, f"no {what} data" + (" (not measured on the CPU)" if what == "memory" else ""),
                        ha="center", va="center", transform=ax.transAxes)
        fig.tight_layout()
        path = out_dir / f"{what}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    phases = data.get("phases", [])
    if phases:
        frames = max(p["frames"] for p in phases)
        sel = [p for p in phases if p["frames"] == frames and p["phase"] != "total"]
        variants = sorted({p["variant"] for p in sel}, key=variant_order)
        names = sorted({p["phase"] for p in sel}, key=phase_order)
        fig, ax = plt.subplots(figsize=(8, 2.2 + 0.6 * len(variants)))
        left = [0.0] * len(variants)
        for name in names:
            widths = [next((p["seconds"] for p in sel if p["variant"] == v and p["phase"] == name), 0.0) or 0.0 for v in variants]
            ax.barh(variants, widths, left=left, label=name)
            left = [a + b for a, b in zip(left, widths)]
        ax.set_xlabel(f"seconds at {frames} frames")
        ax.invert_yaxis()
        ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.35 - 0.1 / max(1, len(variants))))
        fig.tight_layout()
        path = out_dir / "phases.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(data: dict, out_dir: Path) -> list[Path]:
    """``latest.md`` and the plots beside the JSON."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "latest.md"
    md.write_text(markdown(data) + "\n")
    return [md, *plot(data, out_dir)]


def text_table(data: dict) -> str:
    """The compact table printed at the end of ``vggt-turbo bench``."""
    rows, out = data.get("rows", []), []
    for part in PARTS:
        frames, variants, cells = _pivot(rows, part)
        if not frames:
            continue
        width = max(len(v) for v in variants) + 2
        out.append(f"{part}: seconds (speedup vs upstream); peak GiB and max rel err at the largest frame count")
        head = "variant".ljust(width) + "".join(f"{f'{s} fr':>17}" for s in frames) + f"{'peak GiB':>10}{'max err':>10}"
        out.append(head)
        for v in variants:
            line = (v + ("" if cells.get((v, frames[0]), {}).get("exact", True) else "*")).ljust(width)
            line += "".join(f"{_cell(cells.get((v, s)), 'latency'):>17}" for s in frames)
            last = next((cells[(v, s)] for s in reversed(frames) if (v, s) in cells), None)
            line += f"{_cell(last, 'memory'):>10}{_cell(last, 'error'):>10}"
            out.append(line)
        out.append("")
    return "\n".join(out)


# --------------------------------------------------------------------------------------------------------------
# Report only
# --------------------------------------------------------------------------------------------------------------


def report_main(paths: Sequence[str], default_out: Optional[Path] = None, out: Optional[str] = None) -> int:
    """Regenerate md + plots from JSON files without running anything.

    One JSON: its md + plots are written beside it (or in ``out``). Several: they are merged in order (later
    rows win) into ``<out>/latest.json`` (default: the first one's folder) with a dated copy, then reported.
    No path: ``<default_out>/*/latest.json``, each reported in place.
    """
    if not paths:
        found = sorted((default_out or Path("benchmarks/results")).glob("*/latest.json"))
        if not found:
            print(f"error: no */latest.json under {default_out}", file=sys.stderr)
            return 2
        for path in found:
            code = report_main([str(path)])
            if code:
                return code
        return 0
    try:
        datas = [load_json(Path(p)) for p in paths]
        data = finalize(datas[0])
        for other in datas[1:]:
            data = merge(data, other)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out_dir = Path(out) if out else Path(paths[0]).parent
    if len(paths) > 1 or out_dir.resolve() != Path(paths[0]).parent.resolve():
        write_json(data, out_dir)
    written = write_report(data, out_dir)
    print(text_table(data))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
