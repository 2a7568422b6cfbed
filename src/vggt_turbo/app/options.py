"""What ``vggt-turbo reconstruct`` was asked to do, as one typed, immutable object.

Why not the ``argparse.Namespace``: a namespace is untyped and mutable, so every function that received it could
read any attribute or change one for the functions after it. The run, the exporters and the report take this
object instead, built once from the parsed arguments; a value the run resolves later (``--frames auto``, the
rendered ``--example`` folder) makes a new object with ``dataclasses.replace``.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

Frames = Union[int, Literal["auto"], None]  # --frames: N, "auto" (as many as fit) or None (all of them)


@dataclass(frozen=True)
class ReconstructOptions:
    """The ``reconstruct`` command's arguments, one field per flag (see ``reconstruct.add_parser`` for each)."""

    input: Optional[Path]  # None with --example until the scene is rendered
    out: Path
    example: bool
    preset: str
    weights: Optional[str]
    random_weights: bool
    frames: Frames
    stride: Optional[int]
    device: str
    memory: Optional[float]  # GiB to plan for; None: what the device has free
    dtype: str
    mode: str
    conf_percentile: float
    export: str  # the comma list as given; ``export_options.parse`` checks it when the run starts
    force: bool
    quiet: bool
    model_size: str
    verbose: bool = False  # the top-level ``vggt-turbo -v`` sets it too; absent from a bare namespace

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "ReconstructOptions":
        """The options in ``args`` (other attributes, such as ``func``, are left out)."""
        given = vars(args)
        return cls(**{f.name: given[f.name] for f in dataclasses.fields(cls) if f.name in given})
