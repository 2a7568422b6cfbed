"""nerfstudio's ``transforms.json`` (and the initial points it names) of an ``export.ColmapModel``.

What is written, and in which conventions:

- ``transform_matrix`` is each frame's camera-to-world matrix in nerfstudio's (OpenGL/Blender) camera axes:
  x right, y up, the camera looking down -z. VGGT's extrinsics are OpenCV camera-from-world (y down, looking
  down +z), so ``transform_matrix = inverse([R | t]) @ diag(1, -1, -1, 1)``.
- The world frame is VGGT's own (the first camera's OpenCV frame: its y axis points down), unchanged. nerfstudio's
  ``ns-process-data`` converter additionally swaps world axes and records that as ``applied_transform``; nothing
  is swapped here, so there is no ``applied_transform`` and the matrices map straight back to predictions.npz.
  nerfstudio's dataparser re-orients the scene itself (``orientation_method``, "up" by default).
- ``camera_model`` is PINHOLE (no distortion). ``fl_x, fl_y, cx, cy`` are top-level when every frame shares them,
  otherwise per frame (VGGT predicts a focal length per frame, so they usually differ); ``w, h`` are shared.
- ``file_path`` is ``images/NAME``, the preprocessed frames at the resolution the intrinsics describe.
- ``ply_file_path`` names ``sparse_pc.ply``: the COLMAP model's points (depth lifted through the predicted
  cameras, so they sit where the cameras see them), the file ``ns-process-data`` would write for a COLMAP model.

Frames with a degenerate camera are left out, as they are from the COLMAP model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .export import ColmapModel, write_json, write_ply

POINTS_FILE = "sparse_pc.ply"
OPENCV_TO_OPENGL = np.diag([1.0, -1.0, -1.0, 1.0])  # flips the camera's y and z axes


def camera_to_world_opengl(cam_from_world: np.ndarray) -> np.ndarray:
    """(N, 3, 4) OpenCV camera-from-world -> (N, 4, 4) OpenGL camera-to-world (nerfstudio's ``transform_matrix``)."""
    n = len(cam_from_world)
    w2c = np.tile(np.eye(4), (n, 1, 1))
    w2c[:, :3, :] = cam_from_world
    return np.linalg.inv(w2c) @ OPENCV_TO_OPENGL


def transforms(model: ColmapModel, notes: Sequence[str] = (), image_folder: str = "images") -> dict[str, Any]:
    """The transforms.json document for ``model`` (see the module's docstring for the conventions); ``notes``
    (the random-weights warning) go into a ``notes`` list, a key nerfstudio ignores."""
    intrinsics = {key: model.params[:, i] for i, key in enumerate(("fl_x", "fl_y", "cx", "cy"))}
    shared = {key: float(values[0]) for key, values in intrinsics.items() if len(values) and np.all(values == values[0])}
    doc: dict[str, Any] = {"camera_model": "PINHOLE", "w": model.width, "h": model.height, **shared}
    frames = []
    for i, (name, c2w) in enumerate(zip(model.names, camera_to_world_opengl(model.cam_from_world))):
        frame: dict[str, Any] = {"file_path": f"{image_folder}/{name}", "transform_matrix": c2w.tolist()}
        frame.update({key: float(values[i]) for key, values in intrinsics.items() if key not in shared})
        frames.append(frame)
    doc["frames"] = frames
    doc["ply_file_path"] = POINTS_FILE
    if notes:
        doc["notes"] = list(notes)
    return doc


def write_nerfstudio(folder: Path, model: ColmapModel, notes: Sequence[str] = ()) -> None:
    """transforms.json and the points it names (sparse_pc.ply) into ``folder``."""
    write_ply(folder / POINTS_FILE, model.xyz.astype(np.float32), model.rgb, comments=notes)
    write_json(folder / "transforms.json", transforms(model, notes))
