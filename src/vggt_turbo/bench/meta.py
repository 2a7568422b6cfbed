"""Where a run was measured: the device slug of its results folder, the commits and the run's metadata."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

from ..upstream import PINNED_COMMIT


PATCH = 14  # VGGT's patch size: image sides must be multiples of it


def parse_image_size(text: str) -> tuple[int, int]:
    """``--image-size``: ``N`` (square frames) or ``WxH`` (width first, as image sizes are written: ``518x392`` is
    upstream's loader's frame for 4:3 photos), returned as (H, W), the order of the image tensors' last two axes."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[x×]\s*(\d+)\s*)?", text.lower())
    if match is None:
        raise argparse.ArgumentTypeError(f"image size {text!r}: N or WxH, e.g. 518 or 518x392")
    width = int(match.group(1))
    height = int(match.group(2) or width)
    if width < PATCH or height < PATCH or width % PATCH or height % PATCH:
        raise argparse.ArgumentTypeError(f"image size {text!r}: sides must be positive multiples of {PATCH}")
    return height, width


def image_size_label(hw: tuple[int, int]) -> Any:
    """What the meta records as ``image_size``: the side for square frames (as every earlier run recorded it, so
    their results still merge), ``"WxH"`` otherwise."""
    height, width = hw
    return width if height == width else f"{width}x{height}"


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
        "image_size": image_size_label(args.image_size),
        "image_hw": list(args.image_size),
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
        "errors": "||a-b||/||b|| in float32 of the first call's outputs vs upstream in fp32 (no autocast, TF32 off) "
        "on the same inputs; the upstream row's error is upstream-autocast's own, the noise floor; aggregator rows: "
        "its last cached output",
        "weights": "random init (vggt_turbo.random_model.build_vggt, seed 0), no track head",
        "python": platform.python_version(),
        "cpu": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    if cuda:
        meta["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
        meta["cudnn"] = torch.backends.cudnn.version()
    return meta
