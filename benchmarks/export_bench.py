"""Time each writer of ``vggt-turbo reconstruct``'s export phase on synthetic predictions (issue #20 item 4).

Why synthetic: the export's cost depends on the shapes (frames, resolution, points kept), not on what the model
predicted, and building predictions here needs neither weights nor a forward. The scene is plausible (cameras
on an arc looking at a wavy surface, the points lifted from the depth through the cameras, smooth images with a
little noise so PNG encoding costs what it costs on photos) and seeded, so runs compare.

Each writer is called as ``reconstruct._export`` calls it, into a fresh folder, ``--repeats`` times; the table
shows the median. ``export (whole)`` is ``reconstruct._export`` itself: what the command's critical path pays,
writers side by side on its thread pool, the shared inputs (confident points, COLMAP model) and the staging
included, the confidence thresholds not (``reconstruct`` finds them on the device before the export; here they
are found on the host, in a row of their own); twice: with images/ encoded within it, and encoded beforehand,
as ``reconstruct`` has them when the model's load and forward took longer than the encoding
(``app.frames_ahead``). CPU timings of the export phase only; see benchmarks/RESULTS.md.

    PYTHONPATH=src python benchmarks/export_bench.py --frames 28 --out /tmp/export.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from vggt_turbo.app import export, inputs
from vggt_turbo.app.export_colmap_binary import write_colmap_binary
from vggt_turbo.app.export_nerfstudio import write_nerfstudio
from vggt_turbo.app.options import ReconstructOptions
from vggt_turbo.app.preview import render
from vggt_turbo.app.preview_inputs import preview_inputs
from vggt_turbo.app.preview_process import PreviewProcess, started
from vggt_turbo.app.frames_ahead import FramesAhead
from vggt_turbo.app.percentile import percentile
from vggt_turbo.app.reconstruct import _export
from vggt_turbo.app.report import RANDOM_WEIGHTS_NOTE, build_report
from vggt_turbo.app.result import Result
from vggt_turbo.bench.meta import turbo_commit

FORMATS = ("ply", "colmap", "nerfstudio")
PERCENTILE = 50.0  # reconstruct's default --conf-percentile


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=28)
    p.add_argument("--width", type=int, default=518)
    p.add_argument("--height", type=int, default=392)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per writer; the median is shown")
    p.add_argument("--out", type=Path, help="also write the timings as JSON here")
    return p.parse_args(argv)


def synthetic_predictions(frames: int, height: int, width: int,
                          seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(predictions as reconstruct has them after inference, images (S, 3, H, W) floats in [0, 1])."""
    rng = np.random.default_rng(seed)
    angles = np.linspace(-0.6, 0.6, frames)
    extrinsics = np.zeros((frames, 3, 4), np.float32)
    for i, a in enumerate(angles):  # on an arc of radius 3 around (0, 0, 3), each looking at its centre
        rotation = np.array([[np.cos(a), 0, -np.sin(a)], [0, 1, 0], [np.sin(a), 0, np.cos(a)]])
        centre = np.array([3 * np.sin(a), 0.0, 3 - 3 * np.cos(a)])
        extrinsics[i, :, :3], extrinsics[i, :, 3] = rotation, -rotation @ centre
    focal = width * (1.0 + 0.02 * rng.standard_normal(frames))
    intrinsics = np.zeros((frames, 3, 3), np.float32)
    intrinsics[:, 0, 0], intrinsics[:, 1, 1] = focal, focal
    intrinsics[:, 0, 2], intrinsics[:, 1, 2], intrinsics[:, 2, 2] = width / 2, height / 2, 1.0

    v, u = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = np.sin(u / 37.0)[None] * np.cos(v / 23.0)[None] * np.cos(angles)[:, None, None]
    depth = (3.0 + 0.4 * waves + 0.01 * rng.standard_normal((frames, height, width))).astype(np.float32)
    rays = np.stack([(u + 0.5 - width / 2), (v + 0.5 - height / 2)], -1)[None] / focal[:, None, None, None]
    cam = np.concatenate([rays * depth[..., None], depth[..., None]], -1)  # (S, H, W, 3)
    rotation, t = extrinsics[:, :, :3], extrinsics[:, :, 3]
    world = np.einsum("sji,shwj->shwi", rotation, cam - t[:, None, None, :])
    world_points = (world + 0.02 * rng.standard_normal(world.shape)).astype(np.float32)
    conf = (1.0 + rng.exponential(2.0, (frames, height, width))).astype(np.float32)

    base = np.stack([u / width, v / height, 0.5 + 0.5 * np.sin(u / 17.0 + v / 29.0)])[None]
    images = np.clip(base * np.linspace(0.6, 1.0, frames)[:, None, None, None]
                     + 0.03 * rng.standard_normal((frames, 3, height, width)), 0, 1).astype(np.float32)
    predictions = {"extrinsics": extrinsics, "intrinsics": intrinsics, "depth": depth[..., None], "depth_conf": conf,
                   "world_points": world_points, "world_points_conf": conf.copy()}
    return predictions, images


def write_frames(folder: Path, colors: np.ndarray, names: list[str]) -> None:
    """images/ on one thread (``reconstruct._export`` spreads the frames over its pool)."""
    folder.mkdir()
    for rgb, name in zip(colors, names):
        export.write_image(folder / name, rgb)


def median_seconds(call: Callable[..., Any], repeats: int,
                   setup: Optional[Callable[[Path], Any]] = None) -> tuple[float, list[float]]:
    """Median wall time of ``call(folder)``, each call into a fresh empty folder; with ``setup``, of
    ``call(folder, setup(folder))``, ``setup`` untimed."""
    times = []
    for _ in range(repeats):
        folder = Path(tempfile.mkdtemp(prefix="export-bench-"))
        try:
            args = () if setup is None else (setup(folder),)
            start = time.perf_counter()
            call(folder, *args)
            times.append(time.perf_counter() - start)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return statistics.median(times), times


def bench(frames: int, height: int, width: int, repeats: int, previews: PreviewProcess) -> dict[str, Any]:
    """``previews``: the preview's worker process, started with the bench as reconstruct starts it with the run."""
    predictions, images = synthetic_predictions(frames, height, width)
    colors = export.images_to_uint8(images)
    names = [f"frame_{i:04d}.png" for i in range(frames)]
    notes = [RANDOM_WEIGHTS_NOTE]
    arrays = dict(predictions, image_names=np.array(names), input_names=np.array(names), weights=np.array("random"),
                  random_weights=np.array(True))
    options = ReconstructOptions(
        input=Path("synthetic"), out=Path("unused"), example=False, preset="exact", weights=None, random_weights=True,
        frames=frames, stride=None, device="cpu", memory=None, dtype="fp32", mode="crop", conf_percentile=PERCENTILE,
        export=",".join(FORMATS), force=True, quiet=True, model_size="full",
    )
    result = Result(options=options, weights="random", frames=frames, frames_in_input=frames, input_kind="folder",
                    image_names=names, input_names=names, width=width, height=height, device=torch.device("cpu"),
                    dtype=torch.float32, optimizations={}, outputs=())

    shared: dict[str, Any] = {}
    thresholds: dict[str, float] = {}

    def found(_: Path) -> None:  # as reconstruct finds them, but on the host: the CPU's (numpy's) path
        for name in ("world_points_conf", "depth_conf"):
            thresholds[name] = percentile(torch.from_numpy(predictions[name]), PERCENTILE)

    def points(_: Path) -> None:
        shared["xyz"], shared["rgb"] = export.confident_points(
            predictions["world_points"], predictions["world_points_conf"], colors, thresholds["world_points_conf"])

    def model(_: Path) -> None:
        shared["model"] = export.colmap_model(
            predictions["extrinsics"], predictions["intrinsics"], predictions["depth"], predictions["depth_conf"],
            colors, names, width, height, thresholds["depth_conf"])

    rows: dict[str, dict[str, Any]] = {}
    rows["colours (images_to_uint8)"] = _row(*median_seconds(lambda _: export.images_to_uint8(images), repeats))
    for name, call in (("thresholds (host; on the GPU in reconstruct)", found), ("confident points", points),
                       ("COLMAP model", model)):
        rows[name] = _row(*median_seconds(call, repeats))
    xyz, rgb, colmap = shared["xyz"], shared["rgb"], shared["model"]
    timed: dict[str, Callable[[Path], Any]] = {
        "predictions.npz": lambda d: export.write_npz(d / "predictions.npz", arrays),
        "points.ply": lambda d: export.write_ply(d / "points.ply", xyz, rgb, [*notes, "weights: random"]),
        "images/ (one frame after another)": lambda d: write_frames(d / "images", colors, names),
        "sparse/ (COLMAP text)": lambda d: export.write_colmap(d / "sparse", colmap, notes),
        "sparse/0/ (COLMAP binary)": lambda d: write_colmap_binary(d / "sparse" / "0", colmap),
        "transforms.json + sparse_pc.ply": lambda d: write_nerfstudio(d, colmap, notes),
        "preview.png": lambda d: render(d / "preview.png", preview_inputs(
            xyz, rgb, predictions["extrinsics"], predictions["intrinsics"], colors, predictions["depth"], names, notes)),
        "preview.png (worker process)": lambda d: previews.render_preview(
            d / "preview.png", xyz, rgb, predictions["extrinsics"], predictions["intrinsics"], colors,
            predictions["depth"], names, notes),
        "report.json": lambda d: export.write_json(d / "report.json", build_report(result)),
    }
    for name, call in timed.items():
        rows[name] = _row(*median_seconds(call, repeats))
    alone = [r["seconds"] for name, r in rows.items() if name != "preview.png (worker process)"]  # drawn twice
    rows["sum of the above"] = {"seconds": sum(alone), "all": []}

    def whole(folder: Path, ahead: Optional[FramesAhead] = None) -> None:
        fresh = dataclasses.replace(result, options=dataclasses.replace(options, out=folder / "out"), timings={})
        with ahead or FramesAhead(colors, names) as frames_ahead:  # a fresh Result: the export fills it in
            _export(fresh, predictions, thresholds, colors, FORMATS, frames_ahead, previews)

    def encoded(folder: Path) -> FramesAhead:  # as reconstruct has them when the model took longer than encoding
        ahead, scratch = FramesAhead(colors, names), folder / "scratch"
        scratch.mkdir()
        for index in range(frames):
            ahead.write(scratch, index)  # returns once the frame is encoded
        return ahead

    rows["export (whole), frames encoded in it"] = _row(*median_seconds(whole, repeats))
    rows["export (whole), frames encoded while the model ran"] = _row(*median_seconds(whole, repeats, encoded))
    return {"meta": _meta(frames, height, width, repeats, len(xyz), len(colmap.xyz)), "rows": rows}


def _row(seconds: float, every: list[float]) -> dict[str, Any]:
    return {"seconds": seconds, "all": every}


def _meta(frames: int, height: int, width: int, repeats: int, points: int, colmap_points: int) -> dict[str, Any]:
    commit = turbo_commit()  # the tree imported (VGGT_TURBO_COMMIT for a copy without .git), not the cwd's HEAD
    return {"frames": frames, "height": height, "width": width, "repeats": repeats, "points": points,
            "colmap_points": colmap_points, "threads": inputs.workers(), "cpu": _cpu_name(), "commit": commit,
            "numpy": np.__version__, "date": time.strftime("%Y-%m-%d")}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    with started() as previews:
        data = bench(args.frames, args.height, args.width, args.repeats, previews)
    meta = data["meta"]
    print(f"{meta['frames']} frames at {meta['width']}x{meta['height']}, {meta['points']:,} confident points, "
          f"{meta['colmap_points']:,} COLMAP points, {meta['threads']} export threads ({meta['cpu']}), "
          f"commit {meta['commit']}, median of {meta['repeats']}")
    print(f"{'writer':<50} {'seconds':>8}")
    for name, row in data["rows"].items():
        print(f"{name:<50} {row['seconds']:>8.3f}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(data, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
