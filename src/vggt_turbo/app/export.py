"""Writers for what ``vggt-turbo reconstruct`` leaves on disk: predictions (npz), a coloured point cloud (PLY),
cameras (COLMAP text), the preprocessed images and the run report (JSON); and the staging that makes the output
folder appear whole or not at all.

Everything here is plain numpy, PIL and the standard library, so that the formats can be checked by independent
readers (``plyfile``, ``pycolmap``) in the tests.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from .errors import UserError
from .percentile import at_least

log = logging.getLogger(__name__)

# COLMAP's points3D.txt is text: a few million lines would take minutes to write and to read. Upstream's
# demo_colmap.py samples 100,000 points for the same reason; the full cloud is in points.ply.
MAX_COLMAP_POINTS = 100_000


def check_writable(out: Path) -> None:
    """Raise ``UserError`` now if ``out`` could not be created or replaced, not after minutes of inference.

    The check is the real operation: a folder made (and removed) in the nearest existing ancestor of ``out``,
    which is where ``staged_directory`` will work. Permission bits alone would not do (root, ACLs, read-only
    mounts).
    """
    out = out.absolute()
    ancestor = out.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"--out {out}: {ancestor} is a file, so no folder can be made under it")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.check-", dir=ancestor))
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write in {ancestor} ({exc.strerror or exc})") from exc


@contextlib.contextmanager
def staged_directory(out: Path, force: bool) -> Iterator[Path]:
    """Yield an empty sibling of ``out`` to write into; on success it replaces ``out``, on failure it vanishes.

    Why: a reconstruction interrupted halfway (an exception, Ctrl-C) must not leave files that look like a
    result. The sibling is on the same file system, so the final renames are atomic; an existing ``out`` (only
    with ``force``) is moved aside first and deleted only once the new one is in place. If a rename fails, the
    previous output is put back (or, when even that fails, the message says where it is) and the staging folder
    is removed: the user never finds only hidden folders. Failures to write raise ``UserError``.
    """
    out = out.absolute()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as exc:
        raise UserError(f"--out {out}: cannot write in {out.parent} ({exc.strerror or exc})") from exc
    os.chmod(stage, 0o777 & ~_umask())  # mkdtemp makes it private (0700); the result gets a new folder's mode
    try:
        yield stage
    except OSError as exc:  # disk full, quota, a file system gone read-only: the user's to fix, not a bug
        shutil.rmtree(stage, ignore_errors=True)
        kept = "previous output kept" if out.exists() else "nothing written"
        raise UserError(f"could not write the output in {out.parent} ({exc.strerror or exc}); {kept}") from exc
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    _replace(stage, out, force)


def _replace(stage: Path, out: Path, force: bool) -> None:
    """Rename ``stage`` to ``out``, moving an existing ``out`` aside first; undo on failure (see above)."""
    old: Optional[Path] = None
    try:
        if out.exists():
            if any(out.iterdir()) and not force:
                raise UserError(f"{out} appeared while reconstructing; nothing was overwritten")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
        os.replace(stage, out)
    except (OSError, UserError) as exc:
        shutil.rmtree(stage, ignore_errors=True)
        where = ""
        if old is not None:
            try:
                if (old / out.name).exists():
                    os.replace(old / out.name, out)
                old.rmdir()
            except OSError:
                where = f"; the previous output is in {old / out.name}"
        if isinstance(exc, UserError):
            raise
        kept = "previous output kept" if out.exists() and not where else "nothing written"
        raise UserError(f"could not move the new output into place at {out} ({exc.strerror or exc}); "
                        f"{kept}{where}") from exc
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def images_to_uint8(images: np.ndarray) -> np.ndarray:
    """(S, 3, H, W) floats in [0, 1] -> (S, H, W, 3) uint8, the colours of the points and the saved images.

    C-contiguous, in one scratch array: the points' colours are gathered from it and every frame is encoded
    from it, both of which are much slower from a transposed view.
    """
    scaled = np.multiply(images.transpose(0, 2, 3, 1), 255.0, order="C")
    np.clip(scaled, 0.0, 255.0, out=scaled)
    return np.rint(scaled, out=scaled).astype(np.uint8)


def confident_points(
    world_points: np.ndarray, conf: np.ndarray, colors: np.ndarray, threshold: float
) -> tuple[np.ndarray, np.ndarray]:
    """The points whose confidence is at least ``threshold`` (the ``--conf-percentile``-th percentile of ``conf``,
    ``app.percentile``), with their colours: (xyz float32 (N, 3), rgb uint8 (N, 3)).

    Non-finite points are dropped as well: a PLY viewer would choke on them and they carry no geometry. Gathered
    by flat index (``np.take``) rather than with a boolean mask over (S, H, W), and checked for finiteness a
    coordinate at a time rather than with ``all(axis=-1)`` over an axis of 3: the same points, each several times
    faster in numpy.
    """
    keep = np.flatnonzero((conf >= at_least(threshold, conf.dtype)) & _finite(world_points))
    xyz = np.take(world_points.reshape(-1, 3), keep, axis=0).astype(np.float32, copy=False)
    return xyz, np.take(colors.reshape(-1, 3), keep, axis=0)


def _finite(xyz: np.ndarray) -> np.ndarray:
    """(..., 3) -> (...) bool: all three coordinates finite."""
    return np.isfinite(xyz[..., 0]) & np.isfinite(xyz[..., 1]) & np.isfinite(xyz[..., 2])


def write_ply(path: Path, xyz: np.ndarray, rgb: np.ndarray, comments: Sequence[str] = ()) -> None:
    """Binary little-endian PLY with float x, y, z and uchar red, green, blue per vertex."""
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vertex = np.empty(len(xyz), dtype=fields)
    for i, axis in enumerate("xyz"):
        vertex[axis] = xyz[:, i]
    for i, channel in enumerate(("red", "green", "blue")):
        vertex[channel] = rgb[:, i]
    header = ["ply", "format binary_little_endian 1.0", *(f"comment {c}" for c in comments)]
    header += [f"element vertex {len(vertex)}"]
    header += [f"property float {a}" for a in "xyz"] + [f"property uchar {c}" for c in ("red", "green", "blue")]
    header += ["end_header"]
    with open(path, "wb") as f:
        f.write(("\n".join(header) + "\n").encode("ascii"))
        vertex.tofile(f)


def quaternions_from_rotations(rotations: np.ndarray) -> np.ndarray:
    """(S, 3, 3) rotation matrices -> (S, 4) unit quaternions (qw, qx, qy, qz) with qw >= 0, COLMAP's order.

    Bar-Itzhack's method (the eigenvector of the largest eigenvalue of a symmetric 4x4 matrix built from R): it
    returns the nearest rotation's quaternion even when R is not exactly orthonormal, as predicted and
    float-rounded matrices are not, and it has no branch that loses precision near 180 degrees.
    """
    r = rotations.astype(np.float64)
    xx, xy, xz = r[:, 0, 0], r[:, 0, 1], r[:, 0, 2]
    yx, yy, yz = r[:, 1, 0], r[:, 1, 1], r[:, 1, 2]
    zx, zy, zz = r[:, 2, 0], r[:, 2, 1], r[:, 2, 2]
    k = np.stack(
        [
            np.stack([xx - yy - zz, yx + xy, zx + xz, zy - yz], -1),
            np.stack([yx + xy, yy - xx - zz, zy + yz, xz - zx], -1),
            np.stack([zx + xz, zy + yz, zz - xx - yy, yx - xy], -1),
            np.stack([zy - yz, xz - zx, yx - xy, xx + yy + zz], -1),
        ],
        -2,
    ) / 3.0
    _, vectors = np.linalg.eigh(k)
    xyzw = vectors[..., -1]  # eigenvalues ascend: the last column belongs to the largest
    wxyz = np.concatenate([xyzw[:, 3:], xyzw[:, :3]], axis=1)
    wxyz *= np.where(wxyz[:, :1] < 0, -1.0, 1.0)
    return wxyz / np.linalg.norm(wxyz, axis=1, keepdims=True)


@dataclass(frozen=True)
class ColmapModel:
    """The cameras and points that every COLMAP-shaped export writes: the text model, the binary model and
    nerfstudio's transforms.json all read these arrays, so they describe exactly the same scene.

    Only the frames with a representable camera are here (``frames``); image and camera ids are a frame's
    position in the input + 1, as in predictions.npz's order. The points are sorted by the image they were seen
    in, so image ``i``'s observations are one contiguous run of points and a point's ``point2d_idx`` is its place
    in that run.
    """

    frames: np.ndarray  # (F,) int: positions of the kept frames in the input
    names: list[str]  # (F,) their image names
    width: int
    height: int
    cam_from_world: np.ndarray  # (F, 3, 4) float64, OpenCV axes (COLMAP's own convention)
    intrinsics: np.ndarray  # (F, 3, 3) float64 at width x height
    xyz: np.ndarray  # (P, 3) float64 world coordinates
    rgb: np.ndarray  # (P, 3) uint8
    point_frames: np.ndarray  # (P,) int: the frame each point was seen in (its image id - 1)
    pixels: np.ndarray  # (P, 2) int: the pixel (x, y) it was seen at; its track is that pixel's centre
    point2d_idx: np.ndarray  # (P,) int: its index among that image's 2-D points
    skipped: list[str] = field(default_factory=list)  # frames left out: degenerate cameras

    @property
    def params(self) -> np.ndarray:
        """(F, 4) PINHOLE parameters fx, fy, cx, cy."""
        k = self.intrinsics
        return np.stack([k[:, 0, 0], k[:, 1, 1], k[:, 0, 2], k[:, 1, 2]], axis=1)

    @property
    def points2d(self) -> np.ndarray:
        """(P, 2) float64: each point's track in COLMAP pixel coordinates, where a pixel's centre is at +0.5."""
        return self.pixels + 0.5

    @property
    def quaternions(self) -> np.ndarray:
        """(F, 4) the rotations of ``cam_from_world`` as COLMAP's (qw, qx, qy, qz)."""
        return quaternions_from_rotations(self.cam_from_world[:, :, :3])

    def observations(self, position: int) -> slice:
        """The points (as a slice of ``xyz``) seen in the ``position``-th kept frame, in point2D order."""
        frame = self.frames[position]
        lo, hi = (int(np.searchsorted(self.point_frames, frame, side=side)) for side in ("left", "right"))
        return slice(lo, hi)


def colmap_model(
    extrinsics: np.ndarray,
    intrinsics: np.ndarray,
    depth: np.ndarray,
    depth_conf: np.ndarray,
    colors: np.ndarray,
    names: Sequence[str],
    width: int,
    height: int,
    threshold: float,
) -> ColmapModel:
    """One PINHOLE camera per frame, its pose, and up to ``MAX_COLMAP_POINTS`` points with one-view tracks.

    VGGT's extrinsics are camera-from-world in OpenCV axes (x right, y down, z forward), exactly the
    world-to-camera pose COLMAP stores, so they are kept as they are. The intrinsics are at the processed
    resolution (``width`` x ``height``), the resolution of the images written beside ``sparse/``.

    The points are the depth map's pixels whose depth confidence is at least ``threshold`` (its
    ``--conf-percentile``-th percentile, ``app.percentile``), lifted through their frame's predicted camera, not
    the point head's ``world_points`` (points.ply): COLMAP readers treat a point's track as an observation, and
    only depth-lifted points reproject onto the pixel they came from (the two heads disagree, by a lot with
    random weights). Each point's track is that pixel, at its centre (COLMAP puts pixel centres at +0.5; VGGT's
    principal point at W/2, H/2 is in the same convention).

    A frame whose camera is degenerate (non-finite values, focal length <= 0) cannot be represented, and COLMAP
    refuses the whole model if it is there: such frames and their points are left out (they stay in the npz)
    and named in ``skipped``.
    """
    valid = (
        np.isfinite(extrinsics).all(axis=(1, 2))
        & np.isfinite(intrinsics).all(axis=(1, 2))
        & (intrinsics[:, 0, 0] > 0)
        & (intrinsics[:, 1, 1] > 0)
    )
    skipped = [name for name, ok in zip(names, valid) if not ok]
    if skipped:
        log.warning("left out of the COLMAP model, their predicted cameras are degenerate: %s", ", ".join(skipped))
    z = depth[..., 0]
    keep = (depth_conf >= at_least(threshold, depth_conf.dtype)) & np.isfinite(z) & (z > 0) & valid[:, None, None]
    index = np.flatnonzero(keep)  # row-major: sorted by frame, as ColmapModel needs
    if len(index) > MAX_COLMAP_POINTS:
        index = index[np.sort(np.random.default_rng(0).choice(len(index), MAX_COLMAP_POINTS, replace=False))]
    frame, y, x = np.unravel_index(index, keep.shape)  # only for the points kept: cheaper than np.nonzero
    k, pose = intrinsics.astype(np.float64), extrinsics.astype(np.float64)
    pixels = np.stack([x, y], axis=1)
    d = z[frame, y, x].astype(np.float64)[:, None]
    focal = np.stack([k[frame, 0, 0], k[frame, 1, 1]], axis=1)
    cam = np.concatenate([d * (pixels + 0.5 - k[frame, :2, 2]) / focal, d], axis=1)
    world = np.einsum("pji,pj->pi", pose[frame, :, :3], cam - pose[frame, :, 3])  # R^T (X_cam - t)
    finite = np.isfinite(world).all(axis=1)
    frame, y, x, pixels, world = frame[finite], y[finite], x[finite], pixels[finite], world[finite]
    first = np.searchsorted(frame, frame, side="left")
    kept = np.flatnonzero(valid)
    return ColmapModel(
        frames=kept, names=[names[i] for i in kept], width=width, height=height, cam_from_world=pose[kept],
        intrinsics=k[kept], xyz=world, rgb=colors[frame, y, x], point_frames=frame, pixels=pixels,
        point2d_idx=np.arange(len(frame)) - first, skipped=skipped,
    )


ROWS_PER_FORMAT = 2048  # a few milliseconds of formatting: about Python's thread switch interval (5 ms)


def write_colmap(sparse: Path, model: ColmapModel, comments: Sequence[str] = ()) -> None:
    """COLMAP text model (cameras.txt, images.txt, points3D.txt) of ``model``, ``comments`` as header lines.

    Floats are written with ``%r``, the shortest text that reads back as the same double, so the text and the
    binary model hold the same numbers; a track (a pixel's centre) as its integer pixel and ``.5``, the same
    text as ``%r`` of the float and several times cheaper to format. Each file is one ``%`` over all its values
    (``_rows``), not a formatted string per point: the per-point Python work was most of the writer's time.
    """
    sparse.mkdir(parents=True, exist_ok=True)
    notes = "".join(f"# {c}\n" for c in comments)
    ids = (model.frames + 1).tolist()
    point_ids = np.arange(1, len(model.xyz) + 1)
    poses = np.concatenate([model.quaternions, model.cam_from_world[:, :, 3]], axis=1).tolist()
    (sparse / "cameras.txt").write_text(
        notes + "# Camera list with one line of data per camera:\n#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n"
        + _rows(f"%d PINHOLE {model.width} {model.height} %r %r %r %r\n", [ids, *model.params.T.tolist()])
    )
    images = [notes, "# Image list with two lines of data per image:\n",
              "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n", "#   POINTS2D[] as (X, Y, POINT3D_ID)\n"]
    for i, (image_id, name, pose) in enumerate(zip(ids, model.names, poses)):
        seen = model.observations(i)
        images.append(f"{image_id} {' '.join(map(repr, pose))} {image_id} {name}\n")
        images += [_rows("%d.5 %d.5 %d", [*model.pixels[seen].T.tolist(), point_ids[seen].tolist()], " "), "\n"]
    (sparse / "images.txt").write_text("".join(images))
    columns = [point_ids.tolist(), *model.xyz.T.tolist(), *model.rgb.T.tolist(), (model.point_frames + 1).tolist(),
               model.point2d_idx.tolist()]
    (sparse / "points3D.txt").write_text(
        notes + "# 3D point list with one line of data per point:\n"
        "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)\n"
        + _rows("%d %r %r %r %d %d %d 0 %d %d\n", columns)
    )


def _rows(row: str, columns: Sequence[Sequence[Any]], separator: str = "") -> str:
    """``row`` formatted with each row of ``columns`` (lists of Python scalars: numpy's would print as
    ``np.float64(...)`` under ``%r``), joined by ``separator``, one ``%`` per ``ROWS_PER_FORMAT`` rows.

    Why in pieces: one ``%`` is one call into C that holds the GIL until it returns (for 100,000 points, longer
    than the preview's drawing: benchmarks/RESULTS.md, "the export's GIL"), during which no other thread of the
    export (the PLY and npz writers, the preview's hand-off) can take a step. Between pieces Python hands the GIL
    over; the text is the same."""
    rows = len(columns[0])
    pieces = []
    for start in range(0, rows, ROWS_PER_FORMAT):
        part = [column[start:start + ROWS_PER_FORMAT] for column in columns]
        pieces.append(separator.join([row] * len(part[0])) % tuple(itertools.chain.from_iterable(zip(*part))))
    return separator.join(pieces)


def output_image_names(names: Sequence[str]) -> list[str]:
    """The names the frames are saved under in ``images/`` (and named by in COLMAP and the npz), in order.

    The original name where it can be, so outputs line up with the inputs, but:
      - ``.png`` is appended unless it is a PNG or JPEG, because PIL cannot write every format it reads;
      - whitespace and control characters become ``_``: COLMAP's text format splits lines on spaces, so
        ``images.txt`` would name "my photo.jpg" as "my" and ``sparse/`` would no longer match ``images/``;
        other characters (accents, any script) are kept, COLMAP reads them as they are;
      - a name that is then taken already gets its frame number (``_2``...) before the suffix.
    The original names stay in predictions.npz and report.json (``input_names``).
    """
    out: list[str] = []
    taken: set[str] = set()
    for i, name in enumerate(names):
        safe = _UNSAFE.sub("_", name)
        if Path(safe).suffix.lower() not in (".png", ".jpg", ".jpeg"):
            safe = f"{safe}.png"
        if safe.casefold() in taken:  # casefold: images/ may be on a case-insensitive file system
            stem, suffix = os.path.splitext(safe)
            safe = f"{stem}_{i + 1}{suffix}"
        taken.add(safe.casefold())
        out.append(safe)
    return out


_UNSAFE = re.compile(r"[\s\x00-\x1f\x7f]")


def encode_image(rgb: np.ndarray, name: str) -> bytes:
    """One preprocessed frame (images/) as the file ``name`` holds it: the image (and resolution) that its COLMAP
    camera describes, in the format of the name's suffix (``output_image_names``: PNG or JPEG). PIL releases the
    GIL while it encodes, so frames are encoded on threads side by side (``frames_ahead``).

    PNGs at zlib level 1: the same pixels (PNG is lossless at every level), written several times faster than
    PIL's default level 6, for files a little larger; the frames are a byproduct, not the result.
    """
    buffer = io.BytesIO()
    fmt = Image.registered_extensions()[Path(name).suffix.lower()]
    Image.fromarray(rgb).save(buffer, format=fmt, quality=95, compress_level=1)  # quality: JPEG; level: PNG
    return buffer.getvalue()


def write_image(path: Path, rgb: np.ndarray) -> None:
    """``encode_image`` into ``path``."""
    path.write_bytes(encode_image(rgb, path.name))


def write_npz(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Uncompressed: the arrays are float noise to zlib, compressing them costs seconds and saves little."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n")
