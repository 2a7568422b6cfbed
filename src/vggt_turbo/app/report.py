"""What ``reconstruct`` tells about a run: ``report.json`` for machines and the summary table for people.

Both carry the random-weights warning prominently: geometry from random weights looks like a result (files of
the right shapes) but means nothing, and nobody should mistake one for the other.
"""

from __future__ import annotations

import json
import platform
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Optional, TextIO

import numpy as np
import torch

from .. import __version__
from ..upstream import PINNED_COMMIT
from . import example_scene
from .options import ReconstructOptions
from .result import Result

RANDOM_WEIGHTS_NOTE = "RANDOM WEIGHTS: meaningless geometry, for testing the pipeline only"
_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def build_report(result: Result) -> dict[str, Any]:
    options = result.options
    report: dict[str, Any] = {"tool": "vggt-turbo reconstruct", "random_weights": result.random_weights}
    if result.random_weights:
        report["warning"] = RANDOM_WEIGHTS_NOTE
    report.update(
        weights=result.weights,
        input=f"{example_scene.NAME} (rendered by {example_scene.__name__})" if options.example
        else str(options.input.absolute()),
        input_kind=result.input_kind,
        frames=result.frames,
        frames_in_input=result.frames_in_input,
        frames_requested=options.frames,
        stride=options.stride,
        image_names=result.image_names,
        input_names=result.input_names,
        resolution={"width": result.width, "height": result.height},
        mode=options.mode,
        device=str(result.device),
        device_name=_device_name(result.device),
        dtype=_DTYPE_NAMES[result.dtype],
        preset=options.preset,
        optimizations=result.optimizations,
        timings_s={k: round(v, 4) for k, v in result.timings.items()},
        kernel_cache=_kernel_cache(result),
        peak_memory={"bytes": result.peak_bytes, "measured": result.peak_measured},
        points={
            "conf_percentile": options.conf_percentile,
            "conf_threshold": result.conf_threshold,
            "written": result.points,
            "colmap_points": result.colmap_points,
        },
        colmap_skipped_frames=result.colmap_skipped,
        versions=versions(),
        outputs=list(result.outputs),
    )
    return report


def _kernel_cache(result: Result) -> dict[str, Any]:
    """Whether the inference time includes compiling GPU kernels: "first run" (it does; timings_s has
    ``inference_first_run``), "warm" (kernels from the cache; ``inference_warm``) or "cpu" (none compiled)."""
    kernels = result.kernels
    if kernels is None or kernels.directory is None:
        return {"state": "cpu", "directory": None}
    return {"state": kernels.state, "directory": str(kernels.directory)}


def versions() -> dict[str, Any]:
    """Versions that decide the numbers: python, torch (and its CUDA), numpy, vggt_turbo, and upstream's commit.

    Upstream's version string never changes (0.0.1), so its commit comes from pip's ``direct_url.json``
    (present for a git install); a local-folder install records only the folder (commit None).
    """
    try:
        direct = json.loads(metadata.distribution("vggt").read_text("direct_url.json") or "{}")
    except metadata.PackageNotFoundError:
        direct = {}
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "numpy": np.__version__,
        "vggt_turbo": __version__,
        "vggt_upstream": {
            "commit": direct.get("vcs_info", {}).get("commit_id"),
            "installed_from": direct.get("url"),
            "pinned_commit": PINNED_COMMIT,
        },
    }


def print_summary(result: Result, file: Optional[TextIO] = None) -> None:
    """The table printed at the end of a run (nothing else of the command goes to stdout)."""
    out = file or sys.stdout
    t, options = result.timings, result.options
    rows = []
    if result.random_weights:
        rows.append(("!!", RANDOM_WEIGHTS_NOTE))
    rows += [
        ("weights", result.weights),
        ("frames", f"{result.frames} of {result.frames_in_input} ({result.input_kind} {_input(options)})"
                   + _asked(result)),
        ("resolution", f"{result.width} x {result.height} (W x H), mode {options.mode}"),
        ("device", f"{result.device} ({_device_name(result.device)}), {_DTYPE_NAMES[result.dtype]}, "
                   f"preset {options.preset}"),
        ("load", f"{t['load']:8.2f} s"),
        ("model", f"{t['model']:8.2f} s"),
        ("inference", f"{t['inference']:8.2f} s  (aggregator {t['aggregator']:.2f} s, heads {t['heads']:.2f} s)"),
        ("export", f"{t['export']:8.2f} s"),
        ("peak memory", _gib(result.peak_bytes) + f" ({result.peak_measured})"),
        ("points", f"{result.points:,} in points.ply (confidence >= p{options.conf_percentile:g} = "
                   f"{result.conf_threshold:.4g}), {result.colmap_points:,} in sparse/points3D.txt"),
    ]
    if result.colmap_skipped:
        rows.append(("!!", f"left out of sparse/ (degenerate cameras): {', '.join(result.colmap_skipped)}"))
    rows.append(("output", str(options.out.absolute())))
    rows += [("", name) for name in result.outputs]
    total = sum(t[k] for k in ("load", "model", "inference", "export"))
    print(f"vggt-turbo reconstruct: done in {total:.2f} s", file=out)
    for key, value in rows:
        print(f"  {key:<12} {value}", file=out)


def _input(options: ReconstructOptions) -> Path:
    """The input as the user named it: the example scene by its folder's name (the rendered folder is temporary)."""
    return Path(example_scene.NAME) if options.example else options.input


def _asked(result: Result) -> str:
    """Where ``--frames N`` asked for more than the input has, the summary says that all were used instead."""
    asked = result.options.frames
    return f"; --frames {asked} asked, all {result.frames_in_input} used" if asked and asked > result.frames_in_input else ""


def _gib(n: Optional[int]) -> str:
    return "unknown" if n is None else f"{n / 1024**3:.2f} GiB"


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
