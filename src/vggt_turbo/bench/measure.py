"""What one call is measured with: the clock, peak memory, forward hooks for the aggregator and the phases, and
the relative error against upstream's outputs (and the cameras' rotation error, in degrees)."""

from __future__ import annotations

import functools
import gc
import time
from typing import Any, Callable, Optional

import torch
from torch import nn

from .fidelity import pose_rotation_errors_deg, relative_error

OUTPUT_KEYS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")
AGG_OUTPUT_KEY = "tokens_last"  # the aggregator's last cached output, the tokens the heads read last
GIB = 2**30


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


def snapshot(outputs: Optional[dict], tokens: Optional[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The compared outputs, moved to the CPU (one reference per frame count is kept)."""
    snap = {}
    if outputs is not None:
        snap = {k: outputs[k].detach().to("cpu") for k in OUTPUT_KEYS if k in outputs}
    if tokens is not None:
        snap[AGG_OUTPUT_KEY] = tokens.detach().to("cpu")
    return snap


def compare(outputs: Optional[dict], tokens: Optional[torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per part, per output: the relative error against the reference; under ``"pose"``, the largest angle between
    a frame's camera rotation and the reference's, in degrees (a relative error of ``pose_enc`` mixes translation,
    quaternion and field of view; the angle says what a user sees)."""
    errors: dict[str, dict[str, float]] = {}
    if outputs is not None:
        errors["full"] = {k: relative_error(outputs[k], reference[k]) for k in OUTPUT_KEYS if k in outputs and k in reference}
        if "pose_enc" in outputs and "pose_enc" in reference:
            angles = pose_rotation_errors_deg(outputs["pose_enc"].float(), reference["pose_enc"])
            errors["pose"] = {"rotation_deg_max": angles.max().item()}
    if tokens is not None and AGG_OUTPUT_KEY in reference:
        errors["aggregator"] = {AGG_OUTPUT_KEY: relative_error(tokens, reference[AGG_OUTPUT_KEY])}
    return errors
