"""`vggt-turbo reconstruct` end to end on the CPU: the small random-init model on a few real images.

Outputs are checked with independent readers (plyfile for the PLY, pycolmap for the COLMAP text model); error
paths must exit 2 with one line naming the problem, and a failure must leave no partial output behind.

The real images are upstream's examples in the project's shared data (never copied into the repo); tests that
need them are skipped, saying so, when that folder is absent.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vggt_turbo
from vggt_turbo import cli
from vggt_turbo.app import export, inputs, memory, selection, weights
from vggt_turbo.app.errors import UserError
from vggt_turbo.random_model import SMALL_IMAGE, build_vggt

ROOT = Path(__file__).resolve().parents[1]


def _examples() -> Path | None:
    env = os.environ.get("VGGT_EXAMPLES")
    candidates = [Path(env)] if env else []
    candidates += [ROOT / "shared/data/vggt-examples", ROOT.parent / "shared/data/vggt-examples"]
    return next((c for c in candidates if (c / "room/images").is_dir()), None)


EXAMPLES = _examples()
needs_examples = pytest.mark.skipif(
    EXAMPLES is None, reason="upstream's example images (shared/data/vggt-examples/room/images) are not on this machine"
)
SMALL = ("--random-weights", "--model-size", "small")


def run_cli(*argv: object) -> tuple[int, str, str]:
    """``vggt-turbo reconstruct ...`` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(["reconstruct", *map(str, argv)])
        except SystemExit as exc:  # argparse's usage errors
            code = exc.code
    return code, out.getvalue(), err.getvalue()


def room_images() -> list[Path]:
    return sorted((EXAMPLES / "room/images").iterdir())


@pytest.fixture(scope="module")
def room(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One run on 3 of the 8 room images (evenly spaced: the 1st, 5th and 8th)."""
    if EXAMPLES is None:
        pytest.skip("upstream's example images are not on this machine")
    out = tmp_path_factory.mktemp("room") / "rec"
    code, stdout, stderr = run_cli(EXAMPLES / "room/images", "--out", out, "--frames", 3, *SMALL)
    assert code == 0, stderr
    files = room_images()
    return {"out": out, "stdout": stdout, "stderr": stderr, "names": [files[i].name for i in (0, 4, 7)],
            "npz": dict(np.load(out / "predictions.npz"))}


# ---------------------------------------------------------------------------------------------- outputs


@needs_examples
def test_predictions_npz_shapes_and_dtypes(room: dict) -> None:
    d, s, h, w = room["npz"], 3, SMALL_IMAGE, SMALL_IMAGE
    shapes = {"extrinsics": (s, 3, 4), "intrinsics": (s, 3, 3), "depth": (s, h, w, 1), "depth_conf": (s, h, w),
              "world_points": (s, h, w, 3), "world_points_conf": (s, h, w)}
    for key, shape in shapes.items():
        assert d[key].shape == shape, key
        assert d[key].dtype == np.float32, key
        assert np.isfinite(d[key]).all(), key
    assert d["image_names"].tolist() == room["names"]
    assert bool(d["random_weights"]) is True
    assert "RANDOM WEIGHTS" in str(d["weights"])
    assert sorted(p.name for p in room["out"].iterdir()) == ["images", "points.ply", "predictions.npz", "preview.png",
                                                             "report.json", "sparse"]


@needs_examples
def test_points_ply_parses_with_colours_and_the_confident_points(room: dict) -> None:
    from plyfile import PlyData

    ply = PlyData.read(str(room["out"] / "points.ply"))
    assert ply.header.splitlines()[1] == "format binary_little_endian 1.0"
    assert any("RANDOM WEIGHTS" in c for c in ply.comments)
    vertex = ply["vertex"]
    types_ = {p.name: p.val_dtype for p in vertex.properties}
    assert types_ == {"x": "f4", "y": "f4", "z": "f4", "red": "u1", "green": "u1", "blue": "u1"}

    d = room["npz"]
    keep = d["world_points_conf"] >= np.percentile(d["world_points_conf"].astype(np.float64), 50)
    assert room_report(room)["points"]["conf_threshold"] == np.percentile(d["world_points_conf"].astype(np.float64), 50)
    assert vertex.count == keep.sum() > 0
    xyz = np.stack([vertex["x"], vertex["y"], vertex["z"]], axis=1)
    np.testing.assert_array_equal(xyz, d["world_points"][keep])
    # Colours are the preprocessed images' pixels; frame 0 was saved losslessly (PNG), so compare it exactly.
    rgb = np.stack([vertex["red"], vertex["green"], vertex["blue"]], axis=1)
    frame0 = np.asarray(Image.open(room["out"] / "images" / room["names"][0]))
    n0 = keep[0].sum()
    np.testing.assert_array_equal(rgb[:n0], frame0[keep[0]])


@needs_examples
def test_colmap_model_parses_and_reproduces_the_extrinsics(room: dict) -> None:
    import pycolmap

    sparse = room["out"] / "sparse"
    rec = pycolmap.Reconstruction(str(sparse))
    d = room["npz"]
    assert len(rec.cameras) == len(rec.images) == 3
    for image_id, image in rec.images.items():
        i = image_id - 1
        assert image.name == room["names"][i]
        camera = rec.cameras[image.camera_id]
        assert camera.model == pycolmap.CameraModelId.PINHOLE
        assert (camera.width, camera.height) == (SMALL_IMAGE, SMALL_IMAGE)
        k = d["intrinsics"][i]
        np.testing.assert_allclose(camera.params, [k[0, 0], k[1, 1], k[0, 2], k[1, 2]], rtol=1e-6)
        np.testing.assert_allclose(cam_from_world(image).matrix(), d["extrinsics"][i], atol=1e-5)
    assert len(rec.points3D) == room_report(room)["points"]["colmap_points"] > 0

    # The text itself: PINHOLE with 4 params, unit quaternions, a POINTS2D line per image (one triple per point).
    cameras = [l.split() for l in (sparse / "cameras.txt").read_text().splitlines() if l and not l.startswith("#")]
    assert all(c[1] == "PINHOLE" and len(c) == 8 for c in cameras)
    lines = [l for l in (sparse / "images.txt").read_text().splitlines() if not l.startswith("#")]
    assert len(lines) == 6 and sum(len(l.split()) for l in lines[1::2]) == 3 * len(rec.points3D)
    for line in lines[::2]:
        assert np.linalg.norm([float(v) for v in line.split()[1:5]]) == pytest.approx(1.0, abs=1e-12)
    assert (sparse / "cameras.txt").read_text().startswith("# RANDOM WEIGHTS")


def cam_from_world(image):  # a method since pycolmap 3.12, a property before
    return image.cam_from_world() if callable(image.cam_from_world) else image.cam_from_world


def room_report(room: dict) -> dict:
    return json.loads((room["out"] / "report.json").read_text())


@needs_examples
def test_report_json(room: dict) -> None:
    r = room_report(room)
    assert r["random_weights"] is True and "RANDOM WEIGHTS" in r["warning"]
    assert r["frames"] == 3 and r["frames_in_input"] == 8 and r["input_kind"] == "folder"
    assert r["image_names"] == room["names"]
    assert r["resolution"] == {"width": SMALL_IMAGE, "height": SMALL_IMAGE}
    assert (r["device"], r["dtype"], r["preset"], r["mode"]) == ("cpu", "fp32", "exact", "crop")
    assert set(r["timings_s"]) == {"load", "model", "inference", "aggregator", "heads", "export"}
    assert all(v >= 0 for v in r["timings_s"].values())
    assert r["peak_memory"]["bytes"] > 0 and r["peak_memory"]["measured"] == "process peak RSS"
    assert r["optimizations"]["exact"] is True and r["optimizations"]["tier"] == "exact"
    one_shot = vggt_turbo.PRESETS["exact"].replace(cuda_graphs=False)  # one forward: capture would not pay
    assert r["optimizations"]["config"] == json.loads(json.dumps(one_shot.as_dict()))
    assert r["optimizations"]["patched"]
    v = r["versions"]
    assert (v["torch"], v["vggt_turbo"]) == (torch.__version__, vggt_turbo.__version__)
    assert v["vggt_upstream"]["pinned_commit"] == vggt_turbo.PINNED_COMMIT
    assert r["points"]["conf_percentile"] == 50


@needs_examples
def test_images_are_the_preprocessed_frames(room: dict) -> None:
    for name in room["names"]:
        assert Image.open(room["out"] / "images" / name).size == (SMALL_IMAGE, SMALL_IMAGE)


@needs_examples
def test_summary_table_and_progress(room: dict) -> None:
    summary = room["stdout"]
    assert summary.startswith("vggt-turbo reconstruct: done in")
    assert "RANDOM WEIGHTS" in summary.splitlines()[1]
    for row in ("frames       3 of 8", "resolution   56 x 56", "inference", "peak memory", "points", "report.json"):
        assert row in summary
    for bar in ("load", "model", "inference", "export"):
        assert bar in room["stderr"]


@needs_examples
def test_quiet_prints_nothing(tmp_path: Path) -> None:
    code, stdout, stderr = run_cli(EXAMPLES / "room/images", "--out", tmp_path / "q", "--frames", 1, "--quiet", *SMALL)
    assert (code, stdout, stderr) == (0, "", "")


# ------------------------------------------------------------------------------- atomicity and --force


@needs_examples
def test_failure_midway_leaves_nothing_and_force_replaces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "rec"
    args = (EXAMPLES / "room/images", "--out", out, "--frames", 2, *SMALL)

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("disk on fire")

    with monkeypatch.context() as mp:
        mp.setattr(export, "write_colmap", broken)
        with pytest.raises(RuntimeError, match="disk on fire"):
            run_cli(*args)
        assert not out.exists()
        out.mkdir()
        (out / "keep.txt").write_text("previous result")
        with pytest.raises(RuntimeError, match="disk on fire"):
            run_cli(*args, "--force")
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["rec"]  # no staging folder left beside it

    code, _, stderr = run_cli(*args)
    assert code == 2 and "--force" in stderr and (out / "keep.txt").exists()
    code, _, stderr = run_cli(*args, "--force")
    assert code == 0, stderr
    assert not (out / "keep.txt").exists() and (out / "report.json").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["rec"]


# ----------------------------------------------------------------------------------------- error paths


def assert_user_error(result: tuple[int, str, str], *needles: str) -> str:
    code, stdout, stderr = result
    assert code == 2, stderr
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last
    return last


def test_missing_input(tmp_path: Path) -> None:
    assert_user_error(run_cli(tmp_path / "nope", "--out", tmp_path / "o", *SMALL), "input not found", "nope")
    assert not (tmp_path / "o").exists()


def test_verbose_adds_the_traceback(tmp_path: Path) -> None:
    code, _, stderr = run_cli(tmp_path / "nope", "--out", tmp_path / "o", "-v", *SMALL)
    assert code == 2 and "Traceback" in stderr and "input not found" in stderr.splitlines()[-1]


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    assert_user_error(run_cli(tmp_path / "in", "--out", tmp_path / "o", *SMALL), "is empty")


def test_non_image_files_are_all_named(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(folder / "a.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    message = assert_user_error(run_cli(folder, "--out", tmp_path / "o", *SMALL), "notes.txt", "broken.jpg", "2 file(s)")
    assert "a.png" not in message
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
def test_device_cuda_without_cuda(tmp_path: Path) -> None:
    result = run_cli(tmp_path, "--out", tmp_path / "o", "--device", "cuda", *SMALL)
    assert_user_error(result, "--device cuda", "CUDA is not available")


def test_output_must_not_be_or_contain_the_input(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    Image.new("RGB", (64, 48)).save(tmp_path / "in" / "a.png")
    for out in (tmp_path / "in", tmp_path):
        assert_user_error(run_cli(tmp_path / "in", "--out", out, "--force", *SMALL), "is or contains the input")
    assert (tmp_path / "in" / "a.png").exists()


def test_existing_output_needs_force(tmp_path: Path) -> None:
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("mine")
    assert_user_error(run_cli(tmp_path, "--out", tmp_path / "o", *SMALL), "not empty", "--force")
    assert (tmp_path / "o" / "x").read_text() == "mine"


@pytest.mark.parametrize(
    "argv, needle",
    [
        (("--frames", "2", "--stride", "2"), "not allowed with argument"),
        (("--frames", "0"), "must be a positive integer"),
        (("--stride", "x"), "must be a positive integer"),
        (("--conf-percentile", "101"), "between 0 and 100"),
        (("--weights", "w.pt"), "not allowed with argument"),  # with --random-weights
    ],
)
def test_bad_arguments(tmp_path: Path, argv: tuple[str, ...], needle: str) -> None:
    code, _, stderr = run_cli(tmp_path, "--out", tmp_path / "o", *argv, *SMALL)
    assert code == 2 and needle in stderr.strip().splitlines()[-1]


def test_without_torchvision_upstreams_loader_runs_with_the_stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / "a.png")
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes "import torchvision" raise ImportError
    monkeypatch.delitem(sys.modules, "vggt.utils.load_fn", raising=False)
    images = inputs.load_images([folder / "a.png"], mode="pad")
    assert sys.modules["torchvision"] is None  # the stand-in was visible to upstream's loader only
    assert images.shape == (1, 3, 518, 518) and 0.0 <= images.min() and images.max() <= 1.0
    code, _, err = run_cli(folder, "--out", tmp_path / "o", *SMALL)
    assert code == 0, err


def test_to_tensor_stand_in_is_torchvisions_conversion() -> None:
    rgb = np.random.default_rng(1).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    out = inputs.ToTensor()(Image.fromarray(rgb))
    assert out.dtype == torch.float32 and out.shape == (3, 5, 7)
    assert torch.equal(out, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    try:
        from torchvision.transforms import ToTensor
    except Exception:  # noqa: BLE001 - no importable torchvision here: the hand computation above must do
        return
    assert torch.equal(out, ToTensor()(Image.fromarray(rgb)))


def test_weights_file_not_found(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (64, 48)).save(folder / "a.png")
    assert_user_error(run_cli(folder, "--out", tmp_path / "o", "--weights", tmp_path / "model.pt"), "weights file not found")


def test_offline_hugging_face_suggests_local_or_random_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # nothing cached
    folder = tmp_path / "in"
    folder.mkdir()
    Image.new("RGB", (64, 48)).save(folder / "a.png")
    assert_user_error(run_cli(folder, "--out", tmp_path / "o", "--weights", "facebook/VGGT-1B"),
                      "facebook/VGGT-1B", "--weights PATH", "--random-weights")


def test_too_many_frames_for_the_memory_says_how_many_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    model = weights.plan(None, True, "small").skeleton  # what reconstruct checks: no weights allocated yet
    assert all(p.is_meta for p in model.parameters())
    fixed, per_frame = memory.activation_bytes(model, 518, 518, torch.bfloat16)
    free = memory.weight_bytes(model) + fixed + 10.5 * per_frame  # the weights are counted on the CPU too
    monkeypatch.setattr(memory, "available_bytes", lambda device: int(free))
    memory.check_fits(model, 10, 518, 518, torch.device("cpu"), torch.bfloat16)
    with pytest.raises(UserError, match=r"about 10 frames fit.*--frames 10") as caught:
        memory.check_fits(model, 11, 518, 518, torch.device("cpu"), torch.bfloat16)
    assert "--preset fast" not in str(caught.value)  # its approximations save time, not memory


# ------------------------------------------------------------------------------------- weights files


@needs_examples
def test_local_checkpoint(tmp_path: Path) -> None:
    model = build_vggt("small", seed=3)
    torch.save(model.state_dict(), tmp_path / "small.pt")
    out = tmp_path / "rec"
    code, stdout, stderr = run_cli(EXAMPLES / "room/images", "--out", out, "--frames", 2, "--weights",
                                   tmp_path / "small.pt", "--model-size", "small")
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["random_weights"] is False and "warning" not in report
    assert report["weights"] == str(tmp_path / "small.pt")
    assert "RANDOM WEIGHTS" not in stdout and "RANDOM WEIGHTS" not in (out / "sparse/cameras.txt").read_text()


def test_safetensors_checkpoint_loads_the_same_weights(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    model = build_vggt("small", seed=5, enable_track=False)
    save_file(model.state_dict(), str(tmp_path / "small.safetensors"))
    loaded = weights.load_model(str(tmp_path / "small.safetensors"), False, "small").model
    assert loaded.track_head is None
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name


def test_foreign_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.save({"layer.weight": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="does not hold upstream VGGT weights"):
        weights.load_model(str(tmp_path / "other.pt"), False, "small")


# ---------------------------------------------------------------------------------------------- video


def _frames(count: int) -> list[np.ndarray]:
    """Frames whose colour changes with the index, 64x48."""
    return [np.full((48, 64, 3), (10 * i, 255 - 10 * i, 128), dtype=np.uint8) for i in range(count)]


def test_video_with_opencv(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2", reason="OpenCV writes the test video (pip install opencv-python-headless)")
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    for frame in _frames(20):
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    out = tmp_path / "rec"
    code, _, stderr = run_cli(video, "--out", out, "--frames", 4, *SMALL)
    assert code == 0, stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["input_kind"], report["frames"], report["frames_in_input"]) == ("video", 4, 20)
    names = ["frame_000000.png", "frame_000006.png", "frame_000013.png", "frame_000019.png"]
    assert np.load(out / "predictions.npz")["image_names"].tolist() == names
    assert sorted(p.name for p in (out / "images").iterdir()) == names


def test_video_with_imageio_when_opencv_is_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("imageio", reason="imageio is the fallback decoder (pip install imageio)")
    monkeypatch.setitem(sys.modules, "cv2", None)
    gif = tmp_path / "clip.gif"
    first, *rest = [Image.fromarray(f) for f in _frames(5)]
    first.save(gif, save_all=True, append_images=rest, duration=100)
    out = tmp_path / "rec"
    code, _, stderr = run_cli(gif, "--out", out, "--stride", 2, *SMALL)
    assert code == 0, stderr
    assert np.load(out / "predictions.npz")["image_names"].tolist() == [f"frame_00000{i}.png" for i in (0, 2, 4)]


def test_video_without_a_decoder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("cv2", "imageio", "imageio.v3"):
        monkeypatch.setitem(sys.modules, name, None)
    (tmp_path / "clip.mp4").write_bytes(b"\x00" * 64)
    assert_user_error(run_cli(tmp_path / "clip.mp4", "--out", tmp_path / "o", *SMALL),
                      "no video decoder: pip install opencv-python-headless")


# -------------------------------------------------------------------------------------------- helpers


def test_colmap_leaves_out_degenerate_cameras(tmp_path: Path) -> None:
    pycolmap = pytest.importorskip("pycolmap")  # in the test extras (CI); a bare GPU machine may lack it

    extrinsics = np.tile(np.eye(4, dtype=np.float32)[:3], (3, 1, 1))
    extrinsics[:, 2, 3] = [1.0, 2.0, 3.0]
    intrinsics = np.tile(np.array([[50, 0, 28], [0, 50, 28], [0, 0, 1]], dtype=np.float32), (3, 1, 1))
    intrinsics[1, 0, 0] = np.inf  # a field of view of 0
    depth, conf = np.ones((3, 4, 4, 1), np.float32), np.ones((3, 4, 4), np.float32)
    colors = np.full((3, 4, 4, 3), 7, np.uint8)
    model = export.colmap_model(extrinsics, intrinsics, depth, conf, colors, ["a.png", "b.png", "c.png"], 56, 56, 1.0)
    assert (len(model.xyz), model.skipped) == (32, ["b.png"])  # frame b's 16 pixels are left out with it
    export.write_colmap(tmp_path, model)
    rec = pycolmap.Reconstruction(str(tmp_path))
    assert sorted(im.name for im in rec.images.values()) == ["a.png", "c.png"]
    assert {el.image_id for p in rec.points3D.values() for el in p.track.elements} == {1, 3}
    assert cam_from_world(rec.images[3]).translation.tolist() == [0.0, 0.0, 3.0]


def test_select_frames() -> None:
    assert selection.select(8, frames=3) == [0, 4, 7]
    assert selection.select(8, frames=20) == list(range(8))
    assert selection.select(8, stride=3) == [0, 3, 6]
    assert selection.select(5) == [0, 1, 2, 3, 4]


def test_quaternions_from_rotations_round_trip() -> None:
    rng = np.random.default_rng(0)
    q = rng.normal(size=(64, 4))
    q[:4] = [[0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]]  # 180-degree turns and the identity
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    q *= np.where(q[:, :1] < 0, -1, 1)
    w, x, y, z = q.T
    r = np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], -2)
    got = export.quaternions_from_rotations(r.astype(np.float32))
    sign = np.where(np.abs(got[:, 0]) < 1e-6, np.sign((got * q).sum(1)), 1)[:, None]  # w == 0: q and -q both valid
    np.testing.assert_allclose(got * sign, q, atol=1e-6)
