"""``preview.png``: a picture of a reconstruction, so that a user sees whether it is any good without opening
another program.

Top: the coloured point cloud (a random subsample of the confident points, the ones in points.ply) with the
camera frusta, from two viewpoints. Bottom: a strip of evenly spaced input frames above their depth maps. A run
with random weights says so in red across the top, like every other output.

Rendered with matplotlib's Agg canvas directly (no pyplot, no display, no global backend switch), so it works on
a headless server and inside a process that uses matplotlib for something else. matplotlib is a dependency of
vggt-turbo: preview.png is written by every run, and next to torch the package is small.

Why it is drawn the way it is: every run writes it, so it sits on the export's critical path, and matplotlib's
own ways are slow at this (benchmarks/RESULTS.md, "Export (issue #20)"). A 3-D ``scatter`` with a colour per
point costs Agg a path per marker, so the points are instead projected with the 3-D axes' own matrix and splatted
into one image with numpy (``_Splat``: one pixel per point, the nearest point wins a pixel), which is why up to
``preview_inputs.MAX_POINTS`` can be shown; the frusta are one ``Line3DCollection`` per view instead of a line
artist per segment; the layout is fixed instead of ``constrained`` (which measures every label several times);
and the PNG is encoded at zlib level 1. What is drawn is cut down first (``preview_inputs``), so that
``reconstruct`` can have it drawn by another process (``preview_process``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.artist import Artist
from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.gridspec import GridSpec
from mpl_toolkits.mplot3d.art3d import Line3DCollection

from .preview_inputs import PreviewInputs

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


def render(path: Path, inputs: PreviewInputs) -> None:
    """Write the preview that ``inputs`` describe to ``path`` (PNG)."""
    notes = inputs.notes
    fig = Figure(figsize=(max(12.0, 2.2 * len(inputs.names)), 11.0), dpi=100)
    title = f"{inputs.points:,} confident points, {len(inputs.extrinsics)} cameras, {inputs.width} x {inputs.height} px"
    fig.suptitle("\n".join([*notes, title]), y=0.99, color="red" if notes else "black",
                 fontsize=15 if notes else 13, fontweight="bold" if notes else "normal")
    # Fixed places: the views take the top 60 % below the title, the strip the rest.
    top = 0.9 if notes else 0.92
    views = fig.add_gridspec(1, len(VIEWS), left=0.0, right=0.97, bottom=0.42, top=top, wspace=0.05)
    _point_cloud(fig, views, inputs)
    _strip(fig.add_axes((0.04, 0.005, 0.95, 0.39)), inputs.thumbnails, inputs.depths, inputs.names)
    # The notes go into the PNG's text chunks too, where a program (or a test) reads them without OCR.
    metadata = {"Title": "vggt-turbo reconstruct preview", **({"Warning": " / ".join(notes)} if notes else {})}
    FigureCanvasAgg(fig).print_png(str(path), metadata=metadata, pil_kwargs={"compress_level": 1})


def _point_cloud(fig: Figure, views: GridSpec, inputs: PreviewInputs) -> None:
    xyz, rgb, extrinsics, intrinsics = inputs.xyz, inputs.rgb, inputs.extrinsics, inputs.intrinsics
    valid = np.isfinite(extrinsics).all(axis=(1, 2)) & np.isfinite(intrinsics).all(axis=(1, 2))
    rotations, translations = extrinsics[valid, :, :3], extrinsics[valid, :, 3]
    centres = -np.einsum("sji,sj->si", rotations, translations)
    both = np.concatenate([xyz, centres]) if len(xyz) else centres
    # The view box: the middle 96 % of the points and every camera, so a few stray points do not shrink the scene
    # (a unit box around the origin when there is nothing to show: no confident point, no usable camera).
    if len(both):
        lo = np.minimum(np.percentile(both, 2, axis=0), centres.min(axis=0, initial=np.inf))
        hi = np.maximum(np.percentile(both, 98, axis=0), centres.max(axis=0, initial=-np.inf))
    else:
        lo, hi = -np.ones(3), np.ones(3)
    middle, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2, 1e-6)
    size = 0.12 * half
    segments = [frustum_lines(e, k, inputs.width, inputs.height, size)
                for e, k in zip(extrinsics[valid], intrinsics[valid])]
    lines = to_plot_axes(np.concatenate(segments)) if segments else np.empty((0, 2, 3))
    colours = np.repeat(_camera_colours(len(segments)), 8, axis=0)  # 8 segments per frustum
    box = to_plot_axes(np.stack([middle - half, middle + half]))
    plotted = to_plot_axes(xyz.astype(np.float64))
    for i, (label, elevation, azimuth) in enumerate(VIEWS):
        ax = fig.add_subplot(views[0, i], projection="3d")
        ax.add_artist(_Splat(plotted, rgb))
        if len(lines):  # frames whose cameras are not finite have no frustum (matplotlib refuses an empty set)
            ax.add_collection3d(Line3DCollection(lines, colors=colours, linewidths=1.2))
        for axis, (a, b) in zip((ax.set_xlim, ax.set_ylim, ax.set_zlim), box.T):
            axis(min(a, b), max(a, b))
        ax.set_box_aspect((1, 1, 1))
        ax.view_init(elev=elevation, azim=azimuth)
        ax.set_xlabel("x")
        ax.set_ylabel("z (forward)")
        ax.set_zlabel("-y (up)")
        ax.tick_params(labelsize=7)
        ax.locator_params(nbins=4)
        ax.set_title(label, fontsize=11)


class _Splat(Artist):
    """Points of a 3-D axes drawn as one image: each point one pixel in its colour, the nearest on top.

    Why not ``scatter``: see the module's docstring. The projection is the axes' own (``M``, set by
    ``Axes3D.draw`` before it draws its children), so the points line up with the box, the ticks and the frusta.
    """

    def __init__(self, xyz: np.ndarray, rgb: np.ndarray) -> None:
        super().__init__()
        self._xyzw = np.concatenate([xyz, np.ones((len(xyz), 1))], axis=1)  # (N, 4) homogeneous, plot axes
        self._rgba = np.concatenate([rgb, np.full((len(rgb), 1), 255, np.uint8)], axis=1)

    def draw(self, renderer: RendererBase) -> None:
        ax = self.axes
        projected = self._xyzw @ ax.M.T
        projected = projected[:, :3] / projected[:, 3:]
        pixels = np.floor(ax.transData.transform(projected[:, :2])).astype(np.int64)
        x0, y0 = int(np.floor(ax.bbox.x0)), int(np.floor(ax.bbox.y0))
        w, h = int(np.ceil(ax.bbox.x1)) - x0, int(np.ceil(ax.bbox.y1)) - y0
        col, row = pixels[:, 0] - x0, pixels[:, 1] - y0  # Agg draws the first row at the bottom, at y0
        inside = np.flatnonzero((col >= 0) & (col < w) & (row >= 0) & (row < h))
        flat = row[inside] * w + col[inside]
        near_first = np.argsort(projected[inside, 2])  # mplot3d's depth: smaller is nearer
        taken, first = np.unique(flat[near_first], return_index=True)
        image = np.zeros((h * w, 4), np.uint8)  # transparent where no point falls
        image[taken] = self._rgba[inside[near_first[first]]]
        gc = renderer.new_gc()
        gc.set_clip_rectangle(ax.bbox)
        renderer.draw_image(gc, x0, y0, image.reshape(h, w, 4))
        gc.restore()


def _camera_colours(count: int) -> np.ndarray:
    """(count, 4) RGBA: the first camera red (the world frame is its frame), the others from blue to green in
    input order."""
    ramp = colormaps["winter"]
    colours = [(0.85, 0.1, 0.1, 1.0)] + [ramp(i / max(count - 2, 1)) for i in range(count - 1)]
    return np.array(colours[:count]).reshape(-1, 4)


def _strip(ax: Axes, frames: np.ndarray, depth: np.ndarray, names: Sequence[str]) -> None:
    """The thumbnails ``frames`` above their ``depth`` maps, as one mosaic in one axes (twelve axes cost more to
    lay out and draw than the whole mosaic), each tile titled with its name."""
    height, width = frames.shape[1:3]
    gap, title_room = max(width // 20, 1), max(height // 6, 1)
    step_x, step_y = width + gap, height + title_room
    mosaic = np.full((2 * step_y, len(names) * step_x - gap, 3), 255, np.uint8)  # white between the tiles
    for i in range(len(names)):
        x, top, bottom = i * step_x, title_room, title_room + step_y
        mosaic[top:top + height, x:x + width] = frames[i]
        lo, hi, coloured = _depth_colours(depth[i])
        mosaic[bottom:bottom + height, x:x + width] = coloured
        centre = x + width / 2
        ax.text(centre, top - title_room / 4, _short(names[i]), fontsize=9, ha="center", va="bottom")
        ax.text(centre, bottom - title_room / 4, f"depth {lo:.3g} - {hi:.3g}", fontsize=8, ha="center", va="bottom")
    ax.imshow(mosaic)
    ax.text(-gap / 2, title_room + height / 2, "frame", fontsize=10, rotation=90, ha="right", va="center")
    ax.text(-gap / 2, title_room + step_y + height / 2, "depth (near blue, far red)", fontsize=10, rotation=90,
            ha="right", va="center")
    ax.set_axis_off()


def _depth_colours(d: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(lo, hi, (H, W, 3) uint8): ``d`` in the turbo colour map from its 2nd to its 98th percentile, non-finite
    values white."""
    finite = np.isfinite(d)
    lo, hi = (float(v) for v in np.percentile(d[finite], [2, 98])) if finite.any() else (0.0, 1.0)
    scaled = np.clip((np.where(finite, d, lo) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    coloured = colormaps["turbo"](scaled, bytes=True)[..., :3]
    coloured[~finite] = 255
    return lo, hi, coloured


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else f"{name[: limit - 9]}...{name[-6:]}"
