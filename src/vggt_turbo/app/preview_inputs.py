"""What ``preview.png`` draws, cut down from a reconstruction: at most ``MAX_POINTS`` points and ``MAX_FRAMES``
thumbnails, a few MB whatever the run's size.

Apart from the drawing (``preview``) because it runs in the command's own process, while the drawing runs in
another (``preview_process``): what crosses between the two is this small record, not the run's full point cloud
and frames.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .selection import select

MAX_POINTS = 100_000  # a random subsample: enough to fill the views densely; splatting costs grow with it
MAX_FRAMES = 6
THUMBNAIL = 260  # px, the longest side of a tile in the strip


@dataclass(frozen=True)
class PreviewInputs:
    """The preview's inputs. Points in world coordinates (OpenCV axes), cameras as in predictions.npz."""

    xyz: np.ndarray  # (N, 3), N <= MAX_POINTS: the points drawn
    rgb: np.ndarray  # (N, 3) uint8
    points: int  # confident points in the reconstruction (the title's count)
    extrinsics: np.ndarray  # (S, 3, 4) camera-from-world
    intrinsics: np.ndarray  # (S, 3, 3)
    width: int  # of the frames, px
    height: int
    thumbnails: np.ndarray  # (T, h, w, 3) uint8: the strip's frames, every ``step``-th pixel
    depths: np.ndarray  # (T, h, w): their depth maps, likewise
    names: list[str]  # (T,) their names
    notes: list[str] = field(default_factory=list)  # red lines across the top (the random-weights warning)


def preview_inputs(
    xyz: np.ndarray,
    rgb: np.ndarray,
    extrinsics: np.ndarray,
    intrinsics: np.ndarray,
    frames: np.ndarray,
    depth: np.ndarray,
    names: Sequence[str],
    notes: Sequence[str] = (),
) -> PreviewInputs:
    """``xyz``/``rgb``: the confident points (N, 3), a random subsample of which is drawn; ``extrinsics`` (S, 3, 4)
    and ``intrinsics`` (S, 3, 3) as in predictions.npz; ``frames`` (S, H, W, 3) uint8; ``depth`` (S, H, W, 1).

    The strip shows ``MAX_FRAMES`` evenly spaced frames as thumbnails (every ``step``-th pixel, at most
    ``THUMBNAIL`` px on a side): they are shown about 200 px wide, and resampling full frames down to that was
    most of what drawing the strip cost.
    """
    count, height, width = frames.shape[:3]
    drawn_xyz, drawn_rgb = xyz, rgb
    if len(xyz) > MAX_POINTS:
        pick = np.random.default_rng(0).choice(len(xyz), MAX_POINTS, replace=False)
        drawn_xyz, drawn_rgb = xyz[pick], rgb[pick]
    shown = select(count, frames=MAX_FRAMES)
    step = -(-max(height, width) // THUMBNAIL)
    return PreviewInputs(
        xyz=np.ascontiguousarray(drawn_xyz), rgb=np.ascontiguousarray(drawn_rgb), points=len(xyz),
        extrinsics=np.asarray(extrinsics), intrinsics=np.asarray(intrinsics), width=width, height=height,
        thumbnails=np.ascontiguousarray(frames[shown, ::step, ::step]),
        depths=np.ascontiguousarray(depth[shown, ::step, ::step, 0]),
        names=[names[i] for i in shown], notes=list(notes),
    )
