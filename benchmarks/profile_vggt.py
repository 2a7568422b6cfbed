#!/usr/bin/env python
"""Profile one VGGT forward (random weights, no track head) with a preset, upstream, or one flag alone.

    python benchmarks/profile_vggt.py --preset exact --frames 10           # GPU: full model, 518 px
    python benchmarks/profile_vggt.py --device cpu --frames 2               # CPU: small model, 56 px

With a CUDA device and ``nsys`` on the PATH (``--tool auto``, the default) the script re-executes itself under
``nsys profile --trace=cuda,nvtx,osrt`` with ``nvtx=True`` in the config, capturing only the profiled forward
(``--capture-range=cudaProfilerApi``): ``<out>/profile.nsys-rep``, plus ``<out>/top_kernels.md`` from
``nsys stats`` when that works. Otherwise it runs under ``torch.profiler`` (CPU + CUDA activities), with
``record_function`` labels from forward hooks (patch_embed, frame_block[i], global_block[i], heads), and writes a
Chrome trace ``<out>/trace.json`` (open it in https://ui.perfetto.dev; gzipped to ``trace.json.gz`` when it is
over 15 MiB) and ``<out>/top_kernels.md``: the top kernels by self device time (operators by self CPU time on
the CPU). Warm-up calls come first, so the profiled call is a steady-state one (a CUDA-graph replay for the
presets at <= 16 frames, ``cuda_graph_max_frames``).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

INNER = "VGGT_TURBO_PROFILE_UNDER_NSYS"
MAX_TRACE_BYTES = 15 * 2**20
# The record_function labels that label_hooks opens (kept out of the kernel table: they span their kernels).
LABEL = re.compile(r"patch_embed|(frame|global)_block\[\d+\]|camera_head|depth_head|point_head")


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="exact", help="exact (default), fast, upstream, or a TurboConfig flag (alone)")
    p.add_argument("--frames", type=int, help="frames (default 10 on CUDA, 2 on the CPU)")
    p.add_argument("--size", choices=("full", "small"), help="model size (default: full on CUDA, small on the CPU)")
    p.add_argument("--image-size", type=int, help="square image side (default 518 full, 56 small)")
    p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--out", default="benchmarks/results/profile", help="output folder (default %(default)s)")
    p.add_argument("--tool", choices=("auto", "nsys", "torch"), default="auto", help="profiler (default: nsys if "
                   "on the PATH and a CUDA device, else torch.profiler)")
    p.add_argument("--warmup", type=int, default=2, help="calls before the profiled one (default 2)")
    p.add_argument("--top", type=int, default=25, help="rows in top_kernels.md (default 25)")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse(argv)
    import torch

    warnings.filterwarnings("ignore", category=FutureWarning, message=".*autocast.*")  # upstream's heads

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tool = args.tool
    if os.environ.get(INNER):
        tool = "nsys-inner"
    elif tool == "auto":
        tool = "nsys" if device.type == "cuda" and shutil.which("nsys") else "torch"
    if tool == "nsys":
        if device.type != "cuda" or not shutil.which("nsys"):
            print("error: --tool nsys needs a CUDA device and nsys on the PATH", file=sys.stderr)
            return 2
        return run_nsys(args, out, argv if argv is not None else sys.argv[1:])
    return profile_once(args, device, out, under_nsys=tool == "nsys-inner")


def run_nsys(args: argparse.Namespace, out: Path, argv: list[str]) -> int:
    """Re-execute this script under nsys; then turn its kernel summary into top_kernels.md."""
    nsys = shutil.which("nsys")
    report = out / "profile"
    cmd = [nsys, "profile", "--trace=cuda,nvtx,osrt", "-o", str(report), "--force-overwrite=true",
           "--capture-range=cudaProfilerApi", "--capture-range-end=stop", sys.executable, str(Path(__file__).resolve()), *argv]
    print("running:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env={**os.environ, INNER: "1"})
    if rc != 0:
        return rc
    rep = report.with_suffix(".nsys-rep")
    for name in ("cuda_gpu_kern_sum", "gpukernsum"):  # the report's name in newer / older nsys
        done = subprocess.run([nsys, "stats", "--report", name, "--format", "csv", "--force-export=true", "--output",
                               str(report), str(rep)], capture_output=True, text=True)
        found = sorted(out.glob(f"profile_{name}*.csv"))
        if done.returncode == 0 and found:
            write_nsys_table(found[0], out / "top_kernels.md", args)
            break
    else:
        print("nsys stats gave no kernel summary; open the report in Nsight Systems", file=sys.stderr)
    print(f"wrote {rep}" + (f", {out / 'top_kernels.md'}" if (out / "top_kernels.md").exists() else ""))
    return 0


def write_nsys_table(csv_path: Path, md: Path, args: argparse.Namespace) -> None:
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    time_col = next((c for c in rows[0] if c.startswith("Total Time")), None) if rows else None
    lines = [f"# Top kernels (nsys): {args.preset}, {args.frames} frames", "",
             "| # | kernel | total ms | % | calls |", "|---:|---|---:|---:|---:|"]
    for i, r in enumerate(rows[: args.top], 1):
        total = float(r.get(time_col, 0) or 0) / 1e6 if time_col else 0.0
        lines.append(f"| {i} | {_md(r.get('Name', ''))} | {total:.3f} | {r.get('Time (%)', '')} | {r.get('Instances', '')} |")
    md.write_text("\n".join(lines) + "\n")


def _md(name: str, width: int = 110) -> str:
    name = name.replace("|", "\\|").replace("\n", " ")
    return name if len(name) <= width else name[: width - 1] + "…"


def label_hooks(model: Any, nvtx: bool) -> list:
    """Forward hooks that open a ``record_function`` (or an NVTX range) per patch embed, block and head."""
    import torch
    from torch.autograd.profiler import record_function

    parts = [("patch_embed", model.aggregator.patch_embed)]
    parts += [(f"frame_block[{i}]", b) for i, b in enumerate(model.aggregator.frame_blocks)]
    parts += [(f"global_block[{i}]", b) for i, b in enumerate(model.aggregator.global_blocks)]
    parts += [(h, getattr(model, h)) for h in ("camera_head", "depth_head", "point_head") if getattr(model, h, None) is not None]
    open_ranges: dict[int, Any] = {}
    handles = []
    for name, module in parts:
        def pre(m: Any, a: Any, _name: str = name) -> None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
                return
            if nvtx:
                torch.cuda.nvtx.range_push(_name)
                open_ranges[id(m)] = True
            else:
                rf = record_function(_name)
                rf.__enter__()
                open_ranges[id(m)] = rf

        def post(m: Any, a: Any, o: Any) -> None:
            rf = open_ranges.pop(id(m), None)
            if rf is True:
                torch.cuda.nvtx.range_pop()
            elif rf is not None:
                rf.__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    return handles


def profile_once(args: argparse.Namespace, device: Any, out: Path, under_nsys: bool) -> int:
    import torch

    import vggt_turbo
    from vggt_turbo.bench.variants import select_variants
    from vggt_turbo.random_model import SMALL_IMAGE, build_vggt, random_images

    size = args.size or ("full" if device.type == "cuda" else "small")
    image = args.image_size or (518 if size == "full" else SMALL_IMAGE)
    frames = args.frames or (10 if device.type == "cuda" else 2)
    args.frames = frames
    try:
        (variant,) = select_variants(args.preset)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    config = variant.config
    model = build_vggt(size, seed=0, enable_track=False).to(device)
    handles = []
    if config is not None:
        if under_nsys:
            config = config.replace(nvtx=True)
        vggt_turbo.apply_optimizations(model, config)
    if under_nsys and config is None:  # upstream: NVTX ranges from hooks instead of the nvtx patch
        handles = label_hooks(model, nvtx=True)
    images = random_images(frames, image, seed=0).to(device)
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)

    def forward() -> None:
        with torch.no_grad(), autocast:
            model(images)
        if cuda:
            torch.cuda.synchronize()

    print(f"profiling {variant.name} ({'upstream' if config is None else config}), {size} model, {frames} frames "
          f"of {image}px on {device}, {args.warmup} warm-up", flush=True)
    for _ in range(args.warmup):
        forward()
    if under_nsys:
        torch.cuda.profiler.start()
        t0 = time.perf_counter()
        forward()
        seconds = time.perf_counter() - t0
        torch.cuda.profiler.stop()
        print(f"profiled forward: {seconds:.4f} s (wall, under nsys)")
        return 0

    from torch.profiler import ProfilerActivity, profile

    handles = label_hooks(model, nvtx=False)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        forward()
        seconds = time.perf_counter() - t0
    for h in handles:
        h.remove()
    trace = out / "trace.json"
    prof.export_chrome_trace(str(trace))
    if trace.stat().st_size > MAX_TRACE_BYTES:
        with open(trace, "rb") as src, gzip.open(trace.with_suffix(".json.gz"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        trace.unlink()
        trace = trace.with_suffix(".json.gz")
    write_torch_table(prof, out / "top_kernels.md", variant.name, frames, cuda, args.top, seconds)
    print(f"profiled forward: {seconds:.4f} s (wall, under torch.profiler); wrote {trace}, {out / 'top_kernels.md'}")
    return 0


def write_torch_table(prof: Any, md: Path, name: str, frames: int, cuda: bool, top: int, seconds: float) -> None:
    from torch.autograd import DeviceType

    def device_us(e: Any) -> float:
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, attr):
                return float(getattr(e, attr))
        return 0.0

    events = list(prof.key_averages())
    if cuda:
        key, what = device_us, "device time (kernels and copies)"
        # Only the GPU-side events: CPU operators and record_function labels also carry the device time of the
        # kernels they launched, and would count it twice.
        # The labels also appear on the GPU timeline as user annotations spanning their kernels: skip those too.
        events = [
            e for e in events
            if getattr(e, "device_type", None) == DeviceType.CUDA and device_us(e) > 0
            and not getattr(e, "is_user_annotation", False) and not LABEL.fullmatch(e.key)
        ]
    else:
        key, what = (lambda e: float(e.self_cpu_time_total)), "self CPU time (operators)"
    events.sort(key=key, reverse=True)
    total = sum(key(e) for e in events) or 1.0
    lines = [f"# Top {top} by {what}: {name}, {frames} frames", "",
             f"Profiled forward: {seconds:.4f} s wall (torch.profiler adds overhead). Total {what}: {total / 1e3:.2f} ms.", "",
             "| # | name | self ms | % | calls |", "|---:|---|---:|---:|---:|"]
    for i, e in enumerate(events[:top], 1):
        lines.append(f"| {i} | {_md(e.key)} | {key(e) / 1e3:.3f} | {100 * key(e) / total:.1f} | {e.count} |")
    md.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
