"""`vggt-turbo reconstruct` against what users actually feed it (issue #18): unusual image modes, awkward file
names, impossible outputs and checkpoints, Ctrl-C, damaged videos, offline downloads.

Each case must either give the model the image a viewer shows (checked against an independent conversion) or
end with exit code 2 and one line naming the problem, without a traceback and, where the problem can be seen
beforehand, without building the model (``no_model_build`` makes building it fail the test).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from test_reconstruct import SMALL, assert_user_error, cam_from_world, run_cli  # noqa: E402

from vggt_turbo.app import example_scene, export, inputs, reconstruct, weights  # noqa: E402
from vggt_turbo.random_model import build_vggt  # noqa: E402


@pytest.fixture
def no_model_build(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the model fails the test: the checks under test must refuse the run before it."""

    def refuse(self: weights.Plan) -> None:
        raise AssertionError("the model was built before the problem was reported")

    monkeypatch.setattr(weights.Plan, "build", refuse)


def noise(height: int = 48, width: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def folder_of(tmp_path: Path, images: dict[str, Image.Image]) -> Path:
    folder = tmp_path / "in"
    folder.mkdir(exist_ok=True)
    for name, img in images.items():
        img.save(folder / name)
    return folder


# ------------------------------------------------------------------ item 1: the image the user sees


def test_ordinary_images_reach_upstreams_loader_untouched(tmp_path: Path) -> None:
    """8-bit RGB (PNG, JPEG), RGBA and grey: the tensors are upstream's own, bit for bit."""
    rgba = np.concatenate([noise(), noise(seed=1)[..., :1]], axis=-1)
    folder = folder_of(tmp_path, {"a.png": Image.fromarray(noise()), "b.jpg": Image.fromarray(noise(seed=2)),
                                  "c.png": Image.fromarray(rgba, "RGBA"), "d.png": Image.fromarray(noise()[..., 0])})
    paths = sorted(folder.iterdir())
    for mode in ("crop", "pad"):
        ours = inputs.load_images(paths, mode)
        upstream = inputs.upstream_loader()([str(p) for p in paths], mode=mode)
        assert torch.equal(ours, upstream), mode


def _reference_png(tmp_path: Path, rgb: np.ndarray) -> Path:
    path = tmp_path / "reference.png"
    Image.fromarray(rgb.astype(np.uint8), "RGB").save(path)
    return path


def _gradient16(height: int = 48, width: int = 64) -> np.ndarray:
    return np.linspace(0, 65535, height * width).reshape(height, width).astype(np.uint16)


def test_16_bit_grey_is_scaled_not_clipped(tmp_path: Path) -> None:
    grey = _gradient16()
    path = tmp_path / "g16.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode.startswith("I")  # PIL reads it as 16-bit ("I;16")
    expected = np.repeat(np.round(grey / 257.0)[..., None], 3, axis=-1)  # the viewer's 8-bit image
    np.testing.assert_array_equal(np.asarray(inputs.as_viewed(Image.open(path))), expected)
    ours = inputs.load_images([path], "crop")
    assert torch.equal(ours, inputs.load_images([_reference_png(tmp_path, expected)], "crop"))
    assert 0.45 < ours.mean().item() < 0.55  # upstream's convert("RGB") gave 0.999 (almost white)


def test_16_bit_rgb_matches_its_8_bit_view(tmp_path: Path) -> None:
    cv2 = pytest.importorskip("cv2", reason="OpenCV writes the 16-bit RGB PNG")
    rgb = np.stack([_gradient16(), _gradient16()[::-1], _gradient16()[:, ::-1]], axis=-1)
    path = tmp_path / "c16.png"
    cv2.imwrite(str(path), rgb[..., ::-1])
    view = np.asarray(inputs.as_viewed(Image.open(path))).astype(int)
    assert np.abs(view - np.round(rgb / 257.0)).max() <= 1  # PIL keeps the high byte: at most one level off


def test_palette_and_grey_with_transparency_go_onto_white(tmp_path: Path) -> None:
    palette = Image.new("P", (64, 48), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 32, 48))  # left half blue, right half red...
    palette.info["transparency"] = 0  # ...and red is transparent
    palette.save(tmp_path / "p.png")
    expected = np.zeros((48, 64, 3), np.uint8)
    expected[:, :32] = (0, 0, 255)
    expected[:, 32:] = 255  # white, as upstream composites RGBA
    img = Image.open(tmp_path / "p.png")
    assert inputs.needs_conversion(img)
    np.testing.assert_array_equal(np.asarray(inputs.as_viewed(img)), expected)

    grey, alpha = noise()[..., 0].astype(np.float64), noise(seed=3)[..., 0].astype(np.float64)
    Image.fromarray(np.stack([grey, alpha], -1).astype(np.uint8), "LA").save(tmp_path / "la.png")
    over_white = np.repeat((grey * alpha / 255 + 255 * (1 - alpha / 255))[..., None], 3, axis=-1)
    view = np.asarray(inputs.as_viewed(Image.open(tmp_path / "la.png"))).astype(np.float64)
    assert np.abs(view - over_white).max() <= 1.0  # PIL's integer rounding


def test_cmyk_is_converted_as_a_viewer_does(tmp_path: Path) -> None:
    cmyk = noise(seed=4)
    cmyk = np.concatenate([cmyk, noise(seed=5)[..., :1]], axis=-1)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.jpg", quality=100)
    img = Image.open(tmp_path / "c.jpg")
    stored = np.asarray(img).astype(np.float64)  # the decoded CMYK values (JPEG is lossy)
    expected = (255 - stored[..., :3]) * (255 - stored[..., 3:]) / 255
    assert np.abs(np.asarray(inputs.as_viewed(img)).astype(np.float64) - expected).max() <= 1.0


def test_exif_rotation_is_applied(tmp_path: Path) -> None:
    img = Image.fromarray(noise(40, 64))
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    img.save(tmp_path / "r.jpg", exif=exif, quality=95)
    stored = Image.open(tmp_path / "r.jpg")
    assert inputs.needs_conversion(stored)
    view = inputs.as_viewed(stored)
    assert view.size == (40, 64)  # portrait, as a viewer shows it
    np.testing.assert_array_equal(np.asarray(view), np.rot90(np.asarray(stored), k=-1))
    images = inputs.load_images([tmp_path / "r.jpg"], "pad")
    assert images.shape == (1, 3, 518, 518) and (images[0, :, :, :90] == 1.0).all()  # 322 px wide, padded


@pytest.mark.parametrize("size, needle", [((4000, 50), "aspect ratio 80:1"), ((50, 4000), "aspect ratio 80:1"),
                                          ((10, 10), "too small: 10x10")])
def test_images_upstream_cannot_resize_are_refused_by_name(tmp_path: Path, no_model_build: None,
                                                           size: tuple[int, int], needle: str) -> None:
    folder = folder_of(tmp_path, {"ok.png": Image.fromarray(noise()), "bad one.png": Image.new("RGB", size)})
    message = assert_user_error(run_cli(folder, "--out", tmp_path / "o", *SMALL), "bad one.png", needle)
    assert "ok.png" not in message
    assert not (tmp_path / "o").exists()


def test_unsupported_colour_mode_is_refused_by_name(tmp_path: Path, no_model_build: None) -> None:
    Image.fromarray(np.ones((48, 64), np.float32)).save(folder_of(tmp_path, {}) / "float.tif")
    assert_user_error(run_cli(tmp_path / "in", "--out", tmp_path / "o", *SMALL), "float.tif", "colour mode F")


# ------------------------------------------------------------ item 2: outputs the next tool reads


def test_colmap_reads_back_every_awkward_name_and_pose(tmp_path: Path) -> None:
    import pycolmap

    names = ["my photo 1.png", "my_photo_1.png", "café ünïcode 写真.jpg", "tab\tand  spaces.png"]
    folder = folder_of(tmp_path, {n: Image.fromarray(noise(seed=i)) for i, n in enumerate(names)})
    out = tmp_path / "rec"
    code, _, stderr = run_cli(folder, "--out", out, *SMALL)
    assert code == 0, stderr
    npz = np.load(out / "predictions.npz")
    inputs_, saved = npz["input_names"].tolist(), npz["image_names"].tolist()
    assert inputs_ == sorted(names)
    assert len(set(saved)) == 4 and not any(c.isspace() for n in saved for c in n)
    assert "café_ünïcode_写真.jpg" in saved  # other characters are kept
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(saved)
    report = json.loads((out / "report.json").read_text())
    assert (report["image_names"], report["input_names"]) == (saved, inputs_)

    rec = pycolmap.Reconstruction(str(out / "sparse"))
    assert len(rec.images) == 4
    for image_id, image in rec.images.items():
        assert image.name == saved[image_id - 1]
        assert (out / "images" / image.name).is_file()
        np.testing.assert_allclose(cam_from_world(image).matrix(), npz["extrinsics"][image_id - 1], atol=1e-5)


def test_frames_beyond_the_input_says_what_it_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    folder = folder_of(tmp_path, {f"{i}.png": Image.fromarray(noise(seed=i)) for i in range(3)})
    with caplog.at_level(logging.WARNING):
        code, stdout, stderr = run_cli(folder, "--out", tmp_path / "o", "--frames", 1000, *SMALL)
    assert code == 0, stderr
    assert "--frames 1000: there are only 3 images in the folder; using all 3" in caplog.text
    assert "3 of 3" in stdout and "--frames 1000 asked, all 3 used" in stdout
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert (report["frames"], report["frames_in_input"], report["frames_requested"]) == (3, 3, 1000)


# ------------------------------------------------------- item 3: one line, before the model is built


def one_image(tmp_path: Path) -> Path:
    return folder_of(tmp_path, {"a.png": Image.fromarray(noise())})


def test_output_under_a_file_is_refused_first(tmp_path: Path, no_model_build: None) -> None:
    (tmp_path / "file.txt").write_text("x")
    assert_user_error(run_cli(one_image(tmp_path), "--out", tmp_path / "file.txt/sub/o", *SMALL), "is a file")


def test_output_folder_that_cannot_be_written_is_refused_first(tmp_path: Path, no_model_build: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*_: object, **__: object) -> str:  # root ignores permission bits: simulate what a user gets
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(export.tempfile, "mkdtemp", denied)
    assert_user_error(run_cli(one_image(tmp_path), "--out", tmp_path / "o", *SMALL), "cannot write in", "Permission denied")


def test_upstream_not_installed_is_one_line(tmp_path: Path, no_model_build: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vggt.utils.pose_enc", None)  # "import vggt.utils.pose_enc" raises ImportError
    assert_user_error(run_cli(one_image(tmp_path), "--out", tmp_path / "o", *SMALL),
                      "upstream VGGT is not installed", "requirements-upstream.txt", "local checkout")


def test_checkpoint_with_the_right_names_and_wrong_shapes(tmp_path: Path, no_model_build: None) -> None:
    state = build_vggt("small", enable_track=False).state_dict()
    state["aggregator.camera_token"] = torch.zeros(1, 2, 1, 32)
    torch.save(state, tmp_path / "wrong.pt")
    assert_user_error(run_cli(one_image(tmp_path), "--out", tmp_path / "o", "--weights", tmp_path / "wrong.pt",
                              "--model-size", "small"),
                      "wrong.pt", "not its shapes", "aggregator.camera_token (1, 2, 1, 32) instead of (1, 2, 1, 64)")


@pytest.mark.parametrize("content, needle", [
    (b"", "the file is empty"),
    (b"hello, not a checkpoint" * 8, "not a PyTorch or safetensors checkpoint"),
    (None, "Python objects besides tensors"),  # a pickle of arbitrary objects
])
def test_unreadable_checkpoint_is_one_line_without_torchs_advice(tmp_path: Path, no_model_build: None,
                                                                  content: bytes | None, needle: str) -> None:
    path = tmp_path / "bad.pt"
    if content is None:
        torch.save({"model": {"x": object()}}, path)
    else:
        path.write_bytes(content)
    message = assert_user_error(run_cli(one_image(tmp_path), "--out", tmp_path / "o", "--weights", path,
                                        "--model-size", "small"), "bad.pt", needle)
    assert "weights_only" not in message


def test_offline_download_retries_are_summarised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    import huggingface_hub
    from huggingface_hub.utils import LocalEntryNotFoundError

    def offline(*_: object, **__: object) -> None:
        for attempt in range(12):  # what huggingface_hub logs offline, twice per retry
            logging.getLogger("huggingface_hub.utils._http").warning("Retrying in %ds [Retry %d/5].", 1, attempt)
        raise LocalEntryNotFoundError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)  # what app.hub asks first
    with caplog.at_level(logging.WARNING):
        result = run_cli(one_image(tmp_path), "--out", tmp_path / "o", "--weights", "facebook/VGGT-1B")
    assert_user_error(result, "could not download", "facebook/VGGT-1B", "--weights PATH", "--random-weights")
    assert "Retrying" not in caplog.text and "Retrying" not in result[2]


def _interrupt(*_: object, **__: object) -> None:
    raise KeyboardInterrupt


@pytest.mark.parametrize("where", ["predict", "write_colmap"])
def test_ctrl_c_is_one_line_and_keeps_the_previous_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          where: str) -> None:
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("previous result")
    monkeypatch.setattr(*((reconstruct, "predict") if where == "predict" else (export, "write_colmap")), _interrupt)
    code, _, stderr = run_cli(one_image(tmp_path), "--out", out, "--force", *SMALL)
    assert code == 130
    assert stderr.strip().splitlines()[-1] == "vggt-turbo reconstruct: interrupted; previous output kept"
    assert "Traceback" not in stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in", "o"]  # no hidden staging folder


@pytest.mark.parametrize("previous", [True, False])
def test_failed_final_rename_leaves_a_real_output_and_no_hidden_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, previous: bool
) -> None:
    out = tmp_path / "o"
    if previous:
        out.mkdir()
        (out / "keep.txt").write_text("previous result")
    replace = os.replace

    def failing(src: os.PathLike, dst: os.PathLike) -> None:
        if ".partial-" in str(src):  # the staged output moving into place
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        replace(src, dst)

    monkeypatch.setattr(export.os, "replace", failing)
    assert_user_error(run_cli(one_image(tmp_path), "--out", out, "--force", *SMALL), "could not move the new output",
                      "previous output kept" if previous else "nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == (["in", "o"] if previous else ["in"])
    if previous:
        assert (out / "keep.txt").read_text() == "previous result"


def test_disk_full_while_writing_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*_: object, **__: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(export, "write_npz", full)
    assert_user_error(run_cli(one_image(tmp_path), "--out", tmp_path / "o", *SMALL), "No space left on device",
                      "nothing written")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_damaged_video_is_one_line_and_ffmpeg_stays_quiet(tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    cv2 = pytest.importorskip("cv2", reason="OpenCV writes and decodes the test video")
    video = tmp_path / "clip.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(40):
        writer.write(noise(seed=i))
    writer.release()
    data = bytearray(video.read_bytes())
    n = len(data)
    data[n // 3: n // 3 + n // 4] = np.random.default_rng(0).integers(0, 256, n // 4, dtype=np.uint8).tobytes()
    video.write_bytes(bytes(data))
    capfd.readouterr()
    result = run_cli(video, "--out", tmp_path / "o", "--frames", 8, *SMALL)
    assert_user_error(result, "clip.mp4", "the video is damaged", "the decoder reported")
    captured = capfd.readouterr()  # what reached the real file descriptors, past Python's sys.stderr
    assert "mpeg4 @" not in captured.err and "mpeg4 @" not in result[2]


# ------------------------------------------------------------ item 4: a main job that runs anywhere


def test_example_runs_from_any_folder_without_input_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's first command: no INPUT, no shared/ data, no network (small model here for speed)."""
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = run_cli("--example", "--out", "out", *SMALL)
    assert code == 0, stderr
    report = json.loads((tmp_path / "out/report.json").read_text())
    assert (report["input_kind"], report["frames"]) == ("example scene", example_scene.VIEWS)
    assert report["input_names"] == [f"view_{i}.png" for i in range(1, example_scene.VIEWS + 1)]
    assert "example scene example-room" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the rendered views were temporary


def test_example_scene_is_a_textured_deterministic_scene() -> None:
    first, again = example_scene.render(2, 128, 96), example_scene.render(2, 128, 96)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert first[0].shape == (96, 128, 3) and first[0].dtype == np.uint8
    assert not np.array_equal(first[0], first[1])  # the cameras moved
    assert len(np.unique(first[0].reshape(-1, 3), axis=0)) > 500  # texture, not flat colour


def test_input_or_example_exactly_one(tmp_path: Path) -> None:
    assert_user_error(run_cli("--out", tmp_path / "o", *SMALL), "no INPUT", "--example")
    assert_user_error(run_cli(tmp_path, "--example", "--out", tmp_path / "o", *SMALL), "not both")


def test_readme_install_and_main_command_work_from_a_fresh_clone() -> None:
    """The README's commands: torch lines within the supported range (CPU and CUDA), upstream's install with the
    local-checkout alternative at the pinned commit, and a main command that needs no file beside the clone."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    install = readme[readme.index("## Install"):readme.index("## The two commands")]
    torch_lines = re.findall(r"pip install torch==(\d+)\.(\d+)\.\d+ --index-url https://download\.pytorch\.org/whl/(\w+)",
                             install)
    assert {kind[:2] for *_, kind in torch_lines} == {"cp", "cu"}
    assert all((2, 3) <= (int(major), int(minor)) <= (2, 13) for major, minor, _ in torch_lines)
    pinned = (root / "requirements-upstream.txt").read_text().split("@")[-1].strip()
    assert f"git -C vggt checkout {pinned}" in install and "pip install --no-deps ./vggt" in install
    assert "VGGT_SRC=" in install and "numpy<2" in install and "opencv-python" in install

    commands = readme[readme.index("## The two commands"):readme.index("**Run the tests**")]
    assert "shared/" not in commands
    assert "$ vggt-turbo reconstruct --example --out out/ --random-weights" in commands


def test_32_bit_integer_image_beyond_16_bits_is_refused_by_name(tmp_path: Path, no_model_build: None) -> None:
    Image.fromarray(np.full((48, 64), 1 << 20, np.int32)).save(folder_of(tmp_path, {}) / "deep.tif")
    assert_user_error(run_cli(tmp_path / "in", "--out", tmp_path / "o", *SMALL), "deep.tif", "outside 0..65535")


@pytest.mark.parametrize("memory", [None, "200"])
def test_out_of_memory_in_the_forward_is_one_line_with_advice_and_nothing_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, memory: str) -> None:
    def exhausted(*_: object, **__: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(reconstruct, "predict", exhausted)
    extra = () if memory is None else ("--memory", memory)
    message = assert_user_error(run_cli(one_image(tmp_path), "--out", tmp_path / "o", *SMALL, *extra),
                                "out of memory on cpu with 1 frames at")
    if memory is None:  # the CPU without a plan: the rough advice
        assert "Use fewer frames" in message
    else:  # planned as fitting in 200 GiB, out of memory all the same: the planner's advice
        assert "200 GiB" in message, message
    assert not (tmp_path / "o").exists()


def test_an_error_that_is_not_memory_passes_through_unchanged() -> None:
    from vggt_turbo.app import fit

    assert fit.out_of_memory_error(RuntimeError("shape mismatch"), None, "exact", "cpu") is None
    cpu = fit.out_of_memory_error(RuntimeError("DefaultCPUAllocator: can't allocate memory"), None, "exact", "cpu")
    assert cpu is not None and str(cpu).startswith("out of memory on cpu: Use fewer frames")
