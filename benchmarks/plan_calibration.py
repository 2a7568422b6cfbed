"""Fit the planner's constants (``vggt_turbo.planner``) on the committed bench results, and check them on held-out runs.

    PYTHONPATH=src python benchmarks/plan_calibration.py

Reads only committed files (listed in ``SOURCES``), writes ``src/vggt_turbo/plan_constants.json`` (package data)
and ``benchmarks/results/plan_check.md`` (predicted vs measured on runs not used for fitting). Runs on the CPU.

What the data is (all measured 2026-11-24, 518x518, batch 1, bf16 autocast, torch 2.11):
  - H100, ``latest.json``: upstream, exact, fast at 1/10/100/200 frames (offload_intermediates "auto": on from 32
    frames): the FIT set.
  - H100, ``2026-11-24-576aca9.json``: exact without offloading at 100/200 frames (FIT); fast at 800 frames
    (HELD OUT, memory only: its one call was cold).
  - H200, ``2026-11-24.json``: upstream and fast at 800 frames (HELD OUT); ``sequence_parallel.json`` one-GPU rows: exact
    at 100 frames (FIT: the H200's one time ratio) and 400 frames (HELD OUT).
"exact" there predates 2026-12-02, when the preset dropped ``bf16_weights``: those rows are today's
``exact + bf16_weights`` and calibrate the variant ``exact_bf16``; today's ``exact`` is derived analytically from
it (see ``derive_exact``) and marked not re-measured.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
from scipy.optimize import least_squares, lsq_linear

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
from vggt_turbo import planner  # noqa: E402

log = logging.getLogger("plan_calibration")
RESULTS = ROOT / "benchmarks" / "results"
H100, H200 = RESULTS / "nvidia-h100-80gb-hbm3", RESULTS / "nvidia-h200"
LATER = "H200 2026-12-02-bf236ec.json"  # measured after the fit: reported in a section of its own
SOURCES = {
    "h100_latest": H100 / "latest.json",
    "h100_576aca9": H100 / "2026-11-24-576aca9.json",
    "h200_latest": H200 / "2026-11-24.json",  # the 800-frame run (latest.json has moved on since)
    "h200_bf236ec": H200 / "2026-12-02-bf236ec.json",  # 1-100 frames, the exact preset without bf16_weights
    "h200_seq": H200 / "sequence_parallel.json",
}
GIB = 1024**3
SIZE = 518
OFFLOAD_AUTO_FRAMES = 32  # patches.offload_intermediates.OFFLOAD_AUTO_FRAMES (not imported: it imports torch)

MODEL = {
    # VGGT at the pinned commit: aggregator.py (embed_dim 1024, patch 14, camera + 4 register tokens per frame,
    # the heads read layers 4, 11, 17, 23 of the 24 frame/global pairs, each 2*1024 channels), dpt_head.py (the
    # DPT heads run on chunks of 8 frames), 6 fp32 values per output pixel (depth, its confidence, xyz, its
    # confidence).
    "embed_dim": 1024, "patch_size": 14, "special_tokens": 5, "kept_layers": [4, 11, 17, 23],
    "heads_chunk_frames": 8, "head_output_values": 6, "offload_auto_frames": OFFLOAD_AUTO_FRAMES,
    # The CUDA context and cuBLAS/cuDNN workspaces outside the caching allocator: an assumption, not measured here.
    "context_bytes": int(0.5 * GIB),
}


@dataclass
class Row:
    source: str
    gpu: str
    variant: str  # planner variant
    offload: bool
    frames: int
    seconds: Optional[float]
    peak_gib: float  # above base
    base_gib: float
    reserved_gib: Optional[float]
    fit: bool

    @property
    def total_gib(self) -> float:
        return self.base_gib + self.peak_gib


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [r for r in json.loads(path.read_text())["rows"] if r.get("part", "full") == "full" and r.get("peak_gib") is not None]


def load() -> list[Row]:
    """The rows the fit and check use, each labelled with the planner's variant and whether it was offloaded."""
    out: list[Row] = []
    renamed = {"upstream": "upstream", "exact": "exact_bf16", "fast": "fast"}
    for r in rows_of(SOURCES["h100_latest"]):
        if r["variant"] in renamed:
            v = renamed[r["variant"]]
            out.append(Row("H100 latest.json", "H100", v, v != "upstream" and r["frames"] >= OFFLOAD_AUTO_FRAMES,
                           r["frames"], r["seconds"], r["peak_gib"], r["base_gib"], r["reserved_gib"], True))
    for r in rows_of(SOURCES["h100_576aca9"]):
        if r["variant"] == "exact-offload_intermediates":
            out.append(Row("H100 576aca9", "H100", "exact_bf16", False, r["frames"], r["seconds"], r["peak_gib"],
                           r["base_gib"], r["reserved_gib"], True))
        if r["variant"] == "fast" and r["frames"] == 800:  # a single cold call: memory only
            out.append(Row("H100 576aca9", "H100", "fast", True, 800, None, r["peak_gib"], r["base_gib"],
                           r["reserved_gib"], False))
    for r in rows_of(SOURCES["h200_latest"]):
        out.append(Row("H200 latest.json", "H200", r["variant"], r["variant"] != "upstream", r["frames"], r["seconds"],
                       r["peak_gib"], r["base_gib"], r["reserved_gib"], False))
    h200_new = {"upstream": "upstream", "exact": "exact", "exact+bf16_weights": "exact_bf16", "fast": "fast"}
    for r in rows_of(SOURCES["h200_bf236ec"]):  # HELD OUT: the first runs of today's exact (no bf16_weights)
        if r["variant"] in h200_new and r["frames"] >= 10:
            v = h200_new[r["variant"]]
            out.append(Row(LATER, "H200", v, v != "upstream" and r["frames"] >= OFFLOAD_AUTO_FRAMES,
                           r["frames"], r["seconds"], r["peak_gib"], r["base_gib"], r["reserved_gib"], False))
    for r in rows_of(SOURCES["h200_seq"]):
        if r.get("gpus") == 1:
            out.append(Row("H200 sequence_parallel.json (1 GPU)", "H200", "exact_bf16", True, r["frames"],
                           r["seconds"], r["peak_gib"], r["base_gib"], None, r["frames"] == 100))
    return out


def constants_with(memory: dict[str, Any], weights_bytes: float, time: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return {"model": dict(MODEL, weights_bytes=weights_bytes), "memory": memory, "time": time or {}}


def activations(k: dict[str, Any], v: str, offload: bool, frames: int) -> float:
    """Predicted peak above weights and inputs (what the bench's peak_gib measures), GiB."""
    allocated, _ = planner.peak_bytes(v, offload, frames, SIZE, SIZE, 1, k)
    base = k["model"]["weights_bytes"] + frames * 3 * SIZE * SIZE * 4
    return (allocated - base) / GIB


def fit_memory(rows: list[Row], v: str, kept_bytes: int, weights_bytes: float) -> dict[str, Any]:
    """A0, a, H0, h for one variant: least squares on relative errors of the activations' peak over the FIT rows."""
    fit = [r for r in rows if r.variant == v and r.fit]

    def params(x: np.ndarray) -> dict[str, Any]:
        return {"A0": x[0] * GIB, "a": x[1] * 1e3, "H0": x[2] * GIB, "h": x[3] * 1e3, "kept_element_bytes": kept_bytes,
                "reserved_ratio": 1.0, "remeasured": True}

    def residuals(x: np.ndarray) -> np.ndarray:
        k = constants_with({v: params(x)}, weights_bytes)
        return np.array([activations(k, v, r.offload, r.frames) / r.peak_gib - 1 for r in fit])

    # The max() of the two phases has kinks: start from several points and keep the best fit.
    starts = [np.array([a0, a, 1.0, h]) for a0 in (0.5, 2.0) for a in (5.0, 20.0, 40.0) for h in (0.3, 1.0)]
    result = min((least_squares(residuals, x0=x0, bounds=(0, np.inf)) for x0 in starts), key=lambda res: res.cost)
    out = params(result.x)
    # Whether it fits is decided on reserved memory: the allocator's reserve over the allocated peak, measured on
    # the long runs (>= 100 frames) of the fit set, where the peak is what matters.
    # (latest.json only: 576aca9's reserved memory includes the pool its earlier variants left.)
    ratios = [r.reserved_gib / r.peak_gib for r in fit if r.reserved_gib and r.frames >= 100
              and r.source == "H100 latest.json"]
    out["reserved_ratio"] = float(np.median(ratios)) if ratios else 1.3
    out["fit_rows"] = [f"{r.source}: {r.frames} frames{' offload' if r.offload else ''}" for r in fit]
    return out


def derive_exact(exact_bf16: dict[str, Any], upstream: dict[str, Any]) -> dict[str, Any]:
    """Today's ``exact`` (since 2026-12-02: upstream's fp32 residual stream under autocast, bf16 copies of the
    aggregator's matmul weights cached between calls) from the measured ``exact + bf16_weights``.

    Analytic changes: the kept layer outputs are fp32 (4 bytes, not 2); what a block keeps alive per token (``a``)
    at most doubles (every residual-width tensor fp32 instead of bf16), and cannot exceed upstream's own (the same
    fp32 stream without chunked MLP and patch embed): the smaller of the two bounds. The cached bf16 copies (1.7 GiB)
    replace bf16_weights' copy of the same size: ``A0`` unchanged. The heads are unchanged (fp32 inputs in both).
    """
    out = dict(exact_bf16)
    out.update(kept_element_bytes=4, a=min(2 * exact_bf16["a"], upstream["a"]), remeasured=False,
               note="exact: constants derived from exact+bf16_weights runs of 2026-11-24 (fp32 kept outputs, at most "
                    "2x activations per token); not yet re-measured since exact dropped bf16_weights on 2026-12-02",
               fit_rows=[])
    return out


def fit_time(rows: list[Row], v: str) -> dict[str, float]:
    """c + a*F + b*F**2 (F = frames at 518x518) by non-negative least squares on relative errors, H100 FIT rows."""
    fit = [r for r in rows if r.variant == v and r.fit and r.gpu == "H100" and r.seconds and r.offload == (
        v != "upstream" and r.frames >= OFFLOAD_AUTO_FRAMES)]
    f = np.array([r.frames for r in fit], float)
    t = np.array([r.seconds for r in fit], float)
    design = np.stack([np.ones_like(f), f, f * f], axis=1) / t[:, None]
    c, a, b = lsq_linear(design, np.ones_like(t), bounds=(0, np.inf)).x
    return {"c": float(c), "a": float(a), "b": float(b)}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = load()
    small = [r for r in rows if r.gpu == "H100" and r.frames in (1, 10)]
    weights_bytes = float(np.median([r.base_gib * GIB - r.frames * 3 * SIZE * SIZE * 4 for r in small]))
    memory = {v: fit_memory(rows, v, kb, weights_bytes)
              for v, kb in (("upstream", 4), ("exact_bf16", 2), ("fast", 2))}
    memory["exact"] = derive_exact(memory["exact_bf16"], memory["upstream"])

    fits = {v: fit_time(rows, v) for v in ("upstream", "exact_bf16", "fast")}
    fits["exact"] = dict(fits["exact_bf16"])  # not re-measured (see derive_exact)
    ref_tokens = planner.tokens_per_frame(SIZE, SIZE, constants_with(memory, weights_bytes))
    time = {"reference_tokens": ref_tokens, "fits": fits, "gpus": {"H100": 1.0}}
    k = constants_with(memory, weights_bytes, time)
    # H200: one ratio, from the one-GPU exact run at 100 frames; its other runs are held out.
    anchor = next(r for r in rows if r.gpu == "H200" and r.fit)
    time["gpus"]["H200"] = anchor.seconds / planner.seconds("exact_bf16", True, anchor.frames, SIZE, SIZE, 1, "H100", k)
    # Offloading's cost: exact with vs without at 100 and 200 frames on the H100 (576aca9, same process).
    a576 = {(r["variant"], r["frames"]): r["seconds"] for r in rows_of(SOURCES["h100_576aca9"])}
    time["no_offload_factor"] = float(np.mean([a576[("exact-offload_intermediates", s)] / a576[("exact", s)]
                                               for s in (100, 200)]))
    k["calibration"] = {
        "script": "benchmarks/plan_calibration.py", "sources": {n: str(p.relative_to(ROOT)) for n, p in SOURCES.items()},
        "image_size": f"{SIZE}x{SIZE}", "measured_at_518x392": False,
        "note": "seconds are warm calls (median of the bench's repeats); a first call adds kernel autotuning",
    }
    out = ROOT / "src" / "vggt_turbo" / "plan_constants.json"
    out.write_text(json.dumps(k, indent=1, sort_keys=True) + "\n")
    (RESULTS / "plan_check.md").write_text(check(rows, k))
    log.info("wrote %s and %s", out.relative_to(ROOT), (RESULTS / "plan_check.md").relative_to(ROOT))


def check(rows: list[Row], k: dict[str, Any]) -> str:
    """The held-out table (and the fit's own residuals, for reference) as markdown."""
    def line(r: Row) -> str:
        allocated, reserved = planner.peak_bytes(r.variant, r.offload, r.frames, SIZE, SIZE, 1, k)
        total_err = allocated / GIB / r.total_gib - 1
        act = activations(k, r.variant, r.offload, r.frames)
        act_err = act / r.peak_gib - 1
        pred_t = planner.seconds(r.variant, r.offload, r.frames, SIZE, SIZE, 1, r.gpu, k)
        t = (f"{pred_t:.2f} | {r.seconds:.2f} | {100 * (pred_t / r.seconds - 1):+.1f} %"
             if r.seconds and pred_t else "- | - | -")
        return (f"| {r.gpu} | {r.variant} | {'on' if r.offload else 'off'} | {r.frames} | {allocated / GIB:.2f} | "
                f"{r.total_gib:.2f} | {100 * total_err:+.1f} % | {act:.2f} | {r.peak_gib:.2f} | {100 * act_err:+.1f} % | "
                f"{t} | {r.source} |")

    head = ("| GPU | variant | offload | frames | peak GiB pred. | meas. | err | activations pred. | meas. | err | "
            "s pred. | meas. | err | source |\n|" + "---|" * 14)
    since = [r for r in rows if r.source.startswith(LATER)]
    held = [r for r in rows if not r.fit and r not in since]
    fitted = [r for r in rows if r.fit]
    return "\n".join([
        "# Planner check (generated by `benchmarks/plan_calibration.py`; do not edit)", "",
        "Peak = weights + inputs + activations (max_memory_allocated; the bench's base_gib + peak_gib); "
        "activations = the bench's peak_gib alone. Targets: peak within 10 %, seconds within 15 %. "
        "All runs at 518x518, batch 1, bf16 autocast, torch 2.11; `exact_bf16` = the exact preset before "
        "2026-12-02 (with bf16_weights). H200 seconds = H100 fit x one ratio taken from the H200's exact run at "
        "100 frames.", "",
        "## Held out (not used for fitting)", "", head, *map(line, held), "",
        f"## Checked since the fit: {LATER} (not refitted yet)", "",
        "The first runs of today's `exact` (no bf16_weights) and of the others at 10, 32 and 100 frames on the H200. "
        "They show where the constants miss: at 32 frames every preset's peak is under-predicted by 17-23 % (the "
        "activations by 31-44 %), and exact's seconds by up to 24 % (this H200 had no FlashAttention-4, the H100 "
        "runs the fit comes from had it). A refit that uses them is the next step; until then `reconstruct` still "
        "answers an out-of-memory error with one line and leaves nothing partial.", "",
        head, *map(line, since), "",
        "## Fit set (residuals, for reference)", "", head, *map(line, fitted), "",
        "## Not measured yet", "",
        "- Nothing at 518x392: the planner scales by tokens (activations) and pixels (heads) from 518x518.",
        "- Today's `exact` (no bf16_weights since 2026-12-02): memory derived analytically from `exact_bf16`, "
        "seconds taken from `exact_bf16`.",
        "- No frame counts between 200 and 800 on the H100, none of 150/300/600 anywhere; `fast` and upstream "
        "without offloading at > 200 frames only at 800.",
        "",
    ])


if __name__ == "__main__":
    main()
