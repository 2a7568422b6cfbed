"""Does the run fit in the GPU's memory: ``reconstruct``'s plan before any weight is loaded.

The planner's arithmetic (``vggt_turbo.planner``) for the frames at hand and the memory there is (free GPU memory,
or ``--memory`` / ``$VGGT_TURBO_MEMORY_GIB`` standing in for a GPU): the preset as it is, offloading turned on
where that makes the run fit (said in one line), or one line naming what fits; ``--frames auto`` takes the most
frames that fit. An out-of-memory error during the run is recognised here and answered with the same advice.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

from .. import planner
from ..config import PRESETS
from . import inputs, memory
from .errors import UserError
from .options import ReconstructOptions

log = logging.getLogger(__name__)

MEMORY_ENV = "VGGT_TURBO_MEMORY_GIB"


def env_memory() -> Optional[float]:
    value = os.environ.get(MEMORY_ENV)
    try:
        return float(value) if value else None
    except ValueError:
        log.warning("$%s=%r is not a number of GiB; ignored", MEMORY_ENV, value)
        return None


def memory_gib(options: ReconstructOptions, device: torch.device) -> tuple[Optional[float], Optional[str]]:
    """(GiB to plan for, GPU name): ``--memory`` (or its variable) stands in for the GPU, e.g. in tests; on CUDA
    otherwise the memory free now; on the CPU without it none (the rough RAM estimate of ``memory`` applies)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if options.memory is not None:
        return options.memory, name
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] / planner.GIB, name
    return None, None


def plan_for(options: ReconstructOptions, device: torch.device, frames: int, height: int, width: int) -> Optional[planner.Plan]:
    gib, name = memory_gib(options, device)
    if gib is None:
        return None
    return planner.plan(frames, height=height, width=width, memory=gib, gpu=name)


def offloads(preset: str, frames: int) -> bool:
    """Whether the preset's own ``offload_intermediates`` setting ("auto": from 32 frames) offloads this call."""
    value = PRESETS[preset].offload_intermediates
    return value is True or (value == "auto" and frames >= planner.constants()["model"]["offload_auto_frames"])


def decide(options: ReconstructOptions, planned: Optional[planner.Plan]) -> bool:
    """Follow the plan before any weight is loaded: True to turn offloading on (said in one line), nothing when the
    preset fits as it is, ``UserError`` naming what fits otherwise."""
    if planned is None:
        return False
    preset = options.preset
    as_is = planned.estimate(preset, offloads(preset, planned.frames))
    if as_is.fits:
        return False
    offloaded = planned.estimate(preset, True)
    if offloaded.fits:
        if not options.quiet:
            print(f"vggt-turbo reconstruct: {planned.frames} frames need ~{as_is.need_gib:.0f} GiB with {preset}, "
                  f"~{offloaded.need_gib:.0f} GiB with offload_intermediates: turned it on "
                  f"({planned.memory_gib:.0f} GiB available)", file=sys.stderr)
        return True
    raise UserError(planned.advice(preset))


def probe_size(options: ReconstructOptions) -> tuple[int, int]:
    """(height, width) upstream's loader gives the input's first frame (``--frames auto`` plans before loading)."""
    source: Path = options.input
    if not source.exists():
        raise UserError(f"input not found: {source}")
    if source.is_dir():
        files = inputs.list_images(source)
        if not files:
            raise UserError(f"{source}: no images")
        return tuple(inputs.load_images(files[:1], options.mode).shape[-2:])  # type: ignore[return-value]
    with tempfile.TemporaryDirectory(prefix="vggt-turbo-probe-") as workdir:
        for index, rgb in inputs.video_frames(source, [0], inputs.DecoderNoise()):
            path = Path(workdir) / "probe.png"
            inputs.save_frame(rgb, path)
            return tuple(inputs.load_images([path], options.mode).shape[-2:])  # type: ignore[return-value]
    raise UserError(f"{source}: no frame could be decoded")


def auto_frames(options: ReconstructOptions, device: torch.device) -> Optional[int]:
    """``--frames auto``: the most frames the plan fits with the preset (offloading if need be); None (all of
    them) where there is no GPU memory to plan for."""
    gib, name = memory_gib(options, device)
    if gib is None:
        log.warning("--frames auto: no GPU memory to plan for (CPU without --memory); using all frames")
        return None
    height, width = probe_size(options)
    planned = planner.plan(1, height=height, width=width, memory=gib, gpu=name)
    most = max(e.max_frames or 0 for e in planned.estimates if e.variant == options.preset)
    if most < 1:
        raise UserError(planned.advice(options.preset))
    log.info("--frames auto: %d frames at %dx%d fit in %.1f GiB with %s", most, width, height, gib, options.preset)
    return most


def out_of_memory_error(exc: BaseException, planned: Optional[planner.Plan], preset: str,
                        where: str) -> Optional[UserError]:
    """The one line for ``exc`` if it is running out of memory (CUDA's caching allocator raises OutOfMemoryError;
    the CPU allocator and cuBLAS raise RuntimeErrors), with the plan's advice (the rough one without a plan);
    None for any other error. ``where``: e.g. "cuda with 800 frames at 518x392"."""
    text = str(exc)
    if not (isinstance(exc, torch.OutOfMemoryError) or "can't allocate memory" in text or "ALLOC_FAILED" in text):
        return None
    advice = planned.advice(preset) if planned is not None and planned.memory_gib is not None else memory.advice()
    return UserError(f"out of memory on {where}: {advice}")
