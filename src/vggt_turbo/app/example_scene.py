"""The example input of ``vggt-turbo reconstruct --example``: a small room the package renders itself.

Why rendered and not bundled: the command must run from a fresh clone, in any folder, offline; upstream's
example photos are under upstream's own license and kept out of this package. A ray-cast room with textured
walls and a few objects, seen by cameras on an arc, is the smallest input that still looks like a scene to
VGGT (parallax, occlusion, texture for matching), and it costs no file at all.

Plain numpy: ``render`` returns the images, ``write`` saves them as PNGs. The same arguments give the same
pixels on every machine (no randomness but a seeded generator, no GPU).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

NAME = "example-room"  # the rendered folder, as the summary and report.json name the input
VIEWS = 4
WIDTH, HEIGHT = 512, 384  # 4:3 like a phone photo; upstream's loader makes it 518 x 392
ROOM = np.array([[-3.0, -1.5, -3.0], [3.0, 1.5, 3.0]])  # axis-aligned box: min corner, max corner (y down)
SPHERES = [((-1.0, 0.8, 0.8), 0.7, (0.85, 0.35, 0.2)), ((1.2, 1.0, -0.4), 0.5, (0.2, 0.5, 0.85))]
LIGHT = np.array([0.5, -1.2, 0.0])


def render(views: int = VIEWS, width: int = WIDTH, height: int = HEIGHT) -> list[np.ndarray]:
    """``views`` RGB uint8 images (height, width, 3) of the room, from cameras on a 50-degree arc."""
    texture = _textures(np.random.default_rng(0))
    images = []
    for angle in np.radians(np.linspace(-25.0, 25.0, views)):
        eye = np.array([2.2 * np.sin(angle), -0.2, -2.2 * np.cos(angle) + 0.2])
        images.append(_render_view(eye, np.array([0.0, 0.4, 0.8]), width, height, texture))
    return images


def write(folder: Path, views: int = VIEWS) -> Path:
    """Save ``render(views)`` as ``folder/view_1.png``...; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, rgb in enumerate(render(views), start=1):
        Image.fromarray(rgb).save(folder / f"view_{i}.png")
    return folder


def _textures(rng: np.random.Generator) -> np.ndarray:
    """(6, 64, 64, 3) one texture per wall: a tinted checkerboard with coarse noise (features to match)."""
    tints = np.array([[0.9, 0.85, 0.7], [0.7, 0.8, 0.9], [0.9, 0.75, 0.75],
                      [0.75, 0.9, 0.75], [0.8, 0.8, 0.8], [0.6, 0.55, 0.5]])
    yy, xx = np.mgrid[0:64, 0:64]
    checker = (((yy // 8) + (xx // 8)) % 2)[..., None] * 0.35 + 0.5
    blotches = np.kron(rng.uniform(0.7, 1.1, size=(6, 8, 8)), np.ones((8, 8)))[..., None]
    return np.clip(checker[None] * blotches * tints[:, None, None, :], 0.0, 1.0)


def _render_view(eye: np.ndarray, target: np.ndarray, width: int, height: int, texture: np.ndarray) -> np.ndarray:
    forward = (target - eye) / np.linalg.norm(target - eye)
    right = np.cross(np.array([0.0, 1.0, 0.0]), forward)  # y points down (OpenCV camera axes)
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    focal = 0.8 * width
    u, v = np.meshgrid(np.arange(width) + 0.5 - width / 2, np.arange(height) + 0.5 - height / 2)
    rays = forward + (u[..., None] * right + v[..., None] * down) / focal
    rays /= np.linalg.norm(rays, axis=-1, keepdims=True)

    # The room from inside: each ray leaves through the nearest of the six walls.
    with np.errstate(divide="ignore", invalid="ignore"):
        exits = np.where(rays > 0, (ROOM[1] - eye) / rays, (ROOM[0] - eye) / rays)
    axis = np.argmin(exits, axis=-1)
    depth = np.take_along_axis(exits, axis[..., None], -1)[..., 0]
    hit = eye + rays * depth[..., None]
    wall = axis * 2 + (np.take_along_axis(rays, axis[..., None], -1)[..., 0] > 0)
    normal = np.zeros_like(hit)
    np.put_along_axis(normal, axis[..., None], np.where(wall % 2 == 1, -1.0, 1.0)[..., None], -1)
    coords = [np.take_along_axis(hit, ((axis + k) % 3)[..., None], -1)[..., 0] for k in (1, 2)]
    uv = ((np.stack(coords, -1) * 16).astype(int)) % 64
    colour = texture[wall, uv[..., 0], uv[..., 1]]

    for centre, radius, albedo in SPHERES:
        c = np.array(centre)
        b = np.einsum("hwk,k->hw", rays, eye - c)
        disc = b * b - (np.sum((eye - c) ** 2) - radius * radius)
        t = -b - np.sqrt(np.maximum(disc, 0.0))
        near = (disc > 0) & (t > 0) & (t < depth)
        depth = np.where(near, t, depth)
        point = eye + rays * t[..., None]
        normal = np.where(near[..., None], (point - c) / radius, normal)
        stripes = 0.75 + 0.25 * np.sign(np.sin(12 * point[..., 1:2]) * np.sin(12 * point[..., 0:1]))
        colour = np.where(near[..., None], np.array(albedo) * stripes, colour)
        hit = np.where(near[..., None], point, hit)

    to_light = LIGHT - hit
    to_light /= np.linalg.norm(to_light, axis=-1, keepdims=True)
    shade = 0.35 + 0.65 * np.clip(np.sum(normal * to_light, axis=-1, keepdims=True), 0.0, 1.0)
    return (np.clip(colour * shade, 0.0, 1.0) * 255).round().astype(np.uint8)
