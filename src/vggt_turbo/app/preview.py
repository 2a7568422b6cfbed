"""``preview.png``: a picture of a reconstruction, so that a user sees whether it is any good without opening
another program.

Top: the coloured point cloud (a random subsample of the confident points, the ones in points.ply) with the
camera frusta, from two viewpoints. Bottom: a strip of evenly spaced input frames above their depth maps. A run
with random weights says so in red across the top, like every other output.

Rendered with matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch), so it works on
a headless server and inside a process that uses matplotlib for something else. matplotlib is a dependency of
vggt-turbo: preview.png is written by every run, and next to torch the package is small.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .inputs import select

MAX_POINTS = 40_000  # enough to read the shape; matplotlib's 3-D scatter slows down past this
MAX_FRAMES = 6
VIEWS = (("front (as the first camera looks)", 10.0, -90.0), ("from above", 65.0, -55.0))


def to_plot_axes(xyz: np.ndarray) -> np.ndarray:
    """OpenCV world axes (x right, y down, z forward) -> the plot's (x, z, -y): the scene's up is the plot's up."""
    return np.stack([xyz[..., 0], xyz[..., 2], -xyz[..., 1]], axis=-1)


def frustum_lines(cam_from_world: np.ndarray, intrinsics: np.ndarray, width: int, height: int, size: float) -> np.ndarray:
    """(8, 2, 3) world-space segments of one camera's frustum: centre to the 4 image corners, and the image's
    rectangle, with the image plane ``size`` in front of the centre."""
    rotation, t = cam_from_world[:, :3].astype(np.float64), cam_from_world[:, 3].astype(np.float64)
    k = intrinsics.astype(np.float64)
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64)
    rays = np.concatenate([(corners - k[:2, 2]) / np.diag(k)[:2], np.ones((4, 1))], axis=1) * size
    world = (rays - t) @ rotation  # R^T (X_cam - t), row by row
    centre = -rotation.T @ t
    spokes = [(centre, c) for c in world]
    rim = [(world[i], world[(i + 1) % 4]) for i in range(4)]
    return np.array(spokes + rim)


def render_preview(
    path: Path,
    xyz: np.ndarray,
    rgb: np.ndarray,
    extrinsics: np.ndarray,
    intrinsics: np.ndarray,
    frames: np.ndarray,
    depth: np.ndarray,
    names: Sequence[str],
    notes: Sequence[str] = (),
) -> None:
    """Write the preview of one reconstruction to ``path`` (PNG).

    ``xyz``/``rgb``: the confident points (N, 3); ``extrinsics`` (S, 3, 4) camera-from-world and ``intrinsics``
    (S, 3, 3) as in predictions.npz; ``frames`` (S, H, W, 3) uint8; ``depth`` (S, H, W, 1); ``notes``: lines
    shown in red across the top (the random-weights warning).
    """
    count, height, width = frames.shape[:3]
    shown = select(count, frames=MAX_FRAMES)
    fig = Figure(figsize=(max(12.0, 2.2 * len(shown)), 11.0), dpi=100, layout="constrained")
    rows = fig.subfigures(2, 1, height_ratios=[1.45, 1.0])
    title = f"{len(xyz):,} confident points, {count} cameras, {width} x {height} px"
    rows[0].suptitle("\n".join([*notes, title]), color="red" if notes else "black",
                     fontsize=15 if notes else 13, fontweight="bold" if notes else "normal")
    _point_cloud(rows[0], xyz, rgb, extrinsics, intrinsics, width, height)
    _strip(rows[1], frames, depth, names, shown)
    # The notes go into the PNG's text chunks too, where a program (or a test) reads them without OCR.
    metadata = {"Title": "vggt-turbo reconstruct preview", **({"Warning": " / ".join(notes)} if notes else {})}
    FigureCanvasAgg(fig).print_png(str(path), metadata=metadata)


def _point_cloud(fig: Figure, xyz: np.ndarray, rgb: np.ndarray, extrinsics: np.ndarray, intrinsics: np.ndarray,
                 width: int, height: int) -> None:
    if len(xyz) > MAX_POINTS:
        pick = np.random.default_rng(0).choice(len(xyz), MAX_POINTS, replace=False)
        xyz, rgb = xyz[pick], rgb[pick]
    valid = np.isfinite(extrinsics).all(axis=(1, 2)) & np.isfinite(intrinsics).all(axis=(1, 2))
    rotations, translations = extrinsics[valid, :, :3], extrinsics[valid, :, 3]
    centres = -np.einsum("sji,sj->si", rotations, translations)
    both = np.concatenate([xyz, centres]) if len(xyz) else centres
    # The view box: the middle 96 % of the points and every camera, so a few stray points do not shrink the scene.
    lo = np.minimum(np.percentile(both, 2, axis=0), centres.min(axis=0, initial=np.inf))
    hi = np.maximum(np.percentile(both, 98, axis=0), centres.max(axis=0, initial=-np.inf))
    middle, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6)
    size = 0.12 * half
    segments = [frustum_lines(e, k, width, height, size) for e, k in zip(extrinsics[valid], intrinsics[valid])]
    colours = _camera_colours(len(segments))
    box = to_plot_axes(np.stack([middle - half, middle + half]))
    for i, (label, elevation, azimuth) in enumerate(VIEWS):
        ax = fig.add_subplot(1, len(VIEWS), i + 1, projection="3d")
        plotted = to_plot_axes(xyz)
        ax.scatter(plotted[:, 0], plotted[:, 1], plotted[:, 2], c=rgb / 255.0, s=1.0, marker=".", linewidths=0,
                   depthshade=False)
        for lines, colour in zip(segments, colours):
            for a, b in to_plot_axes(lines):
                ax.plot(*np.stack([a, b]).T, color=colour, linewidth=1.2)
        for axis, (a, b) in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), box.T):
            axis(min(a, b), max(a, b))
        ax.set_box_aspect((1, 1, 1))
        ax.view_init(elev=elevation, azim=azimuth)
        ax.set_xlabel("x")
        ax.set_ylabel("z (forward)")
        ax.set_zlabel("-y (up)")
        ax.tick_params(labelsize=7)
        ax.set_title(label, fontsize=11)


def _camera_colours(count: int) -> list[tuple[float, float, float, float]]:
    """The first camera red (the world frame is its frame), the others from blue to green in input order."""
    ramp = colormaps["winter"]
    return [(0.85, 0.1, 0.1, 1.0)] + [ramp(i / max(count - 2, 1)) for i in range(count - 1)]


def _strip(fig: Figure, frames: np.ndarray, depth: np.ndarray, names: Sequence[str], shown: list[int]) -> None:
    axes = fig.subplots(2, len(shown), squeeze=False)
    for column, i in enumerate(shown):
        image_ax, depth_ax = axes[0, column], axes[1, column]
        image_ax.imshow(frames[i])
        image_ax.set_title(_short(names[i]), fontsize=9)
        d = depth[i, ..., 0]
        finite = d[np.isfinite(d)]
        lo, hi = np.percentile(finite, [2, 98]) if finite.size else (0.0, 1.0)
        depth_ax.imshow(d, cmap="turbo", vmin=lo, vmax=hi)
        depth_ax.set_title(f"depth {lo:.3g} - {hi:.3g}", fontsize=8)
        for ax in (image_ax, depth_ax):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0, 0].set_ylabel("frame", fontsize=10)
    axes[1, 0].set_ylabel("depth (near blue, far red)", fontsize=10)


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else f"{name[: limit - 9]}...{name[-6:]}"
