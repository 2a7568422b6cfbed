"""How many frames fit, and how long they take: arithmetic, before any weight is loaded.

Running out of GPU memory is what users of VGGT meet most often, and nothing tells them beforehand how many frames
a GPU holds. This module answers from the model's dimensions and a few constants fitted on measured runs
(``benchmarks/plan_calibration.py`` writes them to ``plan_constants.json`` from the committed bench results; the
held-out check is ``benchmarks/results/plan_check.md``). It imports no torch at module level and needs no GPU, so
``vggt-turbo plan`` runs anywhere in a fraction of a second.

Peak GPU memory (bytes) of one forward, with T = B*S*P tokens and P = (H/14)(W/14) + 5 tokens per frame:

    weights (fp32)  + inputs (B*S*3*H*W*4)  + max(aggregator phase, heads phase)
    aggregator phase = A0 + kept + a*T
    heads phase      = H0 + kept + fetched + outputs + h * min(B*S, 8) * H * W

``kept`` is the 4 layer outputs the heads read (2*1024 channels per token, fp32 where the residual stream is fp32,
bf16 under ``bf16_weights``). The DPT heads compute in fp32 and read 8 frames at a time: ``fetched`` is the fp32
copy of that chunk which the heads' input wrappers make when the kept layers are not already fp32 on the GPU
(bf16, or in host memory). With ``offload_intermediates`` the kept layers live in host memory (``kept`` = 0) and
each DPT head also prefetches the next chunk while the current one computes, so two chunks are resident.
``outputs`` are the depth, point maps and confidences (6 fp32 values per pixel). ``a`` (what one block keeps
alive per token), ``A0`` (cached bf16 weight copies, workspaces), ``H0`` are fitted per variant; ``h`` (a DPT
head's working set per pixel of its chunk) is fitted on upstream, the only runs with chunks of fewer than 8
frames, and shared by the presets, which run the same fp32 heads. Whether a run fits compares the peak *reserved*
memory (allocated peak times the variant's measured reserved/allocated ratio, plus the CUDA context) with the GPU's.
Short calls of the presets replay a CUDA graph whose private pool holds the same working set: the estimate is that
working set, pool or not.

Seconds: ``c + a*F + b*F**2`` with F = T / 1374 (frames at 518x518), the square being global attention; fitted per
variant and GPU kind on that kind's runs (on the H100, today's ``exact`` is the old bf16-weights preset's curve
times the ratio measured between the two in the same H200 runs); other GPUs are "not calibrated".
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional, Union

GIB = 1024**3
CONSTANTS = Path(__file__).with_name("plan_constants.json")
VARIANTS = ("upstream", "exact", "fast")
# GPUs with calibrated seconds, matched in the device's name.
GPU_NAMES = {"h100": "H100", "h200": "H200"}
# Memory of well-known GPUs (GiB as nvidia-smi / torch report them), for ``--gpu NAME`` without ``--memory``.
GPU_MEMORY_GIB = {"H100": 79.1, "H200": 139.8, "A100-80GB": 79.1, "A100-40GB": 39.4, "L40S": 44.4, "A6000": 47.4,
                  "RTX4090": 23.6, "RTX3090": 23.6, "A10G": 22.1, "L4": 22.0, "T4": 14.6}


@dataclass(frozen=True)
class Estimate:
    """One variant (upstream or a preset), with or without ``offload_intermediates``."""

    variant: str
    offload: bool
    peak_gib: float  # predicted peak allocated: weights + inputs + activations (what the bench measures)
    need_gib: float  # predicted peak reserved + CUDA context: what must fit on the GPU
    fits: Optional[bool]  # None when no memory size was given
    max_frames: Optional[int]  # largest frame count whose need fits (same size and batch); None without memory
    seconds: Optional[float]  # predicted forward time (warm call), None where the GPU is not calibrated
    seconds_extrapolated: bool  # longer than any run the GPU's time curve was fitted on
    remeasured: bool  # False: the constants come from an earlier form of the preset (see notes)
    note: str = ""

    @property
    def name(self) -> str:
        return self.variant + (" + offload" if self.offload else "")


@dataclass(frozen=True)
class Plan:
    """What ``plan()`` predicts for every variant at one input size."""

    frames: int
    height: int
    width: int
    batch: int
    memory_gib: Optional[float]
    gpu: Optional[str]  # the calibrated GPU kind whose seconds are given, or None
    estimates: tuple[Estimate, ...]

    def estimate(self, variant: str, offload: bool) -> Estimate:
        for e in self.estimates:
            if e.variant == variant and e.offload == offload:
                return e
        raise KeyError(f"no estimate for {variant} offload={offload}")

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def table(self) -> str:
        """The plan as a text table (``vggt-turbo plan``)."""
        mem = f"{self.memory_gib:.1f} GiB" if self.memory_gib is not None else "memory not given"
        lines = [f"{self.frames} frames at {self.width}x{self.height}, batch {self.batch}; {mem}; "
                 f"seconds: {self.gpu or 'not calibrated'}",
                 f"{'variant':<20} {'peak GiB':>9} {'need GiB':>9} {'fits':>5} {'max frames':>11} {'seconds':>9}"]
        for e in self.estimates:
            fits = "-" if e.fits is None else ("yes" if e.fits else "no")
            most = "-" if e.max_frames is None else str(e.max_frames)
            secs = "not calibrated" if e.seconds is None else f"{e.seconds:.1f}"
            secs += "+" if e.seconds_extrapolated else ""
            mark = "" if e.remeasured else " *"
            lines.append(f"{e.name + mark:<20} {e.peak_gib:>9.1f} {e.need_gib:>9.1f} {fits:>5} {most:>11} {secs:>9}")
        if any(not e.remeasured for e in self.estimates):
            lines.append("* " + next(e.note for e in self.estimates if not e.remeasured))
        if any(e.seconds_extrapolated for e in self.estimates):
            lines.append("+ longer than any run these seconds were fitted on: an extrapolation (how far off one "
                         "has been: benchmarks/results/plan_check.md)")
        return "\n".join(lines)

    def advice(self, variant: str) -> str:
        """One line naming what fits, for a run of ``variant`` that does not (reconstruct's refusal)."""
        best = min((e for e in self.estimates if e.variant == variant), key=lambda e: e.need_gib)
        head = (f"{self.frames} frames at {self.width}x{self.height} need ~{best.need_gib:.0f} GiB with {variant}"
                + (" (offloading)" if best.offload else ""))
        if self.memory_gib is None:
            return head
        options = [f"--preset {e.variant}" for e in self.estimates
                   if e.variant != variant and e.variant in ("exact", "fast") and e.fits and e.offload]
        fewer = max((e.max_frames or 0) for e in self.estimates if e.variant == variant)
        tail = ", or " if options else ""
        fewer_text = (f"at most {fewer} frames with {variant}" if fewer > 0
                      else f"not even 1 frame with {variant}")
        return f"{head}; this GPU has {self.memory_gib:.0f} GiB: {', '.join(options)}{tail}{fewer_text}"


@lru_cache(maxsize=1)
def constants() -> dict[str, Any]:
    """The calibrated constants (package data written by ``benchmarks/plan_calibration.py``)."""
    return json.loads(CONSTANTS.read_text())


def tokens_per_frame(height: int, width: int, k: Optional[dict[str, Any]] = None) -> int:
    model = (k or constants())["model"]
    patch = model["patch_size"]
    return (height // patch) * (width // patch) + model["special_tokens"]


def phases(variant: str, offload: bool, frames: int, height: int, width: int, batch: int = 1,
           k: Optional[dict[str, Any]] = None) -> tuple[float, float, float]:
    """(weights + inputs, aggregator phase, heads phase) in bytes; see the module docstring.

    ``k``: constants to use instead of the committed ones (the calibration script fits through this function, so
    the planner and its fit cannot disagree)."""
    k = k or constants()
    model, mem = k["model"], k["memory"][variant]
    n = batch * frames
    per_frame = tokens_per_frame(height, width, k)
    tokens = n * per_frame
    values_per_token = len(model["kept_layers"]) * 2 * model["embed_dim"]
    chunk = min(n, model["heads_chunk_frames"])
    heads_bytes = model["heads_element_bytes"]
    kept = 0.0 if offload else tokens * values_per_token * mem["kept_element_bytes"]
    chunks_fetched = 0
    if offload:  # this chunk, and the next one while there is one
        chunks_fetched = 1 + (model["heads_prefetch_chunks"] if n > chunk else 0)
    elif mem["kept_element_bytes"] != heads_bytes:  # converted to the heads' dtype one chunk at a time
        chunks_fetched = 1
    fetched = chunks_fetched * chunk * per_frame * values_per_token * heads_bytes
    outputs = n * height * width * model["head_output_values"] * 4
    aggregator = mem["A0"] + kept + mem["a"] * tokens
    heads = mem["H0"] + kept + fetched + outputs + mem["h"] * chunk * height * width
    base = model["weights_bytes"] + n * 3 * height * width * 4
    return base, aggregator, heads


def peak_bytes(variant: str, offload: bool, frames: int, height: int, width: int, batch: int = 1,
               k: Optional[dict[str, Any]] = None) -> tuple[float, float]:
    """(peak allocated, peak reserved + context) in bytes for one forward; ``k`` as in ``phases``."""
    k = k or constants()
    base, aggregator, heads = phases(variant, offload, frames, height, width, batch, k)
    allocated = base + max(aggregator, heads)
    reserved = base + max(aggregator, heads) * k["memory"][variant]["reserved_ratio"] + k["model"]["context_bytes"]
    return allocated, reserved


def _time_fit(variant: str, frames: int, height: int, width: int, batch: int, gpu: Optional[str],
              k: dict[str, Any]) -> Optional[tuple[dict[str, float], float]]:
    """(the GPU kind's time curve of ``variant``, the call's length in 518x518 frames' tokens), or None."""
    fits = k["time"]["fits"].get(gpu) if gpu else None
    if fits is None:
        return None
    return fits[variant], batch * frames * tokens_per_frame(height, width, k) / k["time"]["reference_tokens"]


def seconds_extrapolated(variant: str, frames: int, height: int, width: int, batch: int, gpu: Optional[str],
                         k: Optional[dict[str, Any]] = None) -> bool:
    """Whether the call is longer than every run ``variant``'s time curve on ``gpu`` was fitted on."""
    found = _time_fit(variant, frames, height, width, batch, gpu, k or constants())
    return found is not None and found[1] > found[0]["measured_up_to"] * (1 + 1e-9)


def seconds(variant: str, offload: bool, frames: int, height: int, width: int, batch: int, gpu: Optional[str],
            k: Optional[dict[str, Any]] = None) -> Optional[float]:
    """Predicted warm forward time on a calibrated GPU kind, else None."""
    k = k or constants()
    found = _time_fit(variant, frames, height, width, batch, gpu, k)
    if found is None:
        return None
    fit, f = found
    t = fit["c"] + fit["a"] * f + fit["b"] * f * f
    if batch * frames >= k["model"]["offload_auto_frames"] and not offload and variant != "upstream":
        t *= k["time"]["no_offload_factor"]
    return t


def max_frames(variant: str, offload: bool, memory_bytes: float, height: int, width: int, batch: int = 1) -> int:
    """The largest frame count (per batch item) whose need fits in ``memory_bytes``; 0 when not even one does."""
    def fits(s: int) -> bool:
        return peak_bytes(variant, offload, s, height, width, batch)[1] <= memory_bytes
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 10**7:
            return lo
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def gpu_kind(name: Optional[str]) -> Optional[str]:
    """The calibrated GPU kind named in a device name ("NVIDIA H200" -> "H200"), or None."""
    if not name:
        return None
    low = name.lower()
    return next((kind for key, kind in GPU_NAMES.items() if key in low), None)


def _memory_of(memory: Any) -> tuple[Optional[float], Optional[str]]:
    """(GiB, device name) from a number of GiB, a torch device / "cuda:N" (its total memory), or None."""
    if memory is None:
        return None, None
    if isinstance(memory, (int, float)):
        if memory <= 0:
            raise ValueError(f"memory must be positive GiB, got {memory}")
        return float(memory), None
    import torch  # only when a device is asked about

    device = torch.device(memory)
    if device.type != "cuda":
        raise ValueError(f"memory: a CUDA device or GiB, got {memory!r}")
    props = torch.cuda.get_device_properties(device)
    return props.total_memory / GIB, props.name


def gpu_memory_gib(name: str) -> Optional[float]:
    """The memory of a known GPU named like "H100", "rtx 4090" or "A100-40GB", or None."""
    key = re.sub(r"[\s_]", "", name).upper()
    for known, gib in GPU_MEMORY_GIB.items():
        if known.replace("-", "") == key.replace("-", ""):
            return gib
    return None


def plan(frames: int, height: int = 392, width: int = 518, batch: int = 1,
         memory: Union[None, float, int, str, Any] = None, gpu: Optional[str] = None) -> Plan:
    """Predict peak memory, fit, seconds and the largest frame count for upstream and each preset.

    ``memory``: GiB, or a CUDA device (its total memory; its name picks the calibrated seconds). ``gpu``: a GPU
    name ("H100", "NVIDIA H200", "RTX4090"); gives seconds when calibrated, and the memory of a known GPU when
    ``memory`` is not given. Height and width are the preprocessed frames' (multiples of 14; upstream's loader
    gives 518 wide).
    """
    if frames < 1 or batch < 1:
        raise ValueError(f"frames and batch must be positive, got {frames} and {batch}")
    patch = constants()["model"]["patch_size"]
    if height < patch or width < patch:
        raise ValueError(f"frames of {width}x{height} are smaller than one {patch}-pixel patch")
    gib, device_name = _memory_of(memory)
    if gib is None and gpu is not None:
        gib = gpu_memory_gib(gpu)
    kind = gpu_kind(gpu or device_name)
    k = constants()
    out = []
    for variant in VARIANTS:
        for offload in (False, True):
            if variant == "upstream" and offload:
                continue  # offloading is a vggt-turbo patch: upstream runs as it is
            allocated, reserved = peak_bytes(variant, offload, frames, height, width, batch)
            mem = k["memory"][variant]
            out.append(Estimate(
                variant=variant, offload=offload, peak_gib=allocated / GIB, need_gib=reserved / GIB,
                fits=None if gib is None else reserved <= gib * GIB,
                max_frames=None if gib is None else max_frames(variant, offload, gib * GIB, height, width, batch),
                seconds=seconds(variant, offload, frames, height, width, batch, kind),
                seconds_extrapolated=seconds_extrapolated(variant, frames, height, width, batch, kind),
                remeasured=mem["remeasured"], note=mem.get("note", ""),
            ))
    return Plan(frames=frames, height=height, width=width, batch=batch, memory_gib=gib, gpu=kind,
                estimates=tuple(out))
