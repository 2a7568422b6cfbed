"""``bench --sequence-parallel``: one GPU against N GPUs (``sequence_parallel``) in one torchrun job, on the same
weights and the same inputs.

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node=2 -m vggt_turbo.cli bench --sequence-parallel --frames 400,800 --max-frames

Method:
  - every rank builds the same seeded random model (initialised on the CPU, so identical on every rank) and the
    same seeded images, and moves them to ``cuda:LOCAL_RANK`` (``--device cpu``: stays on the CPU, gloo backend);
    NCCL is only started with NVLink multicast off in the environment (``MULTICAST_OFF``), as the line above sets;
  - per frame count and variant (``--variants``, default ``exact``): ``gpus=1``: rank 0 alone runs the variant
    while the other ranks wait; ``gpus=N``: every rank runs it with ``sequence_parallel=True``. Each: ``--warmup``
    untimed calls, then ``--repeats`` timed calls between CUDA events (``perf_counter`` on the CPU), started
    together; a call's time is its slowest rank's, and the median call is kept;
  - peak memory per GPU: ``max_memory_allocated`` (reset before each call) above what was allocated when the row
    started (weights, inputs), the max over the timed calls, for each rank;
  - fidelity: rank 0 compares the N-GPU outputs with its own 1-GPU outputs (relative error per output);
  - ``--max-frames``: the largest frame count that fits, per GPU count (see ``parallel_report.max_frames``).

Rows go to ``<out>/<device-slug>/sequence_parallel.json`` (``--merge``: rows of other frame counts are kept) and
``sequence_parallel.md``. An out-of-memory error under sequence parallelism ends the job (the other ranks would
wait for it forever; torchrun stops them): measure the largest sizes last, rows are saved as they are measured.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import logging
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..patches import check
from ..patching import apply_optimizations, revert_optimizations
from ..random_model import SMALL_IMAGE, build_vggt, random_images
from .measure import GIB, Clock, Memory, compare, snapshot
from .meta import device_slug, make_meta
from .parallel_report import load_rows, max_frames, save
from .report import round_or_none, sig3
from .variants import Variant, select_variants

log = logging.getLogger(__name__)

# NVLink multicast (NVLS) must stay off on the machines this bench runs on; NCCL is refused without these.
MULTICAST_OFF: Mapping[str, str] = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
CUDA_FRAMES = (50, 100, 200)
CPU_FRAMES = (2, 3)
FULL_IMAGE = 518
# The 1-GPU rows keep the other ranks waiting in a collective for as long as they run (minutes at 800 frames).
TIMEOUT = datetime.timedelta(hours=2)


def multicast_problems(environ: Mapping[str, str]) -> list[str]:
    """What is wrong with the environment for NCCL here (empty: nothing)."""
    return [f"{k}={environ.get(k)!r} (needs {v!r})" for k, v in MULTICAST_OFF.items() if environ.get(k) != v]


@dataclass
class Measured:
    """One row's timed calls, seen from one rank."""

    times: list[float] = field(default_factory=list)  # the slowest rank's, per call
    peak_gib: Optional[float] = None  # this rank's, above ``base_gib``
    base_gib: Optional[float] = None
    peak_reserved_gib: Optional[float] = None  # absolute: what --max-frames fits
    outputs: Optional[dict[str, torch.Tensor]] = None  # the first call's, on the CPU (rank 0 only)


class Ranks:
    """This process's place in the job and the few collectives the timing needs."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def wait(self) -> None:
        """Every rank here before any goes on (also after a 1-GPU row, during which the others wait)."""
        dist.all_reduce(torch.zeros(1, device=self.device))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def gather(self, value: Optional[float]) -> list[Optional[float]]:
        """``value`` from every rank, in rank order (None stays None)."""
        mine = torch.tensor([float("nan") if value is None else value], dtype=torch.float64, device=self.device)
        everyone = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(everyone, mine)
        return [None if t.isnan().item() else t.item() for t in everyone]


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA, as upstream's README and the single-GPU bench; fp32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def measure(model: nn.Module, images: torch.Tensor, args: argparse.Namespace, ranks: Ranks, together: bool) -> Measured:
    """``--warmup`` + ``--repeats`` calls; ``together``: every rank calls (sequence parallel), else this rank alone."""
    clock, memory = Clock(ranks.device), Memory(ranks.device)
    memory.begin_variant()
    res = Measured(base_gib=memory.base / GIB if memory.cuda else None)
    peaks, reserved = [], []
    for i in range(args.warmup + args.repeats):
        if together:
            ranks.wait()
        memory.start_call()
        start = clock.stamp()
        with torch.no_grad(), _autocast(ranks.device):
            out = model(images)
        end = clock.stamp()
        clock.sync()
        if i == 0 and ranks.rank == 0:
            res.outputs = snapshot(out, None)
        del out
        if i >= args.warmup:
            seconds = clock.seconds(start, end)
            res.times.append(max(t for t in ranks.gather(seconds) if t is not None) if together else seconds)
            peaks.append(memory.peak_gib())
            if memory.cuda:
                reserved.append(torch.cuda.max_memory_reserved(ranks.device) / GIB)
    res.peak_gib = max(peaks) if peaks and peaks[0] is not None else None
    res.peak_reserved_gib = max(reserved) if reserved else None
    return res


def _row(variant: Variant, gpus: int, frames: int, res: Measured, per_gpu: list[Optional[float]],
         reserved: list[Optional[float]], config: Optional[dict]) -> dict[str, Any]:
    known = [p for p in per_gpu if p is not None]
    return {
        "variant": variant.name,
        "gpus": gpus,
        "frames": frames,
        "part": "full",
        "seconds": round_or_none(statistics.median(res.times), 6),
        "seconds_all": [round_or_none(t, 6) for t in res.times],
        "peak_gib": round_or_none(max(known), 3) if known else None,
        "peak_gib_per_gpu": [round_or_none(p, 3) for p in per_gpu],
        "peak_reserved_gib_per_gpu": [round_or_none(r, 3) for r in reserved],
        "base_gib": round_or_none(res.base_gib, 3),
        "config": config,
    }


def run_frames(model: nn.Module, variant: Variant, frames: int, args: argparse.Namespace, ranks: Ranks) -> list[dict]:
    """The two rows (1 GPU, N GPUs) of one variant at one frame count (on rank 0; [] on the others)."""
    images = random_images(frames, args.image_size, seed=0).to(ranks.device)
    rows: list[dict] = []
    single: Optional[Measured] = None
    if ranks.rank == 0:
        try:
            apply_optimizations(model, variant.config)
            single = measure(model, images, args, ranks, together=False)
        except torch.cuda.OutOfMemoryError:
            rows.append({"variant": variant.name, "gpus": 1, "frames": frames, "part": "full", "error": "OOM"})
        finally:
            revert_optimizations(model)
        if single is not None:
            rows.append(_row(variant, 1, frames, single, [single.peak_gib], [single.peak_reserved_gib],
                             variant.config_dict()))
    ranks.wait()
    config = variant.config.replace(sequence_parallel=True)
    apply_optimizations(model, config)
    try:
        multi = measure(model, images, args, ranks, together=True)
    finally:
        revert_optimizations(model)
    per_gpu, reserved = ranks.gather(multi.peak_gib), ranks.gather(multi.peak_reserved_gib)
    if ranks.rank != 0:
        return []
    row = _row(variant, ranks.world, frames, multi, per_gpu, reserved, {**variant.config_dict(), "sequence_parallel": True})
    if single is not None:
        row["speedup_vs_1gpu"] = round(statistics.median(single.times) / statistics.median(multi.times), 3)
        if single.peak_gib and row["peak_gib"] is not None:
            row["peak_ratio_vs_1gpu"] = round(row["peak_gib"] / single.peak_gib, 3)
        errors = compare(multi.outputs, None, single.outputs).get("full", {})
        row["errors"] = {k: sig3(v) for k, v in errors.items()}
        row["max_rel_err_vs_1gpu"] = sig3(max(errors.values())) if errors else None
    return rows + [row]


def _start(args: argparse.Namespace) -> Optional[torch.device]:
    """Join the torchrun job (None, with the reason printed, when that is not possible)."""
    if "WORLD_SIZE" not in os.environ:
        print("error: --sequence-parallel runs under torchrun: NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 "
              "torchrun --nproc-per-node=N -m vggt_turbo.cli bench --sequence-parallel ...", file=sys.stderr)
        return None
    cuda = args.device != "cpu" and torch.cuda.is_available()
    if cuda:
        problems = multicast_problems(os.environ)
        if problems:
            print(f"error: refusing to start NCCL with NVLink multicast possibly on: {', '.join(problems)}; launch "
                  "with NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1", file=sys.stderr)
            return None
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return device


def run_parallel(args: argparse.Namespace) -> int:
    """The ``bench --sequence-parallel`` command, on every rank. Returns the exit code."""
    started = datetime.datetime.now(datetime.timezone.utc)
    try:
        variants = select_variants(args.variants or "exact")
        if any(v.config is None for v in variants):
            raise ValueError("--sequence-parallel measures configurations: 'upstream' cannot be split over GPUs")
        for v in variants:
            check(v.config.replace(sequence_parallel=True))
        frames_list = sorted({int(x) for x in args.frames.split(",")}) if args.frames else None
        if frames_list is not None and min(frames_list, default=0) < 1:
            raise ValueError(f"frame counts must be >= 1, got {args.frames!r}")
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    device = _start(args)
    if device is None:
        return 2
    try:
        return _sweep(args, variants, frames_list, device, started)
    finally:
        dist.destroy_process_group()


def _sweep(args: argparse.Namespace, variants: list[Variant], frames_list: Optional[list[int]], device: torch.device,
           started: datetime.datetime) -> int:
    ranks = Ranks(device)
    cuda = device.type == "cuda"
    frames_list = frames_list or list(CUDA_FRAMES if cuda else CPU_FRAMES)
    args.size = args.size or ("full" if cuda else "small")
    side = FULL_IMAGE if args.size == "full" else SMALL_IMAGE
    args.image_size = args.image_size or (side, side)
    args.part = "full"
    out_dir = Path(args.out) / device_slug(device, args.size)
    meta = {**make_meta(args, device, started), "gpus": ranks.world, "backend": dist.get_backend(),
            "timing": "calls started together on every rank; a call's time is its slowest rank's",
            "multicast_env": {k: os.environ.get(k) for k in MULTICAST_OFF}}
    rows = load_rows(out_dir) if args.merge and ranks.rank == 0 else []
    if ranks.rank == 0:
        print(f"vggt-turbo bench --sequence-parallel: {meta['gpu']} x {ranks.world}, {args.size} model, "
              f"{meta['image_size']} px, frames {frames_list}, variants {[v.name for v in variants]} -> {out_dir}", flush=True)
    t0 = time.perf_counter()
    model = build_vggt(args.size, seed=0, enable_track=False).to(device)
    log.info("rank %d: model built in %.1f s", ranks.rank, time.perf_counter() - t0)
    for frames in frames_list:
        for variant in variants:
            new = run_frames(model, variant, frames, args, ranks)
            if ranks.rank == 0:
                keys = {(r["variant"], r["gpus"], r["frames"]) for r in new}
                rows = [r for r in rows if (r["variant"], r["gpus"], r["frames"]) not in keys] + new
                save(meta, rows, None, out_dir)
                for r in new:
                    print(row_line(r), flush=True)
    fits = max_frames(rows, _capacity_gib(device, ranks)) if args.max_frames and cuda else None
    if ranks.rank == 0:
        written = save(meta, rows, fits, out_dir)
        if args.max_frames and not cuda:
            print("--max-frames: no CUDA memory statistics on the CPU; nothing predicted")
        for fit in fits or []:
            print(f"largest frame count that fits, {fit['variant']} on {fit['gpus']} GPU(s): "
                  f"{fit['predicted_max_frames']} (predicted, {fit['gib_per_frame']:.3f} GiB per frame)")
        print(f"wrote {', '.join(str(p) for p in written)} in {time.perf_counter() - t0:.1f} s")
    return 0


def _capacity_gib(device: torch.device, ranks: Ranks) -> float:
    """What PyTorch can hold on the tightest GPU: its free memory plus what its allocator already reserved."""
    free, _ = torch.cuda.mem_get_info(device)
    mine = (free + torch.cuda.memory_reserved(device)) / GIB
    return min(c for c in ranks.gather(mine) if c is not None)


def row_line(row: dict) -> str:
    """One line per row for the log."""
    head = f"[{row['frames']:>5} fr] {row['variant']} on {row['gpus']} GPU(s):"
    if row.get("error"):
        return f"{head} {row['error']}"
    line = f"{head} {row['seconds']:.3f} s"
    if row.get("speedup_vs_1gpu"):
        line += f" ({row['speedup_vs_1gpu']:.2f}x vs 1 GPU)"
    if row.get("peak_gib") is not None:
        line += f", peak {row['peak_gib']:.2f} GiB per GPU"
        if row.get("peak_ratio_vs_1gpu"):
            line += f" ({row['peak_ratio_vs_1gpu']:.2f}x)"
    if row.get("max_rel_err_vs_1gpu") is not None:
        line += f", max rel err vs 1 GPU {row['max_rel_err_vs_1gpu']:.1e}"
    return line
