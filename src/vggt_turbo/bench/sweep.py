"""Running the variants: the ``--deadline`` budget, the timed calls, and the rows they become."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import logging
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from .fidelity import fp32_reference_mode, fresh_upstream_caches
from ..patching import apply_optimizations, revert_optimizations
from .measure import (
    GIB,
    AggregatorProbe,
    Clock,
    Memory,
    PhaseProbe,
    compare,
    last_tokens,
    snapshot,
)
from .report import phase_order, round_or_none, sig3
from .variants import Variant

log = logging.getLogger(__name__)


class Budget:
    """``--deadline``: start no row whose estimated cost would end past it (seconds since the process started).

    A call's cost is estimated from the same variant's calls when there are any (variants differ several times over
    at long sequences), else from every variant's: at S frames the median call seen at S (the median: a CUDA-graph
    capture is one slow outlier), else extrapolated from the largest smaller count seen as (S / S') ** 1.7
    (between linear frame attention and quadratic global attention).
    """

    def __init__(self, deadline: Optional[float], t0: float):
        self.deadline, self.t0 = deadline, t0
        self.per_call: dict[tuple[str, int], list[float]] = {}  # (variant, frames) -> seconds of each call seen
        self.skipped: list[str] = []

    def note(self, variant: str, frames: int, seconds: float) -> None:
        self.per_call.setdefault((variant, frames), []).append(seconds)

    def estimate(self, frames: int, variant: Optional[str] = None) -> float:
        own = {f: t for (v, f), t in self.per_call.items() if v == variant}
        seen = own or self._all_variants()
        if frames in seen:
            return statistics.median(seen[frames])
        smaller = [s for s in seen if s < frames]
        if not smaller:
            return 0.0
        s = max(smaller)
        return statistics.median(seen[s]) * (frames / s) ** 1.7

    def _all_variants(self) -> dict[int, list[float]]:
        merged: dict[int, list[float]] = {}
        for (_, f), times in self.per_call.items():
            merged.setdefault(f, []).extend(times)
        return merged

    def allows(self, frames: int, calls: int, what: str, variant: Optional[str] = None) -> bool:
        if self.deadline is None:
            return True
        if time.perf_counter() - self.t0 + self.estimate(frames, variant) * calls > self.deadline:
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
    first_call_s: Optional[float] = None  # wall time of the first (untimed) call: compile and capture cost
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

    def fp32_reference(self, images: torch.Tensor) -> Optional[dict[str, torch.Tensor]]:
        """Upstream's outputs in fp32 (no autocast, TF32 off), the yardstick of every row's errors, upstream's
        autocast row included (its error is the noise floor); None when that call fails (out of memory)."""
        revert_optimizations(self.model)
        fresh_upstream_caches(self.model)
        try:
            with fp32_reference_mode(), torch.no_grad():
                if self.args.part == "aggregator":
                    return snapshot(None, last_tokens(self.model.aggregator(images)))
                tokens: list[torch.Tensor] = []
                hook = self.model.aggregator.register_forward_hook(lambda m, a, out: tokens.append(last_tokens(out)))
                try:
                    out = self.model(images)
                finally:
                    hook.remove()
                return snapshot(out, tokens[0])
        except torch.cuda.OutOfMemoryError:
            log.warning("no fp32 reference at %d frames (out of memory): errors left empty", images.shape[1])
            return None
        finally:
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def calls(
        self,
        module: nn.Module,
        images: torch.Tensor,
        n: int,
        first: Callable[[Any, Optional[torch.Tensor]], None],
        variant: str,
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
            wall = time.perf_counter() - wall
            self.budget.note(variant, frames, wall)
            if i == 0:
                res.first_call_s = wall
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
        phases: bool = False,
        phases_only: bool = False,
    ) -> tuple[list[dict], list[dict], Optional[dict[str, torch.Tensor]]]:
        """Rows and phase rows of one variant at one frame count, its errors against ``reference`` (upstream in
        fp32, ``fp32_reference``). ``phases_only``: the full model with the phase hooks only (its rows are not
        wanted)."""
        frames, args = images.shape[1], self.args
        part = "full" if phases_only else args.part
        n = args.warmup + args.repeats
        got: dict[str, Any] = {"errors": {}}

        def first(out: Any, tokens: Optional[torch.Tensor]) -> None:
            outputs = out if part != "aggregator" else None
            if part == "aggregator":
                tokens = last_tokens(out)
            if reference:
                got["errors"].update(compare(outputs, tokens, reference))

        res = agg_res = None
        agg_note = None
        failure = None
        probe = phase_probe = None
        try:
            revert_optimizations(self.model)
            fresh_upstream_caches(self.model)  # each variant makes its RoPE tables as in a fresh process
            if part == "aggregator":  # the aggregator patched and called alone
                if variant.config is not None:
                    apply_optimizations(self.model.aggregator, variant.config)
                res = self.calls(self.model.aggregator, images, n, first, variant.name)
            else:
                if variant.config is not None:
                    apply_optimizations(self.model, variant.config)
                if part == "both":
                    probe = AggregatorProbe(self.model.aggregator, self.clock, self.memory)
                if phases:
                    phase_probe = PhaseProbe(self.model, self.clock)
                res = self.calls(self.model, images, n, first, variant.name, probe, phase_probe)
                if part == "both" and not res.agg_separable:
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

                    agg_res = self.calls(self.model.aggregator, images, n, first_agg, variant.name)
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
            res = agg_res = None
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        errors = got["errors"]
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
                "pose_rot_err_deg": (sig3(errors["pose"]["rotation_deg_max"])
                                     if name == "full" and "pose" in errors else None),
                "exact": variant.exact,
                "tier": variant.tier,
                "seconds_min": round_or_none(min(secs), 6) if secs else None,
                "seconds_all": [round_or_none(x, 6) for x in secs] if secs else [],
                "base_gib": round_or_none(measured.base_gib, 3) if measured is not None and measured.base_gib is not None else None,
                "reserved_gib": _reserved(name, measured, res),
                "first_call_s": round_or_none(measured.first_call_s, 3) if measured is not None else None,
                "config": variant.config_dict(),
            }
            if errs and any(not math.isfinite(v) for v in errs.values()):
                row["errors_note"] = "null error: shapes or non-finite entries differ from upstream's"
            if name == "aggregator" and agg_note:
                row["aggregator_timing"] = agg_note
            if failure:
                row["error"] = failure
            rows.append(row)
        return rows, self.phase_rows(variant, frames, res)

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
