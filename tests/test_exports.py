"""reconstruct's exports for the next tools (#22), each read back by an independent reader.

- COLMAP binary (sparse/0/): pycolmap reads it; it equals the text model; every 3-D point reprojects onto the
  pixel of its track at the depth VGGT predicted there.
- nerfstudio (transforms.json): its OpenGL camera-to-world matrices convert back to predictions.npz's cameras;
  the convention itself is checked on a synthetic camera with a known pose.
- preview.png: rendered, not blank, labelled RANDOM WEIGHTS.
- --export: validated, and only what is asked for is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from test_reconstruct import EXAMPLES, SMALL, assert_user_error, cam_from_world, needs_examples, run_cli
from vggt_turbo.app import export
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
                               np.zeros((count, 2, 2, 3), np.uint8), [f"{i}.png" for i in range(count)], 64, 48, 0.0)


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
