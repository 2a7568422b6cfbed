"""The parallel loader (issue #20 item 1) gives upstream's ``load_and_preprocess_images`` tensors bit for bit.

Upstream's loader is the reference, called on the same files: the example scenes (when the shared data is
there), synthetic images of odd sizes and modes in both preprocessing modes, folders of mixed shapes (padded
to the largest), and video frames that upstream would read as lossless PNGs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))

from test_reconstruct import EXAMPLES  # noqa: E402

from vggt_turbo.app import inputs  # noqa: E402
from vggt_turbo.app.errors import UserError  # noqa: E402

# (width, height): under and over 518 px, odd, portrait and landscape, rounding up and down to 14 px, taller
# than 518 px after the resize (the crop), and at the 8:1 aspect limit.
ODD_SIZES = [(64, 48), (97, 61), (517, 519), (519, 517), (130, 1000), (1000, 130), (333, 777), (1280, 960), (15, 14),
             (800, 100), (100, 800)]


def upstream(paths: list[Path], mode: str) -> torch.Tensor:
    return inputs.upstream_loader()([str(p) for p in paths], mode=mode)


def _noise(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def _odd_files(folder: Path) -> list[Path]:
    folder.mkdir(exist_ok=True)
    paths = []
    for i, (w, h) in enumerate(ODD_SIZES):
        rgb = _noise(w, h, i)
        kind = i % 5
        if kind == 0:
            img, name = Image.fromarray(rgb), f"{i:02d}.png"
        elif kind == 1:
            img, name = Image.fromarray(rgb), f"{i:02d}.jpg"
        elif kind == 2:
            img, name = Image.fromarray(rgb[..., 0]), f"{i:02d}.png"  # grey
        elif kind == 3:
            alpha = _noise(w, h, 100 + i)[..., :1]
            img, name = Image.fromarray(np.concatenate([rgb, alpha], -1), "RGBA"), f"{i:02d}.png"
        else:
            img, name = Image.fromarray(rgb).convert("P"), f"{i:02d}.png"  # opaque palette
        img.save(folder / name)
        paths.append(folder / name)
    return paths


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_each_odd_image_is_upstreams_tensor(tmp_path: Path, mode: str) -> None:
    for path in _odd_files(tmp_path / "odd"):
        ours = inputs.load_images([path], mode)
        assert ours.dtype == torch.float32 and ours.dim() == 4
        assert torch.equal(ours, upstream([path], mode)), (path.name, mode)


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_a_folder_of_mixed_shapes_is_upstreams_batch(tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture) -> None:
    paths = _odd_files(tmp_path / "odd")
    ours = inputs.load_images(paths, mode)
    assert torch.equal(ours, upstream(paths, mode))
    if mode == "crop":  # widths are all 518, heights differ: padded to the tallest, as upstream says
        assert "different shapes" in caplog.text


@pytest.mark.skipif(EXAMPLES is None, reason="upstream's example images are not in the shared data")
@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_the_example_scenes_are_upstreams_tensors(mode: str) -> None:
    assert EXAMPLES is not None
    paths = sorted((EXAMPLES / "room/images").iterdir()) + sorted((EXAMPLES / "llff_fern/images").iterdir())
    ours = inputs.load_images(paths, mode)
    assert ours.shape[0] == len(paths) >= 28
    assert torch.equal(ours, upstream(paths, mode))


@pytest.mark.parametrize("mode", ["crop", "pad"])
def test_video_frames_are_what_upstream_reads_from_lossless_pngs(tmp_path: Path, mode: str) -> None:
    frames = [(i * 3, _noise(160, 90 + i, i)) for i in range(5)]  # heights differ: exercises the batch padding
    images, indices = inputs.load_frames(iter(frames), mode)
    assert indices == [0, 3, 6, 9, 12]
    pngs = []
    for index, rgb in frames:
        pngs.append(tmp_path / f"frame_{index:06d}.png")
        Image.fromarray(rgb).save(pngs[-1])
    assert torch.equal(images, upstream(pngs, mode))


def test_no_frames_gives_an_empty_batch() -> None:
    images, indices = inputs.load_frames(iter([]), "crop")
    assert indices == [] and images.shape[0] == 0


def test_load_folder_names_every_bad_file_and_reports_each_file_once(tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", "c.png", "e.png"):
        Image.fromarray(_noise(64, 48, 0)).save(folder / name)
    (folder / "b.png").write_bytes(b"not an image")
    Image.fromarray(_noise(400, 20, 1)).save(folder / "d.png")  # 20:1 aspect ratio
    files = inputs.list_images(folder)
    seen: list[str] = []
    with pytest.raises(UserError) as caught:
        inputs.load_folder(files, list(range(len(files))), "crop", seen.append)
    assert "b.png (not an image)" in str(caught.value) and "d.png (aspect ratio" in str(caught.value)
    assert seen == [p.name for p in files]
    # Files that are not used are identified only (a non-image is still named), never decoded or preprocessed.
    with pytest.raises(UserError, match=r"1 file\(s\).*b\.png"):
        inputs.load_folder(files, [0, 2, 4], "crop")
    ok = [f for f in files if f.name in ("a.png", "c.png", "e.png")]
    assert inputs.load_folder(ok, [0, 2], "pad").shape == (2, 3, 518, 518)


def test_the_loader_uses_a_thread_per_core() -> None:
    assert 1 <= inputs.workers() <= (__import__("os").cpu_count() or 1)
