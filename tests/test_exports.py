"""reconstruct's exports for the next tools (#22), each read back by an independent reader.

- COLMAP binary (sparse/0/): pycolmap reads it; it equals the text model; every 3-D point reprojects onto the
  pixel of its track at the depth VGGT predicted there.
- nerfstudio (transforms.json): its OpenGL camera-to-world matrices convert back to predictions.npz's cameras;
  the convention itself is checked on a synthetic camera with a known pose.
- COLMAP text: every number reads back as exactly the model's double.
- preview.png: rendered, not blank, labelled RANDOM WEIGHTS; its points land on the pixels their projection names,
  the nearest on top, at most ``preview.MAX_POINTS`` of them.
- images_to_uint8: contiguous, the same values as the plain formula.
- --export: validated, and only what is asked for is written.
"""

from __future__ import annotations

import json
from typing import Any
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_reconstruct import EXAMPLES, SMALL, assert_user_error, cam_from_world, needs_examples, run_cli
from vggt_turbo.app import export, preview, preview_inputs
from vggt_turbo.app.export_nerfstudio import camera_to_world_opengl, transforms
from vggt_turbo.random_model import SMALL_IMAGE


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run on 4 of the room images with every format."""
    if EXAMPLES is None:
        pytest.skip("upstream's example images are not on this machine")
    out = tmp_path_factory.mktemp("exports") / "rec"
    code, stdout, stderr = run_cli(EXAMPLES / "room/images", "--out", out, "--frames", 4,
                                   "--export", "nerfstudio, colmap,ply", *SMALL)
    assert code == 0, stderr
    return {"out": out, "stdout": stdout, "npz": dict(np.load(out / "predictions.npz")),
            "report": json.loads((out / "report.json").read_text())}


# ------------------------------------------------------------------------------------------ COLMAP binary


@needs_examples
def test_colmap_binary_reads_with_pycolmap_and_equals_the_text_model(full: dict) -> None:
    import pycolmap

    binary = pycolmap.Reconstruction(str(full["out"] / "sparse/0"))
    text = pycolmap.Reconstruction(str(full["out"] / "sparse"))
    d = full["npz"]
    assert sorted(binary.images) == sorted(text.images) == [1, 2, 3, 4]
    for image_id, image in binary.images.items():
        camera = binary.cameras[image.camera_id]
        assert camera.model == pycolmap.CameraModelId.PINHOLE
        assert (camera.width, camera.height) == (SMALL_IMAGE, SMALL_IMAGE)
        k = d["intrinsics"][image_id - 1]
        np.testing.assert_allclose(camera.params, [k[0, 0], k[1, 1], k[0, 2], k[1, 2]], rtol=1e-6)
        np.testing.assert_allclose(cam_from_world(image).matrix(), d["extrinsics"][image_id - 1], atol=1e-5)
        assert image.name == text.images[image_id].name == str(d["image_names"][image_id - 1])
        assert image.num_points2D() == text.images[image_id].num_points2D() > 0
    assert len(binary.points3D) == len(text.points3D) == full["report"]["points"]["colmap_points"] > 0
    for point_id, point in text.points3D.items():
        other = binary.points3D[point_id]
        np.testing.assert_allclose(other.xyz, point.xyz, rtol=1e-12)
        assert other.color.tolist() == point.color.tolist()
        assert [(e.image_id, e.point2D_idx) for e in other.track.elements] == \
               [(e.image_id, e.point2D_idx) for e in point.track.elements]


@needs_examples
def test_colmap_points_reproject_onto_their_track_at_the_predicted_depth(full: dict) -> None:
    import pycolmap

    rec = pycolmap.Reconstruction(str(full["out"] / "sparse/0"))
    depth = full["npz"]["depth"][..., 0]
    errors, depth_errors = [], []
    for point_id, point in rec.points3D.items():
        (element,) = point.track.elements
        image = rec.images[element.image_id]
        observed = image.points2D[element.point2D_idx]
        assert observed.point3D_id == point_id
        in_camera = cam_from_world(image) * point.xyz
        projected = rec.cameras[image.camera_id].img_from_cam(in_camera)
        errors.append(np.linalg.norm(projected[:2] - observed.xy))
        col, row = np.floor(observed.xy).astype(int)
        depth_errors.append(abs(in_camera[2] - depth[element.image_id - 1, row, col]) / depth[element.image_id - 1, row, col])
    assert max(errors) < 1.0, max(errors)  # within a pixel (in fact float rounding only)
    assert max(depth_errors) < 1e-4


@needs_examples
def test_colmap_points_have_the_colour_of_their_pixel(full: dict) -> None:
    import pycolmap

    rec = pycolmap.Reconstruction(str(full["out"] / "sparse/0"))
    image = rec.images[1]  # frame 0 is a PNG: saved losslessly
    pixels = np.asarray(Image.open(full["out"] / "images" / image.name))
    checked = 0
    for p in image.points2D:
        col, row = np.floor(p.xy).astype(int)
        assert rec.points3D[p.point3D_id].color.tolist() == pixels[row, col].tolist()
        checked += 1
    assert checked > 0


@pytest.mark.parametrize("rows_per_format", [export.ROWS_PER_FORMAT, 5])
def test_colmap_text_reads_back_as_exactly_the_models_numbers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              rows_per_format: int) -> None:
    """The text model is written column-wise with ``%r`` (and tracks as pixel + ".5"): parsed as doubles, every
    point, track and camera is bit-equal to the model the binary model is written from; also when the rows are
    formatted in many pieces (5 rows each here: pieces end inside every image's track line)."""
    monkeypatch.setattr(export, "ROWS_PER_FORMAT", rows_per_format)
    rng = np.random.default_rng(0)
    count, height, width = 3, 6, 8
    extrinsics = np.tile(np.eye(4)[:3], (count, 1, 1)) + 0.01 * rng.standard_normal((count, 3, 4))
    intrinsics = np.tile(np.array([[9.0, 0, 4], [0, 9.5, 3], [0, 0, 1]]), (count, 1, 1))
    depth = rng.uniform(1.0, 3.0, (count, height, width, 1)).astype(np.float32)
    colors = rng.integers(0, 256, (count, height, width, 3), dtype=np.uint8)
    conf = rng.random((count, height, width))
    model = export.colmap_model(extrinsics, intrinsics, depth, conf, colors, ["a.png", "b.png", "c.png"], width, height,
                                float(np.median(conf)))
    export.write_colmap(tmp_path, model, ["a note"])

    points = np.loadtxt(tmp_path / "points3D.txt")
    assert points.shape == (len(model.xyz), 10)
    np.testing.assert_array_equal(points[:, 1:4], model.xyz)
    np.testing.assert_array_equal(points[:, 4:7], model.rgb)
    np.testing.assert_array_equal(points[:, 8:], np.stack([model.point_frames + 1, model.point2d_idx], axis=1))
    lines = [line for line in (tmp_path / "images.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(lines) == 2 * count
    for i, (pose, observed) in enumerate(zip(lines[::2], lines[1::2])):
        fields = pose.split()
        np.testing.assert_array_equal([float(v) for v in fields[1:8]],
                                      [*model.quaternions[i], *model.cam_from_world[i, :, 3]])
        seen = model.observations(i)
        track = np.array(observed.split(), dtype=float).reshape(-1, 3)
        np.testing.assert_array_equal(track[:, :2], model.points2d[seen])
        np.testing.assert_array_equal(track[:, 2], np.arange(seen.start, seen.stop) + 1)
    cameras = np.loadtxt(tmp_path / "cameras.txt", usecols=(0, 2, 3, 4, 5, 6, 7))
    np.testing.assert_array_equal(cameras[:, 3:], model.params)
    np.testing.assert_array_equal(cameras[:, 1:3], np.tile([width, height], (count, 1)))


# --------------------------------------------------------------------------------------------- nerfstudio


@needs_examples
def test_transforms_json_converts_back_to_the_predicted_cameras(full: dict) -> None:
    from plyfile import PlyData

    doc = json.loads((full["out"] / "transforms.json").read_text())
    d = full["npz"]
    assert doc["camera_model"] == "PINHOLE" and (doc["w"], doc["h"]) == (SMALL_IMAGE, SMALL_IMAGE)
    assert any("RANDOM WEIGHTS" in n for n in doc["notes"])
    assert len(doc["frames"]) == 4
    for i, frame in enumerate(doc["frames"]):
        assert frame["file_path"] == f"images/{d['image_names'][i]}"
        assert (full["out"] / frame["file_path"]).is_file()
        c2w_gl = np.array(frame["transform_matrix"])
        c2w_cv = c2w_gl @ np.diag([1.0, -1.0, -1.0, 1.0])  # nerfstudio's OpenGL camera axes back to OpenCV
        np.testing.assert_allclose(np.linalg.inv(c2w_cv)[:3], d["extrinsics"][i], atol=1e-5)
        k = d["intrinsics"][i]
        for key, value in (("fl_x", k[0, 0]), ("fl_y", k[1, 1]), ("cx", k[0, 2]), ("cy", k[1, 2])):
            assert frame.get(key, doc.get(key)) == pytest.approx(float(value), rel=1e-6), key
    ply = PlyData.read(str(full["out"] / doc["ply_file_path"]))
    assert ply["vertex"].count == full["report"]["points"]["colmap_points"]


def synthetic_model(extrinsics: np.ndarray, intrinsics: np.ndarray) -> export.ColmapModel:
    count = len(extrinsics)
    return export.colmap_model(extrinsics, intrinsics, np.ones((count, 2, 2, 1)), np.ones((count, 2, 2)),
                               np.zeros((count, 2, 2, 3), np.uint8), [f"{i}.png" for i in range(count)], 64, 48, 1.0)


def test_nerfstudio_convention_on_a_synthetic_camera() -> None:
    """A camera 2 units behind the origin along world z, turned 30 degrees about y, looking at a known point:
    the point lands on the same pixel through OpenCV's world-to-camera and through nerfstudio's OpenGL c2w."""
    angle = np.radians(30.0)
    rotation = np.array([[np.cos(angle), 0, -np.sin(angle)], [0, 1, 0], [np.sin(angle), 0, np.cos(angle)]])
    centre = np.array([0.5, -0.25, -2.0])
    extrinsics = np.concatenate([rotation, (-rotation @ centre)[:, None]], axis=1)[None]
    fx, fy, cx, cy = 50.0, 55.0, 32.0, 24.0
    intrinsics = np.array([[[fx, 0, cx], [0, fy, cy], [0, 0, 1]]])
    doc = transforms(synthetic_model(extrinsics, intrinsics))
    assert (doc["fl_x"], doc["fl_y"], doc["cx"], doc["cy"]) == (fx, fy, cx, cy)  # one frame: shared
    c2w = np.array(doc["frames"][0]["transform_matrix"])
    np.testing.assert_allclose(c2w[:3, 3], centre, atol=1e-12)  # the camera centre in the world

    # A point 3 units in front of the camera, 0.4 right and 0.3 below its axis (OpenCV camera axes).
    point_cv = np.array([0.4, 0.3, 3.0])
    world = rotation.T @ (point_cv - extrinsics[0, :, 3])
    expected = (fx * 0.4 / 3.0 + cx, fy * 0.3 / 3.0 + cy)
    # nerfstudio: camera looks down -z, +y up; pixel rows grow downwards.
    gl = np.linalg.inv(c2w) @ np.append(world, 1.0)
    assert gl[2] < 0  # in front of the camera
    through_gl = (fx * gl[0] / -gl[2] + cx, -fy * gl[1] / -gl[2] + cy)
    np.testing.assert_allclose(through_gl, expected, atol=1e-9)
    np.testing.assert_allclose(camera_to_world_opengl(extrinsics)[0], c2w)


def test_per_frame_intrinsics_when_they_differ() -> None:
    extrinsics = np.tile(np.eye(4)[:3], (2, 1, 1))
    intrinsics = np.tile(np.array([[50.0, 0, 32], [0, 50, 24], [0, 0, 1]]), (2, 1, 1))
    intrinsics[1, 0, 0] = intrinsics[1, 1, 1] = 60.0
    doc = transforms(synthetic_model(extrinsics, intrinsics))
    assert (doc["cx"], doc["cy"]) == (32.0, 24.0) and "fl_x" not in doc and "fl_y" not in doc
    assert [(f["fl_x"], f["fl_y"]) for f in doc["frames"]] == [(50.0, 50.0), (60.0, 60.0)]
    assert all("cx" not in f for f in doc["frames"])


# ---------------------------------------------------------------------------------------- preview, report


@needs_examples
def test_preview_png_is_a_labelled_picture(full: dict) -> None:
    preview = Image.open(full["out"] / "preview.png")
    assert preview.info["Warning"].startswith("RANDOM WEIGHTS")
    pixels = np.asarray(preview.convert("RGB")).astype(int)
    height, width, _ = pixels.shape
    assert width >= 1000 and height >= 1000
    # The warning is red text across the top; the strip of frames below has the images' many colours.
    top = pixels[: height // 20]
    assert ((top[..., 0] > 200) & (top[..., 1] < 80) & (top[..., 2] < 80)).sum() > 500
    assert len(np.unique(pixels[height // 2:].reshape(-1, 3), axis=0)) > 1000


@pytest.mark.parametrize("elevation, azimuth", [(elevation, azimuth) for _, elevation, azimuth in preview.VIEWS])
def test_preview_view_axes_are_the_viewers_on_a_sphere(elevation: float, azimuth: float) -> None:
    """Right, up and towards the viewer: orthonormal and right-handed; the viewer stands at (elevation, azimuth)
    on a sphere around the scene (rotations of the front view, built another way: about the up axis, then tilted
    about the screen's right)."""
    right, up, toward = axes = preview.view_axes(elevation, azimuth)
    np.testing.assert_allclose(axes @ axes.T, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(np.cross(right, up), toward, atol=1e-12)
    a, e = np.radians(azimuth + 90), np.radians(elevation)
    turn = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    front = {"right": np.array([1.0, 0, 0]), "up": np.array([0, 0, 1.0]), "toward": np.array([0, -1.0, 0])}
    tilt = lambda v: np.cos(e) * v - np.sin(e) * np.cross(turn @ front["right"], v)  # noqa: E731 - v is ⟂ the axis
    np.testing.assert_allclose(right, turn @ front["right"], atol=1e-12)
    np.testing.assert_allclose(toward, tilt(turn @ front["toward"]), atol=1e-12)
    np.testing.assert_allclose(up, tilt(turn @ front["up"]), atol=1e-12)


def test_preview_splat_puts_each_point_on_its_pixel() -> None:
    uv = np.array([[0.5, 0.5], [3.99, 2.0], [7.2, 4.9], [-0.1, 1.0], [8.0, 1.0]])  # the last two outside
    rgb = np.uint8([[255, 0, 0], [0, 255, 0], [0, 0, 255], [9, 9, 9], [9, 9, 9]])
    image = preview.splat(uv, np.zeros(len(uv)), rgb, 8, 5)
    assert image.shape == (5, 8, 4) and (image[..., 3] == 255).sum() == 3
    for (x, y), colour in zip(uv[:3], rgb[:3]):
        assert image[int(y), int(x)].tolist() == [*colour, 255]


def test_preview_nearest_point_wins_its_pixel() -> None:
    uv = np.array([[1.2, 1.2], [1.7, 1.9], [1.0, 1.0]])  # one pixel
    rgb = np.uint8([[0, 0, 255], [255, 0, 0], [0, 255, 0]])
    image = preview.splat(uv, np.array([-0.5, 0.5, 0.0]), rgb, 3, 3)  # the second is the nearest
    assert (image[..., 3] == 255).sum() == 1 and image[1, 1].tolist() == [255, 0, 0, 255]


def test_preview_draws_at_most_max_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    drawn: list[int] = []
    splat = preview.splat

    def counting(uv: np.ndarray, *args: Any) -> np.ndarray:
        drawn.append(len(uv))
        return splat(uv, *args)

    monkeypatch.setattr(preview, "splat", counting)
    monkeypatch.setattr(preview_inputs, "MAX_POINTS", 500)
    rng = np.random.default_rng(0)
    xyz, rgb = rng.standard_normal((2000, 3)), rng.integers(0, 256, (2000, 3), dtype=np.uint8)
    extrinsics = np.tile(np.eye(4)[:3], (2, 1, 1))
    intrinsics = np.tile(np.array([[20.0, 0, 8], [0, 20, 6], [0, 0, 1]]), (2, 1, 1))
    frames = rng.integers(0, 256, (2, 12, 16, 3), dtype=np.uint8)
    preview.render(tmp_path / "p.png", preview_inputs.preview_inputs(xyz, rgb, extrinsics, intrinsics, frames,
                                                                     np.ones((2, 12, 16, 1)), ["a.png", "b.png"]))
    assert drawn == [500] * len(preview.VIEWS)
    assert Image.open(tmp_path / "p.png").size == (preview.WIDTH, preview.HEIGHT)


@pytest.mark.parametrize("points", [2000, 0])
def test_preview_without_a_usable_camera(tmp_path: Path, points: int) -> None:
    """Every predicted camera non-finite (random weights can give that): the points are drawn, no frustum, no
    crash; with no confident point either, an empty scene (reconstruct still writes its outputs)."""
    rng = np.random.default_rng(0)
    xyz, rgb = rng.standard_normal((points, 3)), rng.integers(0, 256, (points, 3), dtype=np.uint8)
    extrinsics = np.full((2, 3, 4), np.nan)
    intrinsics = np.tile(np.array([[20.0, 0, 8], [0, 20, 6], [0, 0, 1]]), (2, 1, 1))
    frames = rng.integers(0, 256, (2, 12, 16, 3), dtype=np.uint8)
    preview.render(tmp_path / "p.png", preview_inputs.preview_inputs(xyz, rgb, extrinsics, intrinsics, frames,
                                                                     np.ones((2, 12, 16, 1)), ["a.png", "b.png"]))
    views = np.asarray(Image.open(tmp_path / "p.png").convert("RGB"))[preview.TITLE_ROOM:preview.VIEWS_BOTTOM]
    coloured = (views.max(axis=2).astype(int) - views.min(axis=2)) > 60  # points are coloured, axes grey
    assert coloured.any() == (points > 0)


def test_images_to_uint8_is_contiguous_and_rounds_like_the_plain_formula() -> None:
    images = np.random.default_rng(0).uniform(-0.2, 1.2, (2, 3, 5, 7)).astype(np.float32)
    colors = export.images_to_uint8(images)
    assert colors.flags.c_contiguous and colors.dtype == np.uint8
    expected = (np.clip(images, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(colors, expected)


@needs_examples
def test_report_and_summary_name_every_output(full: dict) -> None:
    outputs = full["report"]["outputs"]
    assert outputs == ["predictions.npz", "points.ply", "images/", "sparse/cameras.txt", "sparse/images.txt",
                       "sparse/points3D.txt", "sparse/0/cameras.bin", "sparse/0/images.bin", "sparse/0/points3D.bin",
                       "transforms.json", "sparse_pc.ply", "preview.png", "report.json"]
    for name in outputs:
        assert (full["out"] / name).exists(), name
        assert name in full["stdout"]


# ------------------------------------------------------------------------------------------------ --export


@needs_examples
def test_export_writes_only_what_is_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "ns"
    code, _, stderr = run_cli(EXAMPLES / "room/images", "--out", out, "--frames", 1, "--export", "nerfstudio", *SMALL)
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["images", "predictions.npz", "preview.png", "report.json",
                                                     "sparse", "sparse_pc.ply", "transforms.json"]
    assert not (out / "sparse/0").exists()


@pytest.mark.parametrize("value, needle", [("ply,gltf", "unknown gltf"), (",", "no format named")])
def test_unknown_export_is_a_one_line_error(tmp_path: Path, value: str, needle: str) -> None:
    last = assert_user_error(run_cli(tmp_path, "--out", tmp_path / "o", "--export", value, *SMALL), "--export", needle)
    assert "ply,colmap,nerfstudio" in last
    assert not (tmp_path / "o").exists()
