"""``vggt-turbo view OUT``: look at a reconstruct folder in the browser, in 3-D.

It serves viser (the viewer upstream's own demo uses; ``pip install 'vggt-turbo[view]'``) on the loopback
address only, so nothing is exposed to the network; reach it from another machine through an SSH tunnel.
The page shows the point head's world points (as in points.ply) coloured by their pixels or by frame, a slider
for the confidence percentile they must reach, and each camera's frustum with its image.

Why a subcommand and not only preview.png: a still picture cannot show whether the geometry holds together
from every side; a 3-D view the user turns can.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .errors import UserError
from .export import quaternions_from_rotations
from .report import RANDOM_WEIGHTS_NOTE

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
MAX_POINTS = 2_000_000  # what a browser draws smoothly; larger clouds are subsampled evenly
REQUIRED = ("extrinsics", "intrinsics", "world_points", "world_points_conf", "image_names")
COLOURINGS = ("pixel colour", "frame")


@dataclass
class Scene:
    """What the viewer shows, read from a reconstruct folder."""

    points: np.ndarray  # (N, 3) float32, finite
    conf: np.ndarray  # (N,) their confidence
    colours: np.ndarray  # (N, 3) uint8, the pixels they came from
    frame_of_point: np.ndarray  # (N,) int
    extrinsics: np.ndarray  # (S, 3, 4) OpenCV camera-from-world
    intrinsics: np.ndarray  # (S, 3, 3)
    images: np.ndarray  # (S, H, W, 3) uint8
    names: list[str]
    random_weights: bool


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "view", help="look at a reconstruct output folder in 3-D in the browser (needs vggt-turbo[view])",
        description=__doc__.split("\n\n")[1],
    )
    p.add_argument("folder", type=Path, help="a folder written by vggt-turbo reconstruct --out")
    p.add_argument("--port", type=int, default=8080, help=f"port on {HOST} (default: 8080)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Serve until Ctrl-C: 0; 2 with one line for a folder that is not a reconstruct output or no viser."""
    try:
        scene = load(args.folder)
        server = serve(scene, args.port)
    except UserError as exc:
        print(f"vggt-turbo view: error: {exc}", file=sys.stderr)
        return 2
    print(f"vggt-turbo view: {args.folder} at http://{HOST}:{server.get_port()} (Ctrl-C to stop)", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def load(folder: Path) -> Scene:
    """Read ``folder``'s predictions.npz and images/; a UserError names what makes it not a reconstruct output."""
    npz = folder / "predictions.npz"
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder (give the --out folder of vggt-turbo reconstruct)")
    if not npz.is_file():
        raise UserError(f"{folder} is not a vggt-turbo reconstruct output: it has no predictions.npz")
    try:
        with np.load(npz) as data:
            missing = [k for k in REQUIRED if k not in data.files]
            if missing:
                raise UserError(f"{npz} is not from vggt-turbo reconstruct: it lacks {', '.join(missing)}")
            arrays = {k: data[k] for k in (*REQUIRED, "random_weights") if k in data.files}
    except (OSError, ValueError) as exc:
        raise UserError(f"{npz} cannot be read as an npz file ({exc})") from exc
    world, conf = arrays["world_points"], arrays["world_points_conf"]
    names = [str(n) for n in arrays["image_names"]]
    count, height, width = conf.shape
    images = np.stack([_image(folder / "images" / name, width, height) for name in names])

    keep = np.isfinite(world).all(axis=-1) & np.isfinite(conf)
    frame_of_point = np.broadcast_to(np.arange(count)[:, None, None], conf.shape)[keep]
    points, conf_kept, colours = world[keep].astype(np.float32), conf[keep], images[keep]
    if len(points) > MAX_POINTS:
        pick = np.linspace(0, len(points) - 1, MAX_POINTS).astype(np.int64)
        log.info("showing %d of %d points (evenly subsampled)", MAX_POINTS, len(points))
        points, conf_kept, colours, frame_of_point = points[pick], conf_kept[pick], colours[pick], frame_of_point[pick]
    return Scene(points=points, conf=conf_kept, colours=colours, frame_of_point=frame_of_point,
                 extrinsics=arrays["extrinsics"].astype(np.float64), intrinsics=arrays["intrinsics"].astype(np.float64),
                 images=images, names=names, random_weights=bool(arrays.get("random_weights", False)))


def _image(path: Path, width: int, height: int) -> np.ndarray:
    if not path.is_file():
        raise UserError(f"{path.parent.parent} is not a complete reconstruct output: {path} is missing")
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    if rgb.shape[:2] != (height, width):
        raise UserError(f"{path} is {rgb.shape[1]}x{rgb.shape[0]}, not the {width}x{height} of predictions.npz")
    return rgb


def serve(scene: Scene, port: int) -> Any:
    """Start viser on the loopback address with ``scene`` and its controls; returns the running server."""
    try:
        import viser
    except ImportError as exc:
        raise UserError("the viewer needs viser: pip install 'vggt-turbo[view]' (or pip install viser)") from exc
    try:
        server = viser.ViserServer(host=HOST, port=port, verbose=False)
    except OSError as exc:
        raise UserError(f"cannot serve on {HOST}:{port} ({exc.strerror or exc}); choose another --port") from exc
    server.scene.set_up_direction("-y")  # VGGT's world is the first camera's OpenCV frame: y points down
    if scene.random_weights:
        server.gui.add_markdown(f"**{RANDOM_WEIGHTS_NOTE}**")
    percentile = server.gui.add_slider("confidence percentile", min=0, max=99, step=1, initial_value=50)
    colouring = server.gui.add_dropdown("colour by", COLOURINGS, initial_value=COLOURINGS[0])
    # Point size in thousandths of the scene's extent: the scene's own units depend on the weights and the input.
    unit = _extent(scene) / 1000
    size = server.gui.add_slider("point size", min=0.5, max=20.0, step=0.5, initial_value=2.0)
    show_cameras = server.gui.add_checkbox("cameras", initial_value=True)
    frame_colours = _frame_colours(len(scene.names))

    def selection() -> tuple[np.ndarray, np.ndarray]:
        keep = scene.conf >= np.percentile(scene.conf, percentile.value) if len(scene.conf) else scene.conf > 0
        colours = scene.colours if colouring.value == COLOURINGS[0] else frame_colours[scene.frame_of_point]
        return scene.points[keep], colours[keep]

    points, colours = selection()
    cloud = server.scene.add_point_cloud("/points", points, colours, point_size=size.value * unit,
                                      point_shape="circle")

    @percentile.on_update
    @colouring.on_update
    def _(_: Any) -> None:
        cloud.points, cloud.colors = selection()

    @size.on_update
    def _(_: Any) -> None:
        cloud.point_size = size.value * unit

    frusta = _add_cameras(server, scene, frame_colours)

    @show_cameras.on_update
    def _(_: Any) -> None:
        for frustum in frusta:
            frustum.visible = show_cameras.value

    _aim(server, scene)
    return server


def _add_cameras(server: Any, scene: Scene, colours: np.ndarray) -> list[Any]:
    """One frustum per camera, with its image, posed by its camera-to-world transform (viser's frusta use
    OpenCV camera axes, as VGGT does)."""
    height, width = scene.images.shape[1:3]
    rotations = scene.extrinsics[:, :, :3].transpose(0, 2, 1)  # camera-to-world: R^T
    centres = -np.einsum("sij,sj->si", rotations, scene.extrinsics[:, :, 3])
    wxyz = quaternions_from_rotations(rotations)
    scale = 0.05 * _extent(scene)
    frusta = []
    for i, name in enumerate(scene.names):
        if not (np.isfinite(wxyz[i]).all() and np.isfinite(centres[i]).all() and scene.intrinsics[i, 1, 1] > 0):
            continue  # a degenerate camera has no frustum to draw
        fov = 2 * np.arctan2(height / 2, scene.intrinsics[i, 1, 1])
        frusta.append(server.scene.add_camera_frustum(
            f"/cameras/{i:04d} {name}", fov=float(fov), aspect=width / height, scale=scale, wxyz=wxyz[i],
            position=centres[i], image=scene.images[i], color=tuple(int(c) for c in colours[i]),
        ))
    return frusta


def _aim(server: Any, scene: Scene) -> None:
    """Start the browser's camera looking at the middle of the points the way the first camera looks, from a
    little above and far enough back to see them all."""
    target = np.median(scene.points, axis=0) if len(scene.points) else np.zeros(3)
    rotation = scene.extrinsics[0, :, :3]
    back, up = -rotation[2], -rotation[1]  # the first camera's -z (behind it) and -y (its up) in the world
    server.initial_camera.position = target + _extent(scene) * (0.9 * back + 0.35 * up)
    server.initial_camera.look_at = target
    server.initial_camera.up = up


def _extent(scene: Scene) -> float:
    """The size of the scene (the spread of its middle 90 % of points), for frustum and point sizes."""
    if not len(scene.points):
        return 1.0
    lo, hi = np.percentile(scene.points, [5, 95], axis=0)
    return max(float(np.linalg.norm(hi - lo)), 1e-6)


def _frame_colours(count: int) -> np.ndarray:
    """(count, 3) uint8: distinct, saturated hues, one per frame."""
    hue = np.arange(count) / max(count, 1)
    channels = np.clip(np.abs(((hue[:, None] * 6 + np.array([0, 4, 2])) % 6) - 3) - 1, 0, 1)
    return (channels * 255).astype(np.uint8)
