"""What a ``reconstruct`` run did: the summary table shows it, report.json records it.

A module of its own so that the report reads a run's result without importing the command that produces it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .kernel_cache import KernelCache
from .options import ReconstructOptions


@dataclass
class Result:
    """Filled in as the run goes: the export adds the point counts, the export time and the peak memory."""

    options: ReconstructOptions
    weights: str
    frames: int
    frames_in_input: int
    input_kind: str
    image_names: list[str]  # as saved in images/ and named in sparse/ (see export.output_image_names)
    input_names: list[str]  # the input's file names
    width: int
    height: int
    device: torch.device
    dtype: torch.dtype
    optimizations: dict[str, Any]
    outputs: tuple[str, ...]  # the files and folders written, in order (export_options.outputs)
    timings: dict[str, float] = field(default_factory=dict)
    peak_bytes: Optional[int] = None
    peak_measured: str = ""
    points: int = 0
    colmap_points: int = 0
    colmap_skipped: list[str] = field(default_factory=list)
    conf_threshold: float = 0.0
    kernels: Optional[KernelCache] = None

    @property
    def random_weights(self) -> bool:
        return self.options.random_weights
