"""The ``bench`` command: parse the arguments, sweep frame counts and variants, save and report the rows."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import logging
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .fidelity import find_examples
from ..random_model import SMALL_IMAGE, build_vggt, random_images
from . import precision
from .meta import device_slug, make_meta, parse_image_size
from .parallel import run_parallel
from .report import (
    PLOT_VARIANTS,
    finalize,
    fmt_err,
    fmt_seconds,
    load_json,
    merge,
    report_main,
    row_key,
    run_summary,
    text_table,
    write_json,
    write_report,
)
from .sweep import Budget, Bench
from .variants import select_variants

log = logging.getLogger(__name__)

CUDA_FRAMES = (1, 10, 50, 100, 200)
CPU_FRAMES = (1, 2, 4, 8)
CUDA_PHASE_FRAMES = 100
FULL_IMAGE = 518


def describe_rows(rows: list[dict]) -> str:
    """One line for a variant at one frame count: each part's time, speedup and peak, then the error."""
    first = rows[0]
    line = f"[{first['frames']:>4} fr] {first['variant']:<23}"
    for row in rows:
        if row.get("error"):
            line += f" | {row['part']} {row['error']}"
            continue
        sp = f" {row['speedup_vs_upstream']:.2f}x" if row.get("speedup_vs_upstream") else ""
        peak = f" {row['peak_gib']:.2f} GiB" if row.get("peak_gib") is not None else ""
        line += f" | {row['part']} {fmt_seconds(row['seconds'])}{sp}{peak}"
    errs = [r.get("max_rel_err_vs_upstream") for r in rows if not r.get("error")]
    if errs:
        known = [e for e in errs if e is not None]
        line += f" | max rel err {fmt_err(max(known)) if known else '–'} ({'exact' if first.get('exact') else 'approx'})"
    return line


def _progress(total: int, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        tqdm = None
    if tqdm is None or not enabled or not sys.stderr.isatty():  # no bar in logs: the per-row lines are the progress
        class _NoBar:
            def update(self, n: int = 1) -> None: ...
            def set_description(self, s: str) -> None: ...
            def write(self, s: str) -> None:
                print(s, flush=True)
            def close(self) -> None: ...
        return _NoBar()
    return tqdm(total=total, desc="bench", unit="run", file=sys.stderr, dynamic_ncols=True)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Any:
    """A ``timeout``'s SIGTERM becomes KeyboardInterrupt so the report of the rows done so far is still written."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def parse_frames(text: Optional[str], device: torch.device) -> list[int]:
    if text is None:
        return list(CUDA_FRAMES if device.type == "cuda" else CPU_FRAMES)
    if text.strip().lower() in ("", "none"):
        return []
    frames = sorted({int(x) for x in text.split(",") if x.strip()})
    if any(f < 1 for f in frames):
        raise ValueError(f"frame counts must be >= 1, got {frames}")
    return frames


def phase_frames(spec: str, frames: list[int], device: torch.device) -> Optional[int]:
    """``--phases``: ``auto`` (100 on CUDA, the largest default CPU count on the CPU, when that count is swept),
    ``off``, ``on`` (that default count even if not swept) or a frame count."""
    default = CUDA_PHASE_FRAMES if device.type == "cuda" else max(CPU_FRAMES)
    spec = spec.strip().lower()
    if spec == "off":
        return None
    if spec == "auto":
        return default if default in frames else None
    if spec == "on":
        return default
    return int(spec)


def run(args: argparse.Namespace) -> int:
    """The ``bench`` subcommand: sweep, save (merging with ``--merge``), report. Returns the exit code."""
    if args.report_only is not None:
        return report_main([args.report_only] if args.report_only else [], default_out=Path(args.out))
    if args.sequence_parallel:
        return run_parallel(args)
    if args.precision:
        return run_precision_command(args)
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc)
    device = _device(args)
    if device is None:
        return 2
    try:
        frames = parse_frames(args.frames, device)
        variants = select_variants(args.variants)
        at = phase_frames(args.phases, frames, device)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.repeats < 1 or args.warmup < 0:
        print("error: --repeats must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2
    phase_variants = [v for v in variants if v.name in PLOT_VARIANTS] if at is not None and args.part != "aggregator" else []
    if at is not None and not phase_variants:
        at = None

    out_dir = Path(args.out) / device_slug(device, args.size)
    meta = make_meta(args, device, started)
    meta["argv"] = " ".join(sys.argv[1:]) if args.argv is None else args.argv
    if at is not None:
        meta["phase_timing"] = ("events in forward hooks during the timed full-model calls" if at in frames
                                else "events in forward hooks, separate calls")
    data: dict[str, Any] = {"meta": meta, "rows": [], "phases": []}
    previous = None
    if args.merge and (out_dir / "latest.json").exists():
        previous = load_json(out_dir / "latest.json")
        try:
            merge(previous, data)
        except ValueError as err:
            print(f"error: {err} ({out_dir / 'latest.json'})", file=sys.stderr)
            return 2

    def result() -> dict:
        return merge(previous, data) if previous is not None else finalize(
            {"meta": {**meta, "runs": [run_summary(meta)]}, "rows": list(data["rows"]), "phases": list(data["phases"])}
        )

    print(f"vggt-turbo bench: {meta['gpu']}, {args.size} model, {meta['image_size']} px, frames {frames}, "
          f"variants {[v.name for v in variants]}, part {args.part}, {args.warmup} warm-up + {args.repeats} timed"
          + (f", phases at {at} frames" if at is not None else "") + f" -> {out_dir}", flush=True)
    build_start = time.perf_counter()
    model = build_vggt(args.size, seed=0, enable_track=False).to(device)
    log.info("model built and moved to %s in %.1f s", device, time.perf_counter() - build_start)

    budget = Budget(args.deadline, t0)
    total = sum(len(variants) + 1 for _ in frames)  # + the fp32 reference
    if at is not None and at not in frames:
        total += len(phase_variants)
    bar = _progress(total, enabled=not args.no_progress)
    bench = Bench(model, device, args, budget)
    interrupted = False
    with _sigterm_as_interrupt(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*autocast.*")
        try:
            for frames_n in frames:
                images = random_images(frames_n, args.image_size, seed=0).to(device)
                reference = None
                bar.set_description(f"{frames_n} frames: upstream in fp32 (reference)")
                if not args.no_reference and budget.allows(frames_n, 2, f"fp32 reference at {frames_n} frames"):
                    reference = bench.fp32_reference(images)  # costs about two bf16 calls
                bar.update()
                for variant in variants:
                    bar.set_description(f"{frames_n} frames: {variant.name}")
                    with_phases = at == frames_n and variant in phase_variants
                    calls = args.warmup + args.repeats
                    if budget.allows(frames_n, calls, f"{variant.name} at {frames_n} frames", variant.name):
                        rows, phase_rows = bench.run_variant(variant, images, reference, phases=with_phases)
                        data["rows"] += rows
                        data["phases"] += phase_rows
                        write_json(result(), out_dir)  # after every row: a killed command keeps what it measured
                        if rows:
                            keys = {row_key(r) for r in rows}
                            bar.write(describe_rows([r for r in result()["rows"] if row_key(r) in keys]))
                    bar.update()
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                del images, reference
            if at is not None and at not in frames:
                images = random_images(at, args.image_size, seed=0).to(device)
                for variant in phase_variants:
                    bar.set_description(f"phases at {at} frames: {variant.name}")
                    calls = args.warmup + args.repeats
                    if budget.allows(at, calls, f"phases of {variant.name} at {at} frames", variant.name):
                        _, phase_rows = bench.run_variant(variant, images, None, phases=True, phases_only=True)
                        data["phases"] += phase_rows
                        write_json(result(), out_dir)
                    bar.update()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                del images
        except KeyboardInterrupt as err:
            interrupted = True
            bar.write(f"interrupted ({err or 'Ctrl-C'}): writing the rows measured so far")
        finally:
            bar.close()
    if budget.skipped:
        meta["skipped_for_deadline"] = budget.skipped
    final = result()
    if budget.skipped:
        final["meta"]["skipped_for_deadline"] = budget.skipped
    write_json(final, out_dir)
    written = write_report(final, out_dir)
    print()
    print(text_table(final))
    if budget.skipped:
        print(f"skipped (--deadline {args.deadline:g} s): {', '.join(budget.skipped)}")
    print(f"wrote {out_dir / 'latest.json'}, {', '.join(p.name for p in written)} in {time.perf_counter() - t0:.1f} s")
    failed = [r for r in data["rows"] if r.get("error")]
    return 130 if interrupted else (1 if failed and len(failed) == len(data["rows"]) else 0)


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------

HELP = "time upstream VGGT, each optimization alone and the presets (latency, peak memory, error vs upstream in fp32); --precision: the precision contract"


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add = parser.add_argument
    add("--frames", help=f"comma-separated frame counts (default {','.join(map(str, CUDA_FRAMES))} on CUDA, "
        f"{','.join(map(str, CPU_FRAMES))} on the CPU; 'none': phases only)")
    add("--variants", help="comma-separated variants: upstream, a TurboConfig flag name, exact, fast, or the groups "
        "all (default), presets, flags; upstream always runs once per frame count for the errors")
    add("--repeats", type=int, default=3, help="timed calls per row; the median is kept (default 3)")
    add("--warmup", type=int, default=1, help="untimed calls before them (default 1)")
    add("--out", default="benchmarks/results", help="results folder; files go to <out>/<device-slug>/ (default %(default)s)")
    add("--part", choices=("full", "aggregator", "both"), default="both",
        help="full model, aggregator alone, or both from the same calls (default)")
    add("--phases", default="auto", metavar="auto|off|on|FRAMES",
        help="phase split (patch embed, frame/global blocks, heads) for upstream and the presets: at FRAMES, or "
        f"'on' at {CUDA_PHASE_FRAMES} (CUDA) / {max(CPU_FRAMES)} (CPU); 'auto' (default) does that only when "
        "that count is in --frames, re-using the timed calls")
    add("--size", choices=("full", "small"), help="model size (default: full on CUDA, small on the CPU)")
    add("--image-size", type=parse_image_size, metavar="N|WxH", help=f"frame size: N for square frames or WxH, "
        f"e.g. 518x392 (multiples of 14; default {FULL_IMAGE} for full, {SMALL_IMAGE} for small)")
    add("--device", help="torch device (default: cuda if available, else cpu)")
    add("--merge", action="store_true", help="merge into an existing <out>/<slug>/latest.json (same (variant, "
        "frames, part) rows replaced, others kept) instead of starting a new one")
    add("--deadline", type=float, help="seconds since start: a row whose estimated time (from the calls seen so "
        "far) would end past it is skipped and listed, for time-limited GPU commands; rows are saved as they finish "
        "and SIGTERM still writes the report")
    add("--no-reference", action="store_true", help="skip the untimed upstream-fp32 call (rows without errors): "
        "for long sequences where only time and memory are wanted (at 400 frames it costs minutes)")
    add("--report-only", nargs="?", const="", metavar="JSON", help="only regenerate latest.md and the plots from "
        "JSON (default: every <out>/*/latest.json)")
    add("--no-progress", action="store_true", help="no progress bar")
    add("--sequence-parallel", action="store_true", help="under torchrun: time each variant (default exact) on 1 "
        "GPU and on all N GPUs with sequence_parallel, same weights and inputs, into <out>/<slug>/sequence_parallel"
        ".json; NCCL needs NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 (see bench/parallel.py)")
    add("--max-frames", action="store_true", help="with --sequence-parallel: predict the largest frame count that "
        "fits per GPU count from the measured peaks (needs two frame counts or more)")
    add("--precision", action="store_true", help="the precision contract instead of timings: every variant's error "
        "against upstream in fp32 (TF32 off), beside upstream-autocast's, at --frames (default 1,10,32 on CUDA) and "
        "--batches, into <out>/<slug>/precision.{json,md}")
    add("--batches", default="1,2", help="with --precision: batch sizes (default %(default)s)")
    add("--examples", type=Path, help="with --precision: folder of example scenes (<scene>/images/*), loaded by "
        "upstream's loader; default $VGGT_EXAMPLES or shared/data/vggt-examples; without any, random 518x392 images")
    parser.set_defaults(func=run, argv=None)
    return parser


def _device(args: argparse.Namespace) -> Optional[torch.device]:
    """``--device`` (default: CUDA when present) made current, with the model size and image side it implies;
    None (after one line on stderr) when CUDA is asked for and absent."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return None
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    args.size = args.size or ("full" if device.type == "cuda" else "small")
    side = FULL_IMAGE if args.size == "full" else SMALL_IMAGE
    args.image_size = args.image_size or (side, side)
    return device


def run_precision_command(args: argparse.Namespace) -> int:
    """``bench --precision``: write ``<out>/<slug>/precision.json`` and ``precision.md``."""
    started = datetime.datetime.now(datetime.timezone.utc)
    device = _device(args)
    if device is None:
        return 2
    default = precision.CUDA_FRAMES if device.type == "cuda" else precision.CPU_FRAMES
    try:
        frames = parse_frames(args.frames or ",".join(map(str, default)), device)
        batches = parse_frames(args.batches, device)
    except ValueError as err:
        print(f"error: --frames and --batches take comma-separated counts >= 1 ({err})", file=sys.stderr)
        return 2
    if not frames or not batches:
        print("error: --frames and --batches need at least one count each", file=sys.stderr)
        return 2
    examples = args.examples or find_examples()
    size_hw = (392, 518) if args.size == "full" else args.image_size
    model = build_vggt(args.size, enable_track=True).to(device)
    rows, kinds = precision.run_precision(model, device, frames, batches, examples if args.size == "full" else None,
                                          size_hw=size_hw)
    meta = make_meta(args, device, started)
    meta.update(
        reference="upstream in fp32, no autocast, TF32 off for matmuls and convolutions",
        autocast="bfloat16 autocast (torch's default TF32 settings)",
        inputs=f"{kinds} ({size_hw[1]}x{size_hw[0]}, upstream's loader for the examples)",
        weights="random init with the near-zero parameters re-drawn (vggt_turbo.random_model, seed 0), track head",
        contract=f"exact tier: every output and the rotation within {precision.CONTRACT}x of upstream-autocast's "
        "error against the reference",
    )
    for key in ("warmup", "repeats", "statistic", "timer", "aggregator_timing", "peak_memory", "errors", "batch"):
        meta.pop(key, None)
    data = {"meta": meta, "rows": rows}
    out_dir = Path(args.out) / device_slug(device, args.size)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "precision.json").write_text(json.dumps(data, indent=1) + "\n")
    (out_dir / "precision.md").write_text(precision.markdown(data))
    print(precision.markdown(data))
    print(f"wrote {out_dir / 'precision.json'} and precision.md")
    outside = [r for r in rows if r["tier"] == "exact" and not r.get("within_contract")]
    return 1 if outside else 0


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``vggt-turbo bench``."""
    parser = subparsers.add_parser("bench", help=HELP, description=HELP)
    return add_arguments(parser)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``benchmarks/bench.py`` and ``python -m vggt_turbo.bench``."""
    parser = argparse.ArgumentParser(prog="bench", description=HELP)
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = " ".join(argv if argv is not None else sys.argv[1:])
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.func(args)

