"""images/ encoded while the model runs (``app.frames_ahead``, ``export.encode_image``): the files PIL writes at
those settings, byte for byte; a failure before the export cancels the encoding, leaves no thread and writes
nothing."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vggt_turbo.app import export
from vggt_turbo.app.export import encode_image
from vggt_turbo.app.frames_ahead import FramesAhead

from test_reconstruct import SMALL, run_cli


def frames(count: int = 5) -> np.ndarray:
    rng = np.random.default_rng(0)
    smooth = np.linspace(0, 255, 40 * 52 * 3).reshape(40, 52, 3)
    return np.stack([np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8) for _ in range(count)])


@pytest.mark.parametrize("name", ["a.png", "b.jpg", "c.JPEG", "photo.tif.png"])
def test_encoded_bytes_are_the_written_file(tmp_path: Path, name: str) -> None:
    rgb = frames(1)[0]
    Image.fromarray(rgb).save(tmp_path / name, quality=95, compress_level=1)  # PIL writing the file itself
    assert encode_image(rgb, name) == (tmp_path / name).read_bytes()
    export.write_image(tmp_path / f"again-{name}", rgb)
    assert (tmp_path / f"again-{name}").read_bytes() == (tmp_path / name).read_bytes()


def test_frames_are_written_in_any_order(tmp_path: Path) -> None:
    colors = frames()
    names = [f"f{i}.png" for i in range(len(colors))]
    with FramesAhead(colors, names) as ahead:
        for index in reversed(range(len(colors))):
            ahead.write(tmp_path, index)
    for rgb, name in zip(colors, names):
        assert (tmp_path / name).read_bytes() == encode_image(rgb, name)


def test_leaving_early_cancels_and_leaves_no_thread() -> None:
    with pytest.raises(RuntimeError, match="model failed"):
        with FramesAhead(frames(40), [f"f{i}.png" for i in range(40)]):
            raise RuntimeError("model failed")
    assert not [t for t in threading.enumerate() if t.name.startswith("vggt-turbo-frames")]


def test_reconstruct_failing_at_inference_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vggt_turbo.app import reconstruct

    def broken(*_: object, **__: object) -> None:
        raise RuntimeError("inference failed")

    monkeypatch.setattr(reconstruct, "predict", broken)
    with pytest.raises(RuntimeError, match="inference failed"):
        run_cli("--example", "--out", tmp_path / "rec", *SMALL)
    assert list(tmp_path.iterdir()) == []
    assert not [t for t in threading.enumerate() if t.name.startswith("vggt-turbo-frames")]
