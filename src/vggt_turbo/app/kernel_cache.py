"""A persistent cache for the GPU kernels this library compiles (Triton, and inductor for ``compile``).

Why: Triton compiles each kernel on its first use in a process; only its on-disk cache spares the next process
that work. Triton's default (``~/.triton/cache``) and inductor's (``/tmp/torchinductor_$USER``) are shared with
every other program and, for inductor, lost at reboot; here both live under the user's cache folder
(``$VGGT_TURBO_CACHE``, else ``$XDG_CACHE_HOME/vggt-turbo``, else ``~/.cache/vggt-turbo``), so kernels are
compiled once per machine. A variable the user has set already is left alone.

Whether a run will compile is recorded by a marker per (library, torch, triton, GPU, preset, dtype) written after
a successful CUDA forward: the command says "compiling GPU kernels" in its progress line while the cache is
cold, and report.json tells a first run from a warm one. Nothing here autotunes: the kernels have fixed
launch parameters, and ``torch.compile`` runs in its default mode.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .. import __version__

log = logging.getLogger(__name__)

# Environment variable -> sub-folder of the cache root.
_VARIABLES = {"TRITON_CACHE_DIR": "triton", "TORCHINDUCTOR_CACHE_DIR": "inductor"}


def root() -> Path:
    """The cache folder of vggt-turbo for this user."""
    explicit = os.environ.get("VGGT_TURBO_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "vggt-turbo"


@dataclass(frozen=True)
class KernelCache:
    """Where this run's kernels are cached and whether they were there before it ran."""

    directory: Optional[Path]  # None: no kernels are compiled on this device (the CPU)
    warm: bool
    marker: Optional[Path] = None

    @property
    def state(self) -> str:
        """What report.json says about the inference timing: "cpu", "first run" or "warm"."""
        if self.directory is None:
            return "cpu"
        return "warm" if self.warm else "first run"

    def progress_note(self) -> str:
        """The progress line's words while the forward runs ("" when there is nothing to say)."""
        if self.directory is None or self.warm:
            return ""
        return f"first run on this machine: compiling GPU kernels once (cached in {self.directory})"

    def mark_warm(self) -> None:
        """Record that this configuration's kernels are in the cache (after a successful forward)."""
        if self.marker is None or self.warm:
            return
        try:
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.touch()
        except OSError as exc:  # a read-only home: the next run only loses the progress note, not the cache
            log.info("could not write the kernel-cache marker %s (%s)", self.marker, exc)


def configure(device: torch.device, preset: str, dtype: torch.dtype) -> KernelCache:
    """Point Triton's and inductor's caches under ``root()`` (unless set) and say whether they are warm.

    Must run before the first kernel compiles (the caches read these variables when they are first used).
    """
    if device.type != "cuda":
        return KernelCache(None, warm=True)
    directory = use_own_caches()
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("kernel cache %s cannot be created (%s): kernels will be compiled in every run", directory, exc)
    marker = root() / "compiled" / _fingerprint(device, preset, dtype)
    return KernelCache(directory, warm=marker.exists(), marker=marker)


def use_own_caches() -> Path:
    """Point Triton's and inductor's caches under ``root()`` (variables the user set are left alone); returns
    Triton's folder. Touches no GPU: a command calls it first, before anything may import Triton."""
    base = root()
    for variable, folder in _VARIABLES.items():
        if not os.environ.get(variable):
            os.environ[variable] = str(base / folder)
    return Path(os.environ["TRITON_CACHE_DIR"])


def _fingerprint(device: torch.device, preset: str, dtype: torch.dtype) -> str:
    """A file name naming what decides which kernels compile: versions, GPU, preset and dtype."""
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = "none"
    gpu = torch.cuda.get_device_name(device) if torch.cuda.is_available() else "cuda"
    key = "|".join((__version__, torch.__version__, str(torch.version.cuda), triton, gpu, preset, str(dtype)))
    return hashlib.sha256(key.encode()).hexdigest()[:24]
