"""Fit the planner's constants (``vggt_turbo.planner``) on the committed bench results, and check them on held-out runs.

    PYTHONPATH=src python benchmarks/plan_calibration.py

Reads only committed files (listed in ``SOURCES``), writes ``src/vggt_turbo/plan_constants.json`` (package data)
and ``benchmarks/results/plan_check.md`` (predicted vs measured on runs not used for fitting). Runs on the CPU.

What the data is (518x518 unless said, batch 1, bf16 autocast, torch 2.11):
  - H100, ``latest.json`` (2026-11-24): upstream, exact, fast at 1/10/100/200 frames (offload_intermediates "auto":
    on from 32 frames): FIT.
  - H100, ``2026-11-24-576aca9.json`` (no warm-up: one cold call per row): exact without offloading at 100/200
    frames, and exact and fast at 10 frames, the one eager 10-frame measurement of the presets (FIT); fast at 800
    frames (HELD OUT, memory only).
  - H200, ``2026-11-24.json``: upstream and fast at 800 frames (HELD OUT); ``sequence_parallel.json`` one-GPU rows:
    exact at 100 frames (FIT) and 400 frames (HELD OUT).
  - H200, ``2026-12-02-bf236ec.json`` and ``2026-12-02-7776b45.json``: upstream, today's exact, exact+bf16_weights
    and fast at 1/10/32/100 frames, before and after the DPT heads' prefetch of offloaded chunks (7776b45): FIT,
    but 7776b45 at 32 frames (the current code at a frame count of its own) is HELD OUT; 1-frame rows are left out
    of the time fit as before (upstream's one-frame time differs by 60 % between the two runs).
  - H200, ``2026-12-02-21cabca-518x392.json`` (``plan_measure.sh 1``): upstream, exact with and without offloading
    and fast at 1/10/32/100/200 frames at 518x392: memory HELD OUT (memory is fitted at 518x518 only), seconds
    FIT but at 100 frames (HELD OUT). Seconds are fitted per GPU kind, in 518x518 frames' tokens.
  - H200, ``2026-12-02-54287b8-518x392-long.json`` (``plan_measure.sh 2``): upstream and fast at 400 and 800 frames
    in one process: memory HELD OUT, seconds FIT; ``...-2600.json``: fast at 2600 frames (one cold call): HELD
    OUT, memory and seconds (beyond the fitted range: the planner marks such seconds as extrapolated).
"exact" before 2026-12-02 had ``bf16_weights``: those rows are today's ``exact + bf16_weights`` and calibrate the
variant ``exact_bf16``. Both parts of each run are used for memory: ``full`` (the peak, max of the two phases) and
``aggregator`` (the peak up to the aggregator's end: its phase alone). The presets' rows at <= 16 frames with a
warm-up replay a CUDA graph, whose private pool is not allocated memory: their peak is not a measurement of the
working set and they are left out of the memory fit and check (their seconds are used). Rows measured before
7776b45 are predicted without the prefetched chunk (``heads_prefetch_chunks`` 0), as the code then ran.
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
SOURCES = {
    "h100_latest": H100 / "latest.json",
    "h100_576aca9": H100 / "2026-11-24-576aca9.json",
    "h200_latest": H200 / "2026-11-24.json",  # the 800-frame run (latest.json has moved on since)
    "h200_bf236ec": H200 / "2026-12-02-bf236ec.json",  # today's exact (no bf16_weights), before the prefetch
    "h200_7776b45": H200 / "2026-12-02-7776b45.json",  # the current code: heads prefetch offloaded chunks
    "h200_seq": H200 / "sequence_parallel.json",
    "h200_21cabca_392": H200 / "2026-12-02-21cabca-518x392.json",  # 518x392 (plan_measure.sh 1): HELD OUT
    "h200_54287b8_392_long": H200 / "2026-12-02-54287b8-518x392-long.json",  # 400, 800: memory HELD OUT
    "h200_54287b8_392_2600": H200 / "2026-12-02-54287b8-518x392-2600.json",  # fast, 2600 frames: HELD OUT
}
GIB = 1024**3
SIZE = 518
OFFLOAD_AUTO_FRAMES = 32  # patches.runtime.offload_intermediates.OFFLOAD_AUTO_FRAMES (not imported: it imports torch)
CUDA_GRAPH_MAX_FRAMES = 16  # TurboConfig.cuda_graph_max_frames: the presets replay a graph up to this length
HELD_OUT_FRAMES_7776B45 = 32

MODEL = {
    # VGGT at the pinned commit: aggregator.py (embed_dim 1024, patch 14, camera + 4 register tokens per frame,
    # the heads read layers 4, 11, 17, 23 of the 24 frame/global pairs, each 2*1024 channels), dpt_head.py (the
    # DPT heads run on chunks of 8 frames, in fp32), 6 fp32 values per output pixel (depth, its confidence, xyz,
    # its confidence). _head_inputs.py: with offloading, each DPT head prefetches one chunk ahead.
    "embed_dim": 1024, "patch_size": 14, "special_tokens": 5, "kept_layers": [4, 11, 17, 23],
    "heads_chunk_frames": 8, "heads_element_bytes": 4, "heads_prefetch_chunks": 1, "head_output_values": 6,
    "offload_auto_frames": OFFLOAD_AUTO_FRAMES,
    # The CUDA context and cuBLAS/cuDNN workspaces outside the caching allocator: an assumption, not measured here.
    "context_bytes": int(0.5 * GIB),
}
PRESETS = ("exact", "exact_bf16", "fast")


@dataclass
class Row:
    source: str
    gpu: str
    variant: str  # planner variant
    offload: bool
    frames: int
    seconds: Optional[float]  # None: a cold call, or a part whose time is not modelled
    peak_gib: float  # above base
    base_gib: float
    reserved_gib: Optional[float]
    fit: bool
    part: str = "full"  # "aggregator": the peak up to the aggregator's end (its phase alone)
    prefetch: bool = False  # measured with the heads' prefetch of offloaded chunks (since 7776b45)
    graph: bool = False  # a CUDA-graph replay: the allocated peak leaves out the graph's pool
    height: int = SIZE
    width: int = SIZE
    time_fit: Optional[bool] = None  # whether its seconds are fitted (None: as ``fit``)
    fa4: bool = False  # timed with FlashAttention-4 on a GPU whose curves were fitted without it

    @property
    def fits_time(self) -> bool:
        return self.fit if self.time_fit is None else self.time_fit

    @property
    def total_gib(self) -> float:
        return self.base_gib + self.peak_gib


def rows_of(path: Path, parts: tuple[str, ...] = ("full",)) -> list[dict[str, Any]]:
    return [r for r in json.loads(path.read_text())["rows"]
            if r.get("part", "full") in parts and r.get("peak_gib") is not None]


def replays_graph(variant: str, frames: int) -> bool:
    """Whether a warm call of ``variant`` replays a CUDA graph (the bench's timed calls follow a warm-up)."""
    return variant != "upstream" and frames <= CUDA_GRAPH_MAX_FRAMES


def load() -> list[Row]:
    """The rows the fit and check use, each labelled with the planner's variant and whether it was offloaded."""
    out: list[Row] = []
    both = ("full", "aggregator")

    def auto(v: str, frames: int) -> bool:
        return v != "upstream" and frames >= OFFLOAD_AUTO_FRAMES

    renamed = {"upstream": "upstream", "exact": "exact_bf16", "fast": "fast"}
    for r in rows_of(SOURCES["h100_latest"], both):
        if r["variant"] in renamed:
            v = renamed[r["variant"]]
            out.append(Row("H100 latest.json", "H100", v, auto(v, r["frames"]), r["frames"],
                           r["seconds"] if r["part"] == "full" else None, r["peak_gib"], r["base_gib"],
                           r["reserved_gib"], True, r["part"], graph=replays_graph(v, r["frames"])))
    for r in rows_of(SOURCES["h100_576aca9"], both):
        if r["variant"] == "exact-offload_intermediates":
            out.append(Row("H100 576aca9", "H100", "exact_bf16", False, r["frames"],
                           r["seconds"] if r["part"] == "full" else None, r["peak_gib"], r["base_gib"],
                           r["reserved_gib"], True, r["part"]))
        if r["variant"] in ("exact", "fast") and r["frames"] == 10:  # eager (no warm-up): memory only
            out.append(Row("H100 576aca9", "H100", renamed[r["variant"]], False, 10, None, r["peak_gib"],
                           r["base_gib"], None, True, r["part"]))
        if r["variant"] == "fast" and r["frames"] == 800 and r["part"] == "full":  # a single cold call
            out.append(Row("H100 576aca9", "H100", "fast", True, 800, None, r["peak_gib"], r["base_gib"],
                           r["reserved_gib"], False))
    for r in rows_of(SOURCES["h200_latest"]):  # 800 frames: memory held out, seconds fitted (the long end)
        out.append(Row("H200 latest.json", "H200", r["variant"], r["variant"] != "upstream", r["frames"], r["seconds"],
                       r["peak_gib"], r["base_gib"], r["reserved_gib"], False, time_fit=True))
    h200_new = {"upstream": "upstream", "exact": "exact", "exact+bf16_weights": "exact_bf16", "fast": "fast"}
    for name, prefetch in (("h200_bf236ec", False), ("h200_7776b45", True)):
        label = "H200 " + SOURCES[name].name
        for r in rows_of(SOURCES[name], both):
            if r["variant"] not in h200_new:
                continue
            v, n = h200_new[r["variant"]], r["frames"]
            timed = r["part"] == "full" and n >= 10
            held = prefetch and n == HELD_OUT_FRAMES_7776B45
            out.append(Row(label, "H200", v, auto(v, n), n, r["seconds"] if timed else None, r["peak_gib"],
                           r["base_gib"], r["reserved_gib"], not held, r["part"], prefetch and auto(v, n),
                           replays_graph(v, n)))
    # 518x392 (today's code, 21cabca): memory held out (a check of the planner's scaling by tokens and pixels);
    # seconds fitted but for 100 frames, held out.
    label = "H200 " + SOURCES["h200_21cabca_392"].name
    offloads = {"upstream": False, "exact": None, "exact-offload_intermediates": False, "fast": None}
    for r in rows_of(SOURCES["h200_21cabca_392"], both):
        v, n = r["variant"].split("-")[0], r["frames"]
        offload = auto(v, n) if offloads[r["variant"]] is None else False
        timed = r["part"] == "full" and n >= 10
        out.append(Row(label, "H200", v, offload, n, r["seconds"] if timed else None, r["peak_gib"], r["base_gib"],
                       r["reserved_gib"], False, r["part"], offload, replays_graph(v, n), 392, 518, n != 100))
    # 518x392 long sequences: 400 and 800 frames (plan_measure.sh 2): memory held out, seconds fitted (today's code
    # at the long end); fast at 2600 frames (one cold call): held out, memory and seconds, beyond the fitted range.
    for name in ("h200_54287b8_392_long", "h200_54287b8_392_2600"):
        for r in rows_of(SOURCES[name], both):
            v, n = r["variant"], r["frames"]
            out.append(Row("H200 " + SOURCES[name].name, "H200", v, auto(v, n), n,
                           r["seconds"] if r["part"] == "full" else None, r["peak_gib"], r["base_gib"],
                           r["reserved_gib"], False, r["part"], auto(v, n), False, 392, 518,
                           name == "h200_54287b8_392_long"))
    for r in rows_of(SOURCES["h200_seq"]):
        if r.get("gpus") == 1:
            # With FlashAttention-4, unlike the other H200 runs: its seconds are not fitted.
            out.append(Row("H200 sequence_parallel.json (1 GPU)", "H200", "exact_bf16", True, r["frames"],
                           r["seconds"], r["peak_gib"], r["base_gib"], None, r["frames"] == 100, time_fit=False,
                           fa4=True))
    return out


def constants_with(memory: dict[str, Any], weights_bytes: float, time: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    return {"model": dict(MODEL, weights_bytes=weights_bytes), "memory": memory, "time": time or {}}


def as_measured(k: dict[str, Any], r: Row) -> dict[str, Any]:
    """``k`` as the code that measured ``r`` ran: without the prefetched chunk before 7776b45."""
    if r.prefetch:
        return k
    return dict(k, model=dict(k["model"], heads_prefetch_chunks=0))


def predicted(k: dict[str, Any], r: Row) -> tuple[float, float]:
    """(weights + inputs, the phase ``r`` measures: the larger one, or the aggregator's) in GiB."""
    base, aggregator, heads = planner.phases(r.variant, r.offload, r.frames, r.height, r.width, 1, as_measured(k, r))
    phase = aggregator if r.part == "aggregator" else max(aggregator, heads)
    return base / GIB, phase / GIB


def reserved_ratio(rows: list[Row], variants: tuple[str, ...]) -> float:
    """Whether it fits is decided on reserved memory: the allocator's reserve over the allocated peak, the median
    over the long runs (>= 100 frames) of the fit set, where the peak is what matters. The presets share one ratio
    (the same allocator pattern; today's exact alone has two such runs, both offloaded). 576aca9's reserved memory
    includes the pool its earlier variants left: not used."""
    return float(np.median([r.reserved_gib / r.peak_gib for r in rows if r.variant in variants and r.fit
                            and not r.graph and r.reserved_gib and r.frames >= 100 and r.part == "full"
                            and r.source != "H100 576aca9"]))


def fit_memory(rows: list[Row], v: str, kept_bytes: int, weights_bytes: float,
               h: Optional[float] = None) -> dict[str, Any]:
    """A0, a, H0 (and h unless given: the presets take upstream's) for one variant: least squares on relative
    errors of the activations' peak over the FIT rows that measured the working set (no graph replays)."""
    fit = [r for r in rows if r.variant == v and r.fit and not r.graph]
    ratio = reserved_ratio(rows, PRESETS if v in PRESETS else (v,))

    def params(x: np.ndarray) -> dict[str, Any]:
        return {"A0": x[0] * GIB, "a": x[1] * 1e3, "H0": x[2] * GIB, "h": x[3] * 1e3 if h is None else h,
                "kept_element_bytes": kept_bytes, "reserved_ratio": ratio, "remeasured": True}

    def residuals(x: np.ndarray) -> np.ndarray:
        k = constants_with({v: params(x)}, weights_bytes)
        return np.array([predicted(k, r)[1] / r.peak_gib - 1 for r in fit])

    # The max() of the two phases has kinks: start from several points and keep the best fit.
    starts = [np.array([a0, a, h0, hh]) for a0 in (0.5, 2.0) for a in (5.0, 20.0, 40.0) for h0 in (1.0, 3.0)
              for hh in (0.3, 1.0)]
    result = min((least_squares(residuals, x0=x0, bounds=(0, np.inf)) for x0 in starts), key=lambda res: res.cost)
    out = params(result.x)
    out["fit_rows"] = [f"{r.source}: {r.part} {r.frames} frames{' offload' if r.offload else ''}" for r in fit]
    return out


def fit_time(rows: list[Row], v: str, gpu: str, ref_tokens: int) -> dict[str, float]:
    """c + a*F + b*F**2 (F = frames in 518x518 frames' tokens) by non-negative least squares on relative errors,
    over one GPU's timed fit rows (each GPU its own curve: the H100 runs had FlashAttention-4, the H200's not)."""
    fit = [r for r in rows if r.variant == v and r.fits_time and r.gpu == gpu and r.seconds and r.offload == (
        v != "upstream" and r.frames >= OFFLOAD_AUTO_FRAMES)]
    f = np.array([r.frames * planner.tokens_per_frame(r.height, r.width) / ref_tokens for r in fit], float)
    t = np.array([r.seconds for r in fit], float)
    design = np.stack([np.ones_like(f), f, f * f], axis=1) / t[:, None]
    c, a, b = lsq_linear(design, np.ones_like(t), bounds=(0, np.inf)).x
    # The longest fitted run: beyond it the planner marks its seconds as an extrapolation.
    return {"c": float(c), "a": float(a), "b": float(b), "measured_up_to": float(f.max())}


def exact_over_bf16(rows: list[Row]) -> float:
    """Today's exact against exact+bf16_weights, timed in the same H200 processes (FIT rows): the median ratio.
    Only the H200 runs have today's exact: on the H100 its curve is exact_bf16's times this ratio."""
    timed = {(r.source, r.frames, r.variant): r.seconds for r in rows if r.fit and r.seconds and r.gpu == "H200"}
    return float(np.median([t / timed[(src, n, "exact_bf16")] for (src, n, v), t in timed.items()
                            if v == "exact" and (src, n, "exact_bf16") in timed]))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rows = load()
    small = [r for r in rows if r.gpu == "H100" and r.frames in (1, 10) and r.part == "full"]
    weights_bytes = float(np.median([r.base_gib * GIB - r.frames * 3 * SIZE * SIZE * 4 for r in small]))
    memory = {"upstream": fit_memory(rows, "upstream", 4, weights_bytes)}
    h = memory["upstream"]["h"]
    memory.update({v: fit_memory(rows, v, kb, weights_bytes, h) for v, kb in (("exact", 4), ("exact_bf16", 2),
                                                                               ("fast", 2))})

    ref_tokens = planner.tokens_per_frame(SIZE, SIZE, constants_with(memory, weights_bytes))
    h100 = {v: fit_time(rows, v, "H100", ref_tokens) for v in ("upstream", "exact_bf16", "fast")}
    ratio = exact_over_bf16(rows)
    h100["exact"] = {key: value * ratio if key in ("a", "b", "c") else value for key, value in h100["exact_bf16"].items()}
    h200 = {v: fit_time(rows, v, "H200", ref_tokens) for v in ("upstream", "exact", "exact_bf16", "fast")}
    time = {"reference_tokens": ref_tokens, "fits": {"H100": h100, "H200": h200}, "exact_over_exact_bf16": ratio}
    # Offloading's cost: exact with vs without at 100 and 200 frames on the H100 (576aca9, same process).
    a576 = {(r["variant"], r["frames"]): r["seconds"] for r in rows_of(SOURCES["h100_576aca9"])}
    time["no_offload_factor"] = float(np.mean([a576[("exact-offload_intermediates", s)] / a576[("exact", s)]
                                               for s in (100, 200)]))
    k = constants_with(memory, weights_bytes, time)
    k["calibration"] = {
        "script": "benchmarks/plan_calibration.py", "sources": {n: str(p.relative_to(ROOT)) for n, p in SOURCES.items()},
        "image_size": f"{SIZE}x{SIZE} (memory); {SIZE}x{SIZE} and 518x392 (H200 seconds)",
        "note": "seconds are warm calls (median of the bench's repeats); a first call adds kernel autotuning",
    }
    out = ROOT / "src" / "vggt_turbo" / "plan_constants.json"
    out.write_text(json.dumps(k, indent=1, sort_keys=True) + "\n")
    (RESULTS / "plan_check.md").write_text(check(rows, k))
    log.info("wrote %s and %s", out.relative_to(ROOT), (RESULTS / "plan_check.md").relative_to(ROOT))


HEAD = ("| GPU | variant | part | offload | prefetch | frames | size | peak GiB pred. | meas. | err | "
        "activations pred. | meas. | err | s pred. | meas. | err | source |\n|" + "---|" * 17)


def line(r: Row, k: dict[str, Any]) -> str:
    """One row of the check: predicted vs measured peak (total and activations alone) and seconds."""
    base, phase = predicted(k, r)
    if r.graph:  # the allocated peak leaves the graph's pool out: nothing to compare
        memory = f"{base + phase:.2f} | {r.total_gib:.2f} | graph | {phase:.2f} | {r.peak_gib:.2f} | graph"
    else:
        memory = (f"{base + phase:.2f} | {r.total_gib:.2f} | {100 * ((base + phase) / r.total_gib - 1):+.1f} % | "
                  f"{phase:.2f} | {r.peak_gib:.2f} | {100 * (phase / r.peak_gib - 1):+.1f} %")
    pred_t = planner.seconds(r.variant, r.offload, r.frames, r.height, r.width, 1, r.gpu, k)
    t = (f"{pred_t:.2f} | {r.seconds:.2f} | {100 * (pred_t / r.seconds - 1):+.1f} %{' (fit)' if r.fits_time else ' (FA4)' if r.fa4 else ''}"
         if r.seconds and pred_t else "- | - | -")
    prefetch = ("on" if r.prefetch else "off") if r.offload else "-"
    return (f"| {r.gpu} | {r.variant} | {r.part} | {'on' if r.offload else 'off'} | {prefetch} | {r.frames} | "
            f"{r.width}x{r.height} | {memory} | {t} | {r.source} |")


def check(rows: list[Row], k: dict[str, Any]) -> str:
    """The held-out table and the fit's own residuals as markdown."""
    held = [r for r in rows if not r.fit]
    fitted = [r for r in rows if r.fit]
    return "\n".join([
        "# Planner check (generated by `benchmarks/plan_calibration.py`; do not edit)", "",
        "Peak = weights + inputs + activations (max_memory_allocated; the bench's base_gib + peak_gib); "
        "activations = the bench's peak_gib alone. Part `full`: the forward's peak; `aggregator`: the peak up to the "
        "aggregator's end (the planner's aggregator phase). Targets: peak within 10 %, seconds within 15 %. "
        "Batch 1, bf16 autocast, torch 2.11; `exact_bf16` = today's exact + bf16_weights (the exact preset before "
        "2026-12-02); prefetch: whether the DPT heads prefetched the next offloaded chunk (since 7776b45; rows "
        "before it are predicted without). Memory is fitted on 518x518 runs only. Seconds: per-variant curves per "
        "GPU kind in 518x518 frames' tokens, fitted on that GPU's timed rows marked `(fit)` (the H100's today's "
        "`exact`: exact_bf16's curve times the ratio between the two in the same H200 runs). The 2026-12-02 H200 "
        "runs had no FlashAttention-4, the H100 runs and the sequence-parallel H200 run had it: its seconds, "
        "marked `(FA4)`, are neither fitted nor a target (the H200 curves are torch's attention kernels).", "",
        "## Held out (not used for fitting)", "",
        "Today's code (7776b45) at 32 frames, a frame count of its own (bf236ec's 32-frame rows, before the "
        "prefetch, are in the fit); the long runs: 400 and 800 frames; every 518x392 row's memory (21cabca, "
        "`benchmarks/plan_measure.sh 1`; 54287b8, `plan_measure.sh 2`, 400 and 800 frames) and its seconds at 100 "
        "frames (the others are marked `(fit)`); fast at 2600 frames, 518x392 (one cold call), memory and seconds: "
        "longer than any fitted run, its seconds are what the planner marks as an extrapolation.", "",
        HEAD, *(line(r, k) for r in held), "",
        "## Fit set (residuals, for reference)", "",
        "`graph`: the presets' warm calls of <= 16 frames replay a CUDA graph; its pool is not allocated memory, so "
        "these peaks are not the working set and are not fitted (their seconds are).", "",
        HEAD, *(line(r, k) for r in fitted), "",
        "## Not measured yet", "",
        "- 518x392 beyond 800 frames but fast at 2600; exact (with or without offloading) beyond 200 frames there.",
        "- Today's `exact` beyond 200 frames (H200); on the H100 not at all (its seconds there are exact_bf16's "
        "curve times one ratio).",
        "- The presets' heads below 8 frames: `h` (the DPT heads' working set per pixel) is upstream's.",
        "- No frame counts between 200 and 800 on the H100, none of 150/300/600 anywhere; `fast` without "
        "offloading beyond 200 frames only at 800 (518x518), before 7776b45.",
        "",
    ])


if __name__ == "__main__":
    main()
