"""``vggt-turbo bench``: latency, peak memory and fidelity of upstream VGGT, each optimization alone and the presets.

Method (see benchmarks/README.md):
  - one process builds ONE random-init VGGT (no track head) and moves it to the device; every variant runs on
    those weights and on the same seeded inputs, B=1;
  - variants: ``upstream`` (unpatched), each ``TurboConfig`` flag alone (derived from ``dataclasses.fields`` so
    new flags appear by themselves), and the presets ``exact`` and ``fast``; the model is reverted in between;
  - on CUDA everything runs under ``torch.autocast("cuda", dtype=torch.bfloat16)`` as upstream's README does, in
    fp32 on the CPU; ``torch.no_grad()``; TF32 settings are left at torch's defaults;
  - per (variant, frame count): warm-up call(s), then ``--repeats`` timed calls, CUDA events (``perf_counter`` on
    the CPU), median; peak memory = ``max_memory_allocated()`` (reset before each call) minus what was allocated
    when the variant started (weights, inputs);
  - the aggregator's time and peak come from CUDA events / ``max_memory_allocated`` read in forward hooks on
    ``model.aggregator`` *inside* the full-model calls (no separate aggregator runs), except when the whole
    forward replays as one CUDA graph (hooks see nothing): then the aggregator is patched and called alone;
  - fidelity: the first call's outputs of each variant against upstream's from the same inputs,
    ``||a - b|| / ||b||`` in float32 per output, the row keeping the max.

Results go to ``<out>/<device-slug>/latest.json`` (and a dated copy), ``latest.md`` and PNG plots. ``--merge``
merges into an existing ``latest.json`` so a sweep can be split over several commands; ``benchmarks/report.py``
(or ``--report-only``) regenerates the Markdown and plots from JSON files without running anything.

matplotlib and tqdm are imported inside functions only: ``import vggt_turbo`` never needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import gc
import json
import logging
import math
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from . import config as config_module
from .bench_report import (
    PLOT_VARIANTS,
    UPSTREAM,
    finalize,
    fmt_err,
    fmt_seconds,
    load_json,
    merge,
    phase_order,
    report_main,
    round_or_none,
    row_key,
    run_summary,
    sig3,
    text_table,
    write_json,
    write_report,
)
from .config import PRESETS, TurboConfig
from .patching import apply_optimizations, revert_optimizations
from .random_model import SMALL_IMAGE, build_vggt, random_images
from .upstream import PINNED_COMMIT

log = logging.getLogger(__name__)

PRESET_NAMES = ("exact", "fast")
# Non-boolean fields that only modify another flag: no standalone variant.
MODIFIER_FIELDS = frozenset({"sdpa_backend"})
OUTPUT_KEYS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")
AGG_OUTPUT_KEY = "tokens_last"  # the aggregator's last cached output, the tokens the heads read last

CUDA_FRAMES = (1, 10, 50, 100, 200)
CPU_FRAMES = (1, 2, 4, 8)
CUDA_PHASE_FRAMES = 100
FULL_IMAGE = 518
GIB = 2**30


# --------------------------------------------------------------------------------------------------------------
# Variants
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration; ``config`` None means upstream, unpatched."""

    name: str
    config: Optional[TurboConfig]

    @property
    def exact(self) -> bool:
        return self.config is None or self.config.is_exact

    def config_dict(self) -> Optional[dict[str, Any]]:
        if self.config is None:
            return None
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.as_dict().items()}


def flag_variants() -> list[Variant]:
    """Each ``TurboConfig`` field alone: every boolean field False except that one (plus the flags it cannot work
    without, ``config.REQUIRES``).

    A non-boolean field (e.g. ``global_to_frame_layers``) gets the ``fast`` preset's value when it is the flag and
    its default otherwise; fields whose ``fast`` value equals the default (nothing to switch on, e.g.
    ``cuda_graph_max_frames``) and the modifier fields (``sdpa_backend``) get no standalone variant.
    """
    default, fast = TurboConfig(), PRESETS["fast"]
    requires = getattr(config_module, "REQUIRES", {})
    fields = dataclasses.fields(TurboConfig)
    is_bool = {f.name: isinstance(getattr(default, f.name), bool) for f in fields}
    off = {f.name: False if is_bool[f.name] else getattr(default, f.name) for f in fields}
    out = []
    for f in fields:
        if f.name in MODIFIER_FIELDS:
            continue
        if is_bool[f.name]:
            value: Any = True
        else:
            value = getattr(fast, f.name)
            if value == getattr(default, f.name):
                log.debug("no standalone variant for %s: the fast preset keeps its default", f.name)
                continue
        flags = {f.name: value}
        pending = list(requires.get(f.name, ()))
        while pending:  # the flags this one needs, transitively
            need = pending.pop()
            if need not in flags:
                flags[need] = True
                pending += list(requires.get(need, ()))
        try:
            out.append(Variant(f.name, TurboConfig(**{**off, **flags})))
        except (TypeError, ValueError) as err:  # a flag that cannot stand alone: say so, keep the others
            log.warning("no standalone variant for %s: %s", f.name, err)
    return out


def all_variants() -> list[Variant]:
    """upstream, each flag alone, then the presets."""
    return [Variant(UPSTREAM, None), *flag_variants(), *(Variant(p, PRESETS[p]) for p in PRESET_NAMES)]


def select_variants(spec: Optional[str]) -> list[Variant]:
    """Parse ``--variants``: names, or the groups ``all``, ``presets`` (upstream, exact, fast), ``flags``."""
    available = all_variants()
    by_name = {v.name: v for v in available}
    if not spec:
        return available
    chosen: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "all":
            names = [v.name for v in available]
        elif item == "presets":
            names = [UPSTREAM, *PRESET_NAMES]
        elif item == "flags":
            names = [v.name for v in flag_variants()]
        elif item in by_name:
            names = [item]
        else:
            raise ValueError(f"unknown variant {item!r}; choose from {sorted(by_name)} or all, presets, flags")
        chosen += [n for n in names if n not in chosen]
    return [v for v in available if v.name in chosen]  # canonical order, upstream first


# --------------------------------------------------------------------------------------------------------------
# Timing, memory, hooks
# --------------------------------------------------------------------------------------------------------------


class Clock:
    """CUDA events on a CUDA device (asynchronous, read after a synchronize), ``perf_counter`` elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def stamp(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def seconds(self, start: Any, end: Any) -> float:
        return start.elapsed_time(end) / 1e3 if self.cuda else end - start

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Memory:
    """Peak memory above what was there when the variant started (weights and inputs), None on the CPU.

    ``peak_gib``: the peak of *allocated* memory. A captured CUDA graph's private pool is invisible to it (the
    graph's intermediates are freed back to the pool after capture and replays allocate nothing), so
    ``reserved_gib`` also reports the peak of *reserved* memory above the reserve at the variant's start (after
    ``empty_cache``): that includes the graph pools a variant holds between calls, and the allocator's slack.
    Both bases are read once per variant, before its first call; the peak statistics are reset before every call.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.base = self.base_reserved = 0

    def begin_variant(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            self.base = torch.cuda.memory_allocated(self.device)
            self.base_reserved = torch.cuda.memory_reserved(self.device)

    def start_call(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_gib(self) -> Optional[float]:
        if not self.cuda:
            return None
        return (torch.cuda.max_memory_allocated(self.device) - self.base) / GIB

    def reserved_gib(self) -> Optional[float]:
        if not self.cuda:
            return None
        return (torch.cuda.max_memory_reserved(self.device) - self.base_reserved) / GIB


@functools.lru_cache(maxsize=1)
def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _capturing() -> bool:
    """True while a CUDA graph is being captured: hooks must then record nothing (and cannot time anything)."""
    return _cuda_available() and torch.cuda.is_current_stream_capturing()


def last_tokens(aggregator_output: Any) -> Optional[torch.Tensor]:
    """The last non-None entry of the aggregator's output list."""
    tokens_list = aggregator_output[0] if isinstance(aggregator_output, tuple) else aggregator_output
    for t in reversed(list(tokens_list)):
        if t is not None:
            return t
    return None


class AggregatorProbe:
    """Forward hooks on ``model.aggregator``: its time and the peak memory at its end, inside the full forward.

    nn.Module hooks run in ``Module.__call__``, so they fire on patched models too (patches replace ``forward``
    per instance, which ``__call__`` calls). They do not fire when the whole forward replays as a CUDA graph
    (``cuda_graphs``), and fire more than once in a call that captures one: ``fired`` tells, and only a call where
    they fired exactly once gives a separable aggregator time.
    """

    def __init__(self, aggregator: nn.Module, clock: Clock, memory: Memory):
        self.clock, self.memory = clock, memory
        self.capture = False
        self.reset()
        self.handles = [
            aggregator.register_forward_pre_hook(self._pre),
            aggregator.register_forward_hook(self._post),
        ]

    def reset(self, capture: bool = False) -> None:
        self.start: Any = None
        self.end: Any = None
        self.peak: Optional[float] = None
        self.fired = 0
        self.capture = capture
        self.captured: Optional[torch.Tensor] = None

    def _pre(self, module: nn.Module, args: Any) -> None:
        if not _capturing():
            self.start = self.clock.stamp()

    def _post(self, module: nn.Module, args: Any, output: Any) -> None:
        if _capturing():
            return
        self.end = self.clock.stamp()
        self.peak = self.memory.peak_gib()
        self.fired += 1
        if self.capture:
            self.captured = last_tokens(output)

    def seconds(self) -> float:
        return self.clock.seconds(self.start, self.end)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def phase_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(phase, module) for every module timed in the phase split; blocks are summed per phase."""
    agg = model.aggregator
    parts: list[tuple[str, nn.Module]] = [("patch_embed", agg.patch_embed)]
    parts += [("frame_blocks", b) for b in agg.frame_blocks]
    parts += [("global_blocks", b) for b in agg.global_blocks]
    for head in ("camera_head", "depth_head", "point_head"):
        module = getattr(model, head, None)
        if module is not None:
            parts.append((head, module))
    return parts


class PhaseProbe:
    """CUDA events (perf_counter on the CPU) in forward pre/post hooks, summed per phase for each call.

    Like ``AggregatorProbe`` it sees nothing of a CUDA-graph replay, and a call that captures a graph runs the
    forward more than once: ``collect`` returns None unless every timed module ran exactly once.
    """

    def __init__(self, model: nn.Module, clock: Clock):
        self.clock = clock
        self.pending: dict[int, Any] = {}
        self.spans: list[tuple[str, Any, Any]] = []
        self.handles = []
        self.expected: dict[str, int] = {}
        for phase, module in phase_modules(model):
            self.expected[phase] = self.expected.get(phase, 0) + 1
            self.handles.append(module.register_forward_pre_hook(self._pre))
            self.handles.append(module.register_forward_hook(self._make_post(phase)))

    def _pre(self, module: nn.Module, args: Any) -> None:
        if not _capturing():
            self.pending[id(module)] = self.clock.stamp()

    def _make_post(self, phase: str) -> Callable[..., None]:
        def post(module: nn.Module, args: Any, output: Any) -> None:
            start = self.pending.pop(id(module), None)
            if start is not None and not _capturing():
                self.spans.append((phase, start, self.clock.stamp()))

        return post

    def clear(self) -> None:
        self.pending.clear()
        self.spans.clear()

    def collect(self) -> Optional[dict[str, tuple[float, int]]]:
        """Per phase: (seconds summed, module calls) since the last ``clear`` (after a synchronize), or None."""
        out: dict[str, tuple[float, int]] = {}
        for phase, start, end in self.spans:
            seconds, calls = out.get(phase, (0.0, 0))
            out[phase] = (seconds + self.clock.seconds(start, end), calls + 1)
        self.clear()
        if {phase: calls for phase, (_, calls) in out.items()} != self.expected:
            return None
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


# --------------------------------------------------------------------------------------------------------------
# Fidelity
# --------------------------------------------------------------------------------------------------------------


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float32 over the finite entries (inf when shapes or the non-finite pattern differ).

    Both are divided by ``max|b|`` first so that the squares cannot overflow float32 (the ratio is unchanged).
    """
    a = a.detach().float()
    b = b.detach().to(a.device).float()
    if a.shape != b.shape:
        return math.inf
    finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(finite_a, finite_b):
        return math.inf
    if not bool(finite_a.all()):
        a, b = a[finite_a], b[finite_b]
    if b.numel() == 0:
        return 0.0
    scale = b.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    num = torch.linalg.vector_norm((a - b) / scale).item()
    den = torch.linalg.vector_norm(b / scale).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def snapshot(outputs: Optional[dict], tokens: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The compared outputs, moved to the CPU (one reference per frame count is kept)."""
    snap = {}
    if outputs is not None:
        snap = {k: outputs[k].detach().to("cpu") for k in OUTPUT_KEYS if k in outputs}
    if tokens is not None:
        snap[AGG_OUTPUT_KEY] = tokens.detach().to("cpu")
    return snap


def compare(outputs: Optional[dict], tokens: Optional[torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per part, per output: the relative error against the reference."""
    errors: dict[str, dict[str, float]] = {}
    if outputs is not None:
        errors["full"] = {k: rel_err(outputs[k], reference[k]) for k in OUTPUT_KEYS if k in outputs and k in reference}
    if tokens is not None and AGG_OUTPUT_KEY in reference:
        errors["aggregator"] = {AGG_OUTPUT_KEY: rel_err(tokens, reference[AGG_OUTPUT_KEY])}
    return errors


# --------------------------------------------------------------------------------------------------------------
# Environment and metadata
# --------------------------------------------------------------------------------------------------------------


def device_slug(device: torch.device, size: str) -> str:
    """``nvidia-h100-80gb-hbm3`` on that GPU, ``cpu`` on the CPU; ``-<size>`` added for a non-default size."""
    if device.type == "cuda":
        base = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
        default_size = "full"
    else:
        base, default_size = device.type, "small"
    return base if size == default_size else f"{base}-{size}"


def upstream_commit() -> tuple[str, str]:
    """(commit, where it came from): the installed vggt's pip metadata if it records one, else the pinned one."""
    try:
        from importlib.metadata import PackageNotFoundError, distribution

        text = distribution("vggt").read_text("direct_url.json")
        info = json.loads(text) if text else {}
        commit = (info.get("vcs_info") or {}).get("commit_id")
        if commit:
            return commit, "pip metadata of the installed vggt (direct_url.json)"
    except (PackageNotFoundError, ValueError, OSError):  # type: ignore[misc]
        pass
    return PINNED_COMMIT, "vggt_turbo.PINNED_COMMIT (the installed vggt records no commit)"


def turbo_commit() -> str:
    """``git rev-parse HEAD`` of the checkout vggt_turbo is imported from (``-dirty`` if tracked files changed).

    ``VGGT_TURBO_COMMIT`` in the environment overrides it (for copies of the tree without ``.git``).
    """
    if os.environ.get("VGGT_TURBO_COMMIT"):
        return os.environ["VGGT_TURBO_COMMIT"]
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(here), *args], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if not here.is_relative_to(top / "src"):  # vggt_turbo installed inside some other repository
            return "unknown"
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError, ValueError):
        return "unknown"


def make_meta(args: argparse.Namespace, device: torch.device, started: datetime.datetime) -> dict[str, Any]:
    commit, source = upstream_commit()
    cuda = device.type == "cuda"
    meta: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda if cuda else None,
        "upstream_commit": commit,
        "vggt_turbo_commit": turbo_commit(),
        "date": started.strftime("%Y-%m-%d"),
        "time_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "upstream_commit_source": source,
        "device": str(device),
        "size": args.size,
        "image_size": args.image_size,
        "batch": 1,
        "autocast": "bfloat16" if cuda else "none (float32)",
        "warmup": args.warmup,
        "repeats": args.repeats,
        "statistic": "median of the timed calls",
        "timer": "CUDA events" if cuda else "time.perf_counter",
        "aggregator_timing": "events around model.aggregator inside the full forward"
        if args.part == "both"
        else ("model.aggregator called alone" if args.part == "aggregator" else None),
        "peak_memory": "max over timed calls of torch.cuda.max_memory_allocated() (reset before each call) minus "
        "memory_allocated() when the variant started (weights, inputs); base_gib in each row is that start value. A CUDA graph's private pool is not allocated memory: see "
        "reserved_gib (peak memory_reserved above the reserve at the variant's start, after empty_cache; includes "
        "graph pools and allocator slack; null for aggregator rows timed inside full calls)"
        if cuda
        else None,
        "errors": "||a-b||/||b|| in float32 of the first call's outputs vs upstream's on the same inputs; "
        "aggregator rows: its last cached output",
        "weights": "random init (vggt_turbo.random_model.build_vggt, seed 0), no track head",
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    if cuda:
        meta["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        meta["cudnn"] = torch.backends.cudnn.version()
    return meta


# --------------------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------------------


class Budget:
    """``--deadline``: start no row whose estimated cost would end past it (seconds since the process started).

    A call's cost at S frames is the median call seen at S (the median: a CUDA-graph capture is one slow outlier),
    else extrapolated from the largest smaller count seen as (S / S') ** 1.7 (between linear frame attention and
    quadratic global attention).
    """

    def __init__(self, deadline: Optional[float], t0: float):
        self.deadline, self.t0 = deadline, t0
        self.per_call: dict[int, list[float]] = {}  # frames -> wall-clock seconds of each call seen
        self.skipped: list[str] = []

    def note(self, frames: int, seconds: float) -> None:
        self.per_call.setdefault(frames, []).append(seconds)

    def estimate(self, frames: int) -> float:
        if frames in self.per_call:
            return statistics.median(self.per_call[frames])
        smaller = [s for s in self.per_call if s < frames]
        if not smaller:
            return 0.0
        s = max(smaller)
        return statistics.median(self.per_call[s]) * (frames / s) ** 1.7

    def allows(self, frames: int, calls: int, what: str) -> bool:
        if self.deadline is None:
            return True
        if time.perf_counter() - self.t0 + self.estimate(frames) * calls > self.deadline:
            self.skipped.append(what)
            return False
        return True


@dataclass
class Calls:
    """What ``Bench.calls`` measured: per timed call, the times and peaks (of the aggregator too when separable)."""

    times: list[float] = dataclasses.field(default_factory=list)
    peaks: list[Optional[float]] = dataclasses.field(default_factory=list)
    reserved: list[Optional[float]] = dataclasses.field(default_factory=list)  # whole calls (see Memory)
    agg_times: list[float] = dataclasses.field(default_factory=list)
    agg_peaks: list[Optional[float]] = dataclasses.field(default_factory=list)
    agg_separable: bool = True
    base_gib: Optional[float] = None
    phase_runs: list[Optional[dict[str, tuple[float, int]]]] = dataclasses.field(default_factory=list)


class Bench:
    """Runs variants on one model and one set of inputs and turns them into result rows."""

    def __init__(self, model: nn.Module, device: torch.device, args: argparse.Namespace, budget: Budget):
        self.model, self.device, self.args, self.budget = model, device, args, budget
        self.clock, self.memory = Clock(device), Memory(device)
        self.autocast_dtype = torch.bfloat16 if device.type == "cuda" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def call(self, module: nn.Module, images: torch.Tensor) -> Any:
        with torch.no_grad(), self.autocast():
            return module(images)

    def calls(
        self,
        module: nn.Module,
        images: torch.Tensor,
        n: int,
        first: Callable[[Any, Optional[torch.Tensor]], None],
        probe: Optional[AggregatorProbe] = None,
        phase_probe: Optional[PhaseProbe] = None,
    ) -> Calls:
        """``n`` calls of ``module(images)``, the first ``--warmup`` untimed; ``first(output, aggregator tokens)``
        sees the first call's output (tokens: from the probe, None when not separable)."""
        frames, warmup = images.shape[1], self.args.warmup if n > 1 else 0
        res = Calls()
        self.memory.begin_variant()
        res.base_gib = self.memory.base / GIB if self.memory.cuda else None
        for i in range(n):
            if probe is not None:
                probe.reset(capture=i == 0)
            if phase_probe is not None:
                phase_probe.clear()
            self.memory.start_call()
            wall = time.perf_counter()
            start = self.clock.stamp()
            out = self.call(module, images)
            end = self.clock.stamp()
            self.clock.sync()
            self.budget.note(frames, time.perf_counter() - wall)
            if i >= warmup:
                res.times.append(self.clock.seconds(start, end))
                res.peaks.append(self.memory.peak_gib())
                res.reserved.append(self.memory.reserved_gib())
                if probe is not None:
                    if probe.fired == 1:
                        res.agg_times.append(probe.seconds())
                        res.agg_peaks.append(probe.peak)
                    else:
                        res.agg_separable = False
                if phase_probe is not None:
                    res.phase_runs.append(phase_probe.collect())
            if i == 0:
                tokens = probe.captured if probe is not None and probe.fired == 1 else None
                first(out, tokens)
                del tokens
                if probe is not None:
                    probe.captured = None
            del out
        return res

    def run_variant(
        self,
        variant: Variant,
        images: torch.Tensor,
        reference: Optional[dict[str, torch.Tensor]],
        timed: bool = True,
        phases: bool = False,
        phases_only: bool = False,
    ) -> tuple[list[dict], list[dict], Optional[dict[str, torch.Tensor]]]:
        """Rows, phase rows and (for upstream) the reference outputs of one variant at one frame count.

        ``timed=False``: a single call for the reference outputs only (no rows). ``phases_only``: the full model
        with the phase hooks only (its rows are not wanted).
        """
        frames, args = images.shape[1], self.args
        part = "full" if phases_only else args.part
        n = (args.warmup + args.repeats) if timed else 1
        got: dict[str, Any] = {"reference": None, "errors": {}}

        def first(out: Any, tokens: Optional[torch.Tensor]) -> None:
            outputs = out if part != "aggregator" else None
            if part == "aggregator":
                tokens = last_tokens(out)
            if variant.config is None:
                got["reference"] = snapshot(outputs, tokens)
            elif reference:
                got["errors"].update(compare(outputs, tokens, reference))

        res = agg_res = None
        agg_note = None
        failure = None
        probe = phase_probe = None
        try:
            revert_optimizations(self.model)
            if part == "aggregator":  # the aggregator patched and called alone
                if variant.config is not None:
                    apply_optimizations(self.model.aggregator, variant.config)
                res = self.calls(self.model.aggregator, images, n, first)
            else:
                if variant.config is not None:
                    apply_optimizations(self.model, variant.config)
                if part == "both":
                    probe = AggregatorProbe(self.model.aggregator, self.clock, self.memory)
                if phases:
                    phase_probe = PhaseProbe(self.model, self.clock)
                res = self.calls(self.model, images, n, first, probe, phase_probe)
                if part == "both" and timed and not res.agg_separable:
                    # The full forward replayed as one CUDA graph: no hook inside it fires. Time the aggregator
                    # patched alone instead (the cuda_graphs patch then captures the aggregator by itself).
                    probe.remove()
                    probe = None
                    revert_optimizations(self.model)
                    if variant.config is not None:
                        apply_optimizations(self.model.aggregator, variant.config)
                    agg_note = "model.aggregator patched and called alone: the full forward replays as one CUDA graph"

                    def first_agg(out: Any, _tokens: Any) -> None:
                        if reference:
                            got["errors"].update(compare(None, last_tokens(out), reference))

                    agg_res = self.calls(self.model.aggregator, images, n, first_agg)
        except torch.cuda.OutOfMemoryError:
            failure = "OOM"
        except Exception as err:  # one broken row must not lose a budgeted GPU sweep
            log.exception("variant %s at %d frames failed", variant.name, frames)
            failure = f"{type(err).__name__}: {err}"[:300]
        finally:
            for p in (probe, phase_probe):
                if p is not None:
                    p.remove()
            revert_optimizations(self.model.aggregator)
            revert_optimizations(self.model)
        if failure:
            got["reference"] = None
            res = agg_res = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        if not timed:
            return [], [], got["reference"]

        errors = got["errors"]
        if variant.config is None and not failure:
            errors = {"full": {k: 0.0 for k in OUTPUT_KEYS}, "aggregator": {AGG_OUTPUT_KEY: 0.0}}
        if part == "both":
            agg = agg_res if agg_res is not None else res
            parts = [("full", res, res and res.times, res and res.peaks),
                     ("aggregator", agg, agg and (agg.times if agg is agg_res else agg.agg_times),
                      agg and (agg.peaks if agg is agg_res else agg.agg_peaks))]
        else:
            parts = [(part, res, res and res.times, res and res.peaks)]
        rows = []
        for name, measured, secs, pk in parts:
            errs = errors.get(name)
            row: dict[str, Any] = {
                "variant": variant.name,
                "frames": frames,
                "part": name,
                "seconds": round_or_none(statistics.median(secs), 6) if secs else None,
                "peak_gib": round_or_none(max(pk), 3) if pk and pk[0] is not None else None,
                "speedup_vs_upstream": None,
                "max_rel_err_vs_upstream": sig3(max(errs.values())) if errs else None,
                "errors": {k: sig3(v) for k, v in errs.items()} if errs else None,
                "exact": variant.exact,
                "seconds_min": round_or_none(min(secs), 6) if secs else None,
                "seconds_all": [round_or_none(x, 6) for x in secs] if secs else [],
                "base_gib": round_or_none(measured.base_gib, 3) if measured is not None and measured.base_gib is not None else None,
                "reserved_gib": _reserved(name, measured, res),
                "config": variant.config_dict(),
            }
            if errs and any(not math.isfinite(v) for v in errs.values()):
                row["errors_note"] = "null error: shapes or non-finite entries differ from upstream's"
            if name == "aggregator" and agg_note:
                row["aggregator_timing"] = agg_note
            if failure:
                row["error"] = failure
            rows.append(row)
        return rows, self.phase_rows(variant, frames, res), got["reference"]

    @staticmethod
    def phase_rows(variant: Variant, frames: int, res: Optional[Calls]) -> list[dict]:
        if res is None or not res.phase_runs:
            return []
        base = {"variant": variant.name, "frames": frames}
        total = {**base, "phase": "total", "seconds": round_or_none(statistics.median(res.times), 6)}
        if not all(res.phase_runs):  # a CUDA-graph replay: nothing inside the forward is visible
            return [{**total, "note": "no phase split: the modules did not each run once per call (CUDA graph)"}]
        rows = []
        for name in sorted({n for run in res.phase_runs for n in run}, key=phase_order):
            secs = [run.get(name, (0.0, 0))[0] for run in res.phase_runs]
            rows.append({**base, "phase": name, "seconds": round_or_none(statistics.median(secs), 6),
                         "calls": res.phase_runs[0].get(name, (0.0, 0))[1]})
        inside = [sum(s for s, _ in run.values()) for run in res.phase_runs]
        other = statistics.median(t - s for t, s in zip(res.times, inside))
        rows.append({**base, "phase": "other", "seconds": round_or_none(max(0.0, other), 6)})
        return rows + [total]


def _reserved(part: str, measured: Optional[Calls], full: Optional[Calls]) -> Optional[float]:
    """Peak reserved GiB of the calls behind a row; None for an aggregator row timed inside full-model calls
    (those calls' reserve is the full model's, not the aggregator's)."""
    if measured is None or not measured.reserved or measured.reserved[0] is None:
        return None
    if part == "aggregator" and measured is full:
        return None
    return round_or_none(max(measured.reserved), 3)


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
    t0 = time.perf_counter()
    started = datetime.datetime.now(datetime.timezone.utc)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    args.size = args.size or ("full" if device.type == "cuda" else "small")
    args.image_size = args.image_size or (FULL_IMAGE if args.size == "full" else SMALL_IMAGE)
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

    print(f"vggt-turbo bench: {meta['gpu']}, {args.size} model, {args.image_size}px, frames {frames}, "
          f"variants {[v.name for v in variants]}, part {args.part}, {args.warmup} warm-up + {args.repeats} timed"
          + (f", phases at {at} frames" if at is not None else "") + f" -> {out_dir}", flush=True)
    build_start = time.perf_counter()
    model = build_vggt(args.size, seed=0, enable_track=False).to(device)
    log.info("model built and moved to %s in %.1f s", device, time.perf_counter() - build_start)

    budget = Budget(args.deadline, t0)
    total = sum(len(variants) + (UPSTREAM not in {v.name for v in variants}) for _ in frames)
    if at is not None and at not in frames:
        total += len(phase_variants)
    bar = _progress(total, enabled=not args.no_progress)
    bench = Bench(model, device, args, budget)
    upstream_variant = Variant(UPSTREAM, None)
    interrupted = False
    with _sigterm_as_interrupt(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*autocast.*")
        try:
            for frames_n in frames:
                images = random_images(frames_n, args.image_size, seed=0).to(device)
                reference = None
                queue = list(variants)
                if queue[0].name != UPSTREAM:  # errors need upstream's outputs: one untimed call
                    bar.set_description(f"{frames_n} frames: upstream (reference)")
                    if budget.allows(frames_n, 1, f"upstream reference at {frames_n} frames"):
                        _, _, reference = bench.run_variant(upstream_variant, images, None, timed=False)
                    bar.update()
                for variant in queue:
                    bar.set_description(f"{frames_n} frames: {variant.name}")
                    with_phases = at == frames_n and variant in phase_variants
                    if budget.allows(frames_n, args.warmup + args.repeats, f"{variant.name} at {frames_n} frames"):
                        rows, phase_rows, ref = bench.run_variant(variant, images, reference, phases=with_phases)
                        reference = ref if variant.config is None else reference
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
                    if budget.allows(at, args.warmup + args.repeats, f"phases of {variant.name} at {at} frames"):
                        _, phase_rows, _ = bench.run_variant(variant, images, None, phases=True, phases_only=True)
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

HELP = "time upstream VGGT, each optimization alone and the presets (latency, peak memory, error vs upstream)"


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
    add("--image-size", type=int, help=f"square image side (default {FULL_IMAGE} for full, {SMALL_IMAGE} for small)")
    add("--device", help="torch device (default: cuda if available, else cpu)")
    add("--merge", action="store_true", help="merge into an existing <out>/<slug>/latest.json (same (variant, "
        "frames, part) rows replaced, others kept) instead of starting a new one")
    add("--deadline", type=float, help="seconds since start: a row whose estimated time (from the calls seen so "
        "far) would end past it is skipped and listed, for time-limited GPU commands; rows are saved as they finish "
        "and SIGTERM still writes the report")
    add("--report-only", nargs="?", const="", metavar="JSON", help="only regenerate latest.md and the plots from "
        "JSON (default: every <out>/*/latest.json)")
    add("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run, argv=None)
    return parser


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


if __name__ == "__main__":
    sys.exit(main())
