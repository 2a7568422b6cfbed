"""COLMAP's binary model (``cameras.bin``, ``images.bin``, ``points3D.bin``) of an ``export.ColmapModel``.

Why binary beside the text model: it is what COLMAP itself writes into ``sparse/0/`` and what gsplat's and
nerfstudio's COLMAP loaders look for first; it is also several times smaller and faster to read. Same cameras,
poses and points as the text model, because both are written from the same ``ColmapModel``.

The layout (little-endian, no padding) is COLMAP's ``ReadCamerasBinary``/``ReadImagesBinary``/
``ReadPoints3DBinary``. The per-point and per-observation records have fixed sizes (every track here has one
element), so they are written as packed numpy records rather than one ``struct.pack`` call per value.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from .export import ColmapModel

PINHOLE = 1  # COLMAP's CameraModelId

_POINT2D = np.dtype([("x", "<f8"), ("y", "<f8"), ("point3d_id", "<i8")])
_POINT3D = np.dtype([
    ("id", "<u8"), ("xyz", "<f8", 3), ("rgb", "u1", 3), ("error", "<f8"), ("track_length", "<u8"),
    ("image_id", "<i4"), ("point2d_idx", "<i4"),
])


def write_colmap_binary(folder: Path, model: ColmapModel) -> None:
    """Write ``model`` into ``folder`` (created) as COLMAP's three binary files."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = (model.frames + 1).tolist()
    with open(folder / "cameras.bin", "wb") as f:
        f.write(struct.pack("<Q", len(ids)))
        for image_id, params in zip(ids, model.params.tolist()):
            f.write(struct.pack("<iiQQ4d", image_id, PINHOLE, model.width, model.height, *params))

    point_ids, points2d_all = np.arange(1, len(model.xyz) + 1), model.points2d
    quats = model.quaternions
    with open(folder / "images.bin", "wb") as f:
        f.write(struct.pack("<Q", len(ids)))
        for i, (image_id, name) in enumerate(zip(ids, model.names)):
            pose = (*quats[i].tolist(), *model.cam_from_world[i, :, 3].tolist())
            f.write(struct.pack("<i7di", image_id, *pose, image_id))
            f.write(name.encode("utf-8") + b"\0")
            seen = model.observations(i)
            points2d = np.empty(seen.stop - seen.start, dtype=_POINT2D)
            points2d["x"], points2d["y"] = points2d_all[seen, 0], points2d_all[seen, 1]
            points2d["point3d_id"] = point_ids[seen]
            f.write(struct.pack("<Q", len(points2d)))
            f.write(points2d.tobytes())

    points = np.zeros(len(model.xyz), dtype=_POINT3D)
    points["id"], points["xyz"], points["rgb"] = point_ids, model.xyz, model.rgb
    points["track_length"], points["image_id"], points["point2d_idx"] = 1, model.point_frames + 1, model.point2d_idx
    with open(folder / "points3D.bin", "wb") as f:
        f.write(struct.pack("<Q", len(points)))
        f.write(points.tobytes())
