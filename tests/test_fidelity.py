"""The fidelity harness: its metrics on hand-built cameras and maps, and one end-to-end run of ``vggt-turbo fidelity``
on the small model on the CPU (random weights, which it must say)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vggt_turbo import cli
from vggt_turbo.app.weights import load_model
from vggt_turbo.bench import fidelity, fidelity_cli
from vggt_turbo.config import FAST_GLOBAL_TO_FRAME_LAYERS, FAST_KV_SUBSAMPLE, PRESETS
from vggt_turbo.random_model import random_images

ROOT = Path(__file__).resolve().parents[1]
HW = (60, 80)  # image height, width of the hand-built cameras


def pose_enc(translation: list[float], axis: list[float], degrees: float, focal: float) -> torch.Tensor:
    """A (1, 1, 9) ``pose_enc``: translation, a rotation of ``degrees`` about ``axis`` as an (x, y, z, w)
    quaternion, and the fields of view of a camera of focal length ``focal`` px (fx = fy) in an ``HW`` image."""
    half = math.radians(degrees) / 2
    axis_t = torch.tensor(axis, dtype=torch.float64)
    quat = torch.cat([axis_t / axis_t.norm() * math.sin(half), torch.tensor([math.cos(half)], dtype=torch.float64)])
    fov = [2 * math.atan(HW[0] / 2 / focal), 2 * math.atan(HW[1] / 2 / focal)]
    parts = [torch.tensor(translation, dtype=torch.float64), quat, torch.tensor(fov, dtype=torch.float64)]
    return torch.cat(parts)[None, None]


def test_identical_cameras_have_no_error() -> None:
    pose = torch.cat([pose_enc([1, 2, 3], [0.3, -1, 2], 40, 70), pose_enc([0, 0, 1], [1, 0, 0], 5, 90)], dim=1)
    assert all(v == pytest.approx(0, abs=1e-9) for v in fidelity.camera_errors(pose, pose.clone(), HW).values())


def test_known_camera_differences() -> None:
    """30° more rotation about the same axis, a translation turned by 90°, a focal length 10 % longer."""
    got = fidelity.camera_errors(pose_enc([1, 0, 0], [1, 2, 3], 50, 110), pose_enc([0, 2, 0], [1, 2, 3], 20, 100), HW)
    assert got["rotation_deg_mean"] == pytest.approx(30) and got["rotation_deg_max"] == pytest.approx(30)
    assert got["translation_dir_deg_max"] == pytest.approx(90)
    assert got["focal_rel_max"] == pytest.approx(0.1)


def test_max_and_mean_over_frames() -> None:
    ref = torch.cat([pose_enc([0, 0, 1], [0, 0, 1], 0, 100)] * 2, dim=1)
    pred = torch.cat([pose_enc([0, 0, 1], [0, 0, 1], 10, 100), pose_enc([0, 0, 1], [0, 1, 0], 170, 100)], dim=1)
    got = fidelity.camera_errors(pred, ref, HW)
    assert (got["rotation_deg_mean"], got["rotation_deg_max"]) == (pytest.approx(90), pytest.approx(170))
    assert fidelity.pose_rotation_errors_deg(pred, ref).flatten().tolist() == [pytest.approx(10), pytest.approx(170)]


def test_small_rotation_angles_are_not_lost_to_rounding() -> None:
    """1e-4°: an arccos of the trace would return 0 in float32 and a coarse value in float64."""
    pred, ref = pose_enc([0, 0, 1], [1, 1, 0], 1e-4, 100), pose_enc([0, 0, 1], [1, 1, 0], 0, 100)
    small = fidelity.pose_rotation_errors_deg(pred, ref)
    assert small.item() == pytest.approx(1e-4, rel=1e-3)


def test_dense_map_errors() -> None:
    ref = torch.tensor([3.0, 4.0, 0.0, 1.0])
    assert fidelity.relative_error(ref, ref) == 0 and fidelity.median_abs_error(ref, ref) == 0
    pred = ref + torch.tensor([0.0, 0.0, 0.1, 0.3])
    assert fidelity.relative_error(pred, ref) == pytest.approx(math.hypot(0.1, 0.3) / math.sqrt(26))
    assert fidelity.median_abs_error(pred, ref) == pytest.approx(0.0)  # sorted |a - b|: 0, 0, 0.1, 0.3 -> lower median
    got = fidelity.compare({"depth": pred, "world_points": pred, "pose_enc": pose_enc([0, 0, 1], [1, 0, 0], 0, 50)},
                           {"depth": ref, "world_points": ref, "pose_enc": pose_enc([0, 0, 1], [1, 0, 0], 0, 50)}, HW)
    assert got["depth_rel"] == got["world_points_rel"] > 0 and got["rotation_deg_max"] == 0


def test_rows_read_against_fp32_after_the_noise_floor() -> None:
    """Reference: upstream in fp32. First rows: upstream under bf16 autocast (the floor) and exact; an
    approximation lands above the floor; upstream's fp32 outputs themselves give exactly 0 (the harness compares
    the right outputs)."""
    model = load_model(None, random_weights=True, size="small").model  # finite random focal lengths
    cases = fidelity.synthetic_inputs([2], "small")
    reference, _ = fidelity.predict(model, cases[0].images, None, 0, autocast=False)
    assert all(fidelity.relative_error(v, reference[k]) == 0 for k, v in
               fidelity.predict(model, cases[0].images, None, 0, autocast=False)[0].items())
    rows = fidelity.measure(model, cases, {"fast": PRESETS["fast"]}, repeats=1)
    assert [r["variant"] for r in rows] == [fidelity.UPSTREAM, "exact", "fast"]
    metrics = [k for k in rows[0] if k.endswith(("_rel", "_abs", "_mean", "_max"))]
    assert len(metrics) == 10
    floor, exact, fast = rows
    assert 0 < floor["depth_rel"] < 1e-2 and floor["rotation_deg_max"] > 0  # bf16 autocast moves upstream
    assert exact["depth_rel"] <= 1.25 * floor["depth_rel"]
    assert fast["rotation_deg_max"] > floor["rotation_deg_max"] and fast["seconds"] is None


def test_example_scenes_shrunk_for_the_small_model(tmp_path: Path) -> None:
    """A scene folder of 3 images of 100 x 70 px: 2 of them evenly spaced, at the small model's 4-patch width."""
    from PIL import Image

    (tmp_path / "scene" / "images").mkdir(parents=True)
    for i in range(3):
        Image.fromarray((random_images(1, size=100, seed=i)[0, 0, :, :70].permute(1, 2, 0) * 255).byte().numpy()).save(
            tmp_path / "scene" / "images" / f"{i}.png"
        )
    (case,) = fidelity.example_inputs(tmp_path, [2, 5], "small")
    assert case.name == "scene" and case.images.shape == (1, 2, 3, 42, 56)  # 518 x 728 by upstream's crop -> 56 x 42


def test_command_line_end_to_end(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "fidelity.json"
    argv = ["fidelity", "--device", "cpu", "--size", "small", "--frames", "2", "--variants", "fast,kv_subsample_2",
            "--inputs", "synthetic", "--out", str(out)]
    with caplog.at_level("WARNING"):
        assert cli.main(argv) == 0
    assert "RANDOM WEIGHTS" in caplog.text
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert meta["random_weights"] is True and "not evidence of accuracy" in meta["note"]
    assert meta["size"] == "small" and meta["device"] == "cpu" and meta["autocast"] == "bfloat16"
    assert "fp32" in meta["reference"]
    fast = data["variants"]["fast"]
    assert fast["kv_subsample"] == FAST_KV_SUBSAMPLE and fast["global_to_frame_layers"] == list(FAST_GLOBAL_TO_FRAME_LAYERS)
    cases = [(r["variant"], r["input"], r["frames"]) for r in data["rows"]]
    assert cases == [(v, "synthetic", 2) for v in (fidelity.UPSTREAM, "exact", "fast", "kv_subsample_2")]
    keys = {"depth_rel", "depth_median_abs", "world_points_rel", "world_points_median_abs", "rotation_deg_mean",
            "rotation_deg_max", "translation_dir_deg_mean", "translation_dir_deg_max", "focal_rel_mean",
            "focal_rel_max"}
    for row in data["rows"]:
        assert keys <= row.keys() and all(isinstance(row[k], float) for k in keys), row
        assert row["depth_rel"] > 0 and row["rotation_deg_max"] > 0  # approximations: they do change the outputs
        assert row["seconds"] is None and row["speedup"] is None  # timed on CUDA only


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--variants", "fast,nope"], "unknown variant"),
        (["--weights", "/nonexistent/model.pt"], "does not exist"),
        (["--inputs", "photos"], "--inputs takes"),
        (["--inputs", "examples", "--examples", "/nonexistent"], "no example scenes"),
    ],
)
def test_bad_arguments_say_why(argv: list[str], message: str, caplog: pytest.LogCaptureFixture) -> None:
    assert fidelity_cli.main(["--device", "cpu", "--frames", "1", *argv]) == 2
    assert message in caplog.text


def test_script_runs() -> None:
    script = ROOT / "benchmarks" / "fidelity.py"
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "--weights" in done.stdout
