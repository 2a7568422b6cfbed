"""``preview.png``: a picture of a reconstruction, so that a user sees whether it is any good without opening
another program.

Top: the coloured point cloud (a random subsample of the confident points, the ones in points.ply) with the
camera frusta, from two viewpoints, inside the box that holds the scene. Bottom: a strip of evenly spaced input
frames above their depth maps. A run with random weights says so in red across the top, like every other output.

Drawn with numpy and Pillow alone, no plotting library, because every run writes it and it sits on the export's
critical path: matplotlib's import, 3-D axes, ticks and text layout were most of its cost (benchmarks/RESULTS.md,
"a preview without matplotlib"). Here the views are orthographic projections computed
directly: each point is one pixel in its colour, the nearest point wins a pixel (``splat``); the box's edges and
the frusta are Pillow lines; the strip is one mosaic resized once. What is drawn is cut down first
(``preview_inputs``), so that ``reconstruct`` can have it drawn by another process (``preview_process``).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from .preview_inputs import PreviewInputs

# (title, elevation, azimuth) in degrees, as a viewer on a sphere around the scene: azimuth -90 looks along the
# plot's forward axis (the first camera's), elevation 90 straight down.
VIEWS = (("front (as the first camera looks)", 10.0, -90.0), ("from above", 65.0, -55.0))
WIDTH, HEIGHT = 1200, 1100  # px; the strip widens the picture for many frames (TILE_WIDTH each)
TILE_WIDTH = 220
TITLE_ROOM, VIEWS_BOTTOM = 100, 650  # px from the top: the title lines, then the views down to VIEWS_BOTTOM
NEAR_TO_FAR = np.array([  # the depth maps' colours, near to far: dark blue, blue, green, orange, dark red
    [0.19, 0.07, 0.23], [0.10, 0.50, 0.95], [0.20, 0.90, 0.50], [0.98, 0.70, 0.10], [0.60, 0.05, 0.02]
])
FIRST_CAMERA = (217, 26, 26)  # red: the world frame is its frame; the others run from blue to green in input order
AXIS_NAMES = ("x", "z (forward)", "-y (up)")


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


def view_axes(elevation: float, azimuth: float) -> np.ndarray:
    """(3, 3) rows: the screen's right, the screen's up and the direction towards the viewer, in plot axes."""
    e, a = np.radians(elevation), np.radians(azimuth)
    toward = np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])
    right = np.array([-np.sin(a), np.cos(a), 0.0])
    return np.stack([right, np.cross(toward, right), toward])


def splat(uv: np.ndarray, nearness: np.ndarray, rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """(height, width, 4) uint8: each point one pixel in its colour (alpha 255), the nearest on top, transparent
    where none falls. ``uv``: (N, 2) pixel coordinates (x right, y down); ``nearness``: (N,) larger is nearer."""
    col, row = np.floor(uv[:, 0]).astype(np.int64), np.floor(uv[:, 1]).astype(np.int64)
    inside = np.flatnonzero((col >= 0) & (col < width) & (row >= 0) & (row < height))
    flat = row[inside] * width + col[inside]
    near_first = np.argsort(-nearness[inside], kind="stable")
    taken, first = np.unique(flat[near_first], return_index=True)
    image = np.zeros((height * width, 4), np.uint8)
    image[taken, :3] = rgb[inside[near_first[first]]]
    image[taken, 3] = 255
    return image.reshape(height, width, 4)


def render(path: Path, inputs: PreviewInputs) -> None:
    """Write the preview that ``inputs`` describe to ``path`` (PNG)."""
    width = max(WIDTH, TILE_WIDTH * len(inputs.names))
    canvas = Image.new("RGB", (width, HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    notes = inputs.notes
    title = f"{inputs.points:,} confident points, {len(inputs.extrinsics)} cameras, {inputs.width} x {inputs.height} px"
    y = 12
    for line, colour, size in [*((n, (200, 0, 0), 22) for n in notes), (title, (0, 0, 0), 18)]:
        _centred(draw, line, width / 2, y, size, colour)
        y += size + 8
    _point_cloud(canvas, draw, inputs, width)
    _strip(canvas, draw, inputs, (int(0.04 * width), VIEWS_BOTTOM + 15, int(0.99 * width), HEIGHT - 6))
    # The notes go into the PNG's text chunks too, where a program (or a test) reads them without OCR.
    metadata = PngInfo()
    metadata.add_text("Title", "vggt-turbo reconstruct preview")
    if notes:
        metadata.add_text("Warning", " / ".join(notes))
    canvas.save(path, format="PNG", pnginfo=metadata, compress_level=1)


def _point_cloud(canvas: Image.Image, draw: ImageDraw.ImageDraw, inputs: PreviewInputs, width: int) -> None:
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
    segments = [frustum_lines(e, k, inputs.width, inputs.height, 0.12 * half)
                for e, k in zip(extrinsics[valid], intrinsics[valid])]
    # Everything in box units: the cube [-1, 1]^3 around the scene's middle, in plot axes.
    def unit(p: np.ndarray) -> np.ndarray:
        return (to_plot_axes(np.asarray(p, np.float64)) - to_plot_axes(middle)) / half

    points, lines = unit(xyz), unit(np.concatenate(segments)) if segments else np.empty((0, 2, 3))
    colours = np.repeat(_camera_colours(len(segments)), 8, axis=0)  # 8 segments per frustum
    corners = np.array([[(-1.0, 1.0)[i >> k & 1] for k in range(3)] for i in range(8)])
    edges = np.array([(corners[i], corners[i | 1 << k]) for i in range(8) for k in range(3) if not i >> k & 1])
    column = width // len(VIEWS)
    for i, (label, elevation, azimuth) in enumerate(VIEWS):
        axes = view_axes(elevation, azimuth)
        box = (i * column + 20, TITLE_ROOM + 30, (i + 1) * column - 20, VIEWS_BOTTOM)
        _centred(draw, label, (box[0] + box[2]) / 2, TITLE_ROOM, 16, (0, 0, 0))
        to_pixels = _fit(corners @ axes[:2].T, box)
        if len(points):
            projected = points @ axes.T
            uv = to_pixels(projected[:, :2]) - np.array(box[:2])
            layer = Image.fromarray(splat(uv, projected[:, 2], rgb, box[2] - box[0], box[3] - box[1]), "RGBA")
            canvas.paste(layer, box[:2], layer)  # its own alpha as the mask: only the points' pixels
        for segment in to_pixels(edges @ axes[:2].T):
            draw.line([tuple(p) for p in segment], fill=(160, 160, 160), width=1)
        for segment, colour in zip(to_pixels(lines @ axes[:2].T), colours):
            draw.line([tuple(p) for p in segment], fill=tuple(int(c) for c in colour), width=2)
        for k, name in enumerate(AXIS_NAMES):  # each axis named just past the far end of its edge from (-1, -1, -1)
            end = to_pixels((-1.0 + 2.24 * np.eye(3)[k]) @ axes[:2].T)
            _centred(draw, name, end[0], end[1] - 6, 12, (80, 80, 80))


def _fit(corners_2d: np.ndarray, box: tuple[int, int, int, int]) -> Callable[[np.ndarray], np.ndarray]:
    """The map from view coordinates (right, up) to canvas pixels that fits ``corners_2d`` (the projected view
    box) into ``box`` (left, top, right, bottom), centred, with a margin for the axis names."""
    lo, hi = corners_2d.min(axis=0), corners_2d.max(axis=0)
    scale = 0.86 * min((box[2] - box[0]) / (hi[0] - lo[0]), (box[3] - box[1]) / (hi[1] - lo[1]))
    centre_view, centre_box = (lo + hi) / 2, np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2])

    def to_pixels(uv: np.ndarray) -> np.ndarray:
        offset = (uv - centre_view) * scale
        return centre_box + offset * np.array([1.0, -1.0])  # screen up is the image's row 0

    return to_pixels


def _camera_colours(count: int) -> np.ndarray:
    """(count, 3) RGB 0-255: the first camera red, the others from blue to green in input order."""
    t = np.arange(count - 1, dtype=np.float64) / max(count - 2, 1)
    ramp = np.stack([np.zeros_like(t), t, 1.0 - 0.5 * t], axis=1) * 255
    return np.concatenate([np.array([FIRST_CAMERA], np.float64), ramp])[:count].reshape(-1, 3)


def _strip(canvas: Image.Image, draw: ImageDraw.ImageDraw, inputs: PreviewInputs,
           box: tuple[int, int, int, int]) -> None:
    """The thumbnails above their depth maps as one mosaic, resized once into ``box``, each tile titled with its
    name and its depth range."""
    frames, depth, names = inputs.thumbnails, inputs.depths, inputs.names
    height, width = frames.shape[1:3]
    gap, title_room = max(width // 20, 1), max(height // 6, 1)
    step_x, step_y = width + gap, height + title_room
    mosaic = np.full((2 * step_y, len(names) * step_x - gap, 3), 255, np.uint8)  # white between the tiles
    ranges = []
    for i in range(len(names)):
        x = i * step_x
        mosaic[title_room:title_room + height, x:x + width] = frames[i]
        lo, hi, coloured = _depth_colours(depth[i])
        mosaic[title_room + step_y:title_room + step_y + height, x:x + width] = coloured
        ranges.append((lo, hi))
    left, top, right, bottom = box
    scale = min((right - left - 30) / mosaic.shape[1], (bottom - top) / mosaic.shape[0])
    size = (max(1, round(mosaic.shape[1] * scale)), max(1, round(mosaic.shape[0] * scale)))
    x0 = left + 30 + (right - left - 30 - size[0]) // 2
    canvas.paste(Image.fromarray(mosaic).resize(size, Image.BILINEAR), (x0, top))
    for i, (name, (lo, hi)) in enumerate(zip(names, ranges)):
        centre = x0 + (i * step_x + width / 2) * scale
        _centred(draw, _short(name), centre, top + title_room * scale - 16, 12, (0, 0, 0))
        _centred(draw, f"depth {lo:.3g} - {hi:.3g}", centre, top + (title_room + step_y) * scale - 15, 11, (0, 0, 0))
    for row, label in enumerate(("frame", "depth (near blue, far red)")):
        _vertical(canvas, label, x0 - 8, top + (title_room + row * step_y + height / 2) * scale)


def _depth_colours(d: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(lo, hi, (H, W, 3) uint8): ``d`` coloured near to far (``NEAR_TO_FAR``) from its 2nd to its 98th
    percentile, non-finite values white."""
    finite = np.isfinite(d)
    lo, hi = (float(v) for v in np.percentile(d[finite], [2, 98])) if finite.any() else (0.0, 1.0)
    scaled = np.clip((np.where(finite, d, lo) - lo) / max(hi - lo, 1e-12), 0.0, 1.0)
    stops = np.linspace(0.0, 1.0, len(NEAR_TO_FAR))
    coloured = np.stack([np.interp(scaled, stops, NEAR_TO_FAR[:, c]) for c in range(3)], axis=-1)
    coloured = np.rint(coloured * 255).astype(np.uint8)
    coloured[~finite] = 255
    return lo, hi, coloured


@functools.lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own font at ``size`` px (FreeType, Pillow >= 10.1); its fixed bitmap font where that is missing."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size argument
        return ImageFont.load_default()


def _centred(draw: ImageDraw.ImageDraw, text: str, x: float, top: float, size: int, colour: tuple[int, ...]) -> None:
    font = _font(size)
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    draw.text((x - (right - left) / 2, top), text, fill=colour, font=font)


def _vertical(canvas: Image.Image, text: str, right: float, middle: float) -> None:
    """``text`` turned 90 degrees (reading upwards), its right edge at ``right``, centred on ``middle``."""
    font = _font(13)
    left, top, r, bottom = ImageDraw.Draw(canvas).textbbox((0, 0), text, font=font)
    label = Image.new("L", (r - left + 2, bottom + 2), 0)
    ImageDraw.Draw(label).text((-left + 1, 0), text, fill=255, font=font)
    turned = label.rotate(90, expand=True)
    canvas.paste((0, 0, 0), (int(right - turned.width), int(middle - turned.height / 2)), turned)


def _short(name: str, limit: int = 24) -> str:
    return name if len(name) <= limit else f"{name[: limit - 9]}...{name[-6:]}"
