"""``app.preview_process``: preview.png drawn by a worker process is the same file as drawn in-process; the worker
imports no torch; drawing errors come back as themselves; a worker that cannot start or dies falls back to drawing
in this process; nothing outlives ``started``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vggt_turbo.app import preview, preview_process
from vggt_turbo.app.preview_inputs import preview_inputs


def scene(points: int = 3000, frames: int = 3) -> tuple:
    """(xyz, rgb, extrinsics, intrinsics, frames, depth, names) of a small plausible reconstruction."""
    rng = np.random.default_rng(0)
    xyz = rng.standard_normal((points, 3)).astype(np.float32) + [0, 0, 4]
    rgb = rng.integers(0, 256, (points, 3), dtype=np.uint8)
    extrinsics = np.tile(np.eye(4, dtype=np.float32)[:3], (frames, 1, 1))
    extrinsics[:, 0, 3] = np.linspace(-0.5, 0.5, frames)
    intrinsics = np.tile(np.array([[30.0, 0, 16], [0, 30, 12], [0, 0, 1]], np.float32), (frames, 1, 1))
    images = rng.integers(0, 256, (frames, 24, 32, 3), dtype=np.uint8)
    depth = rng.uniform(1, 5, (frames, 24, 32, 1)).astype(np.float32)
    return xyz, rgb, extrinsics, intrinsics, images, depth, [f"f{i}.png" for i in range(frames)]


def test_the_worker_draws_the_same_file_as_this_process(tmp_path: Path) -> None:
    args = scene()
    preview.render(tmp_path / "here.png", preview_inputs(*args, notes=["RANDOM WEIGHTS"]))
    with preview_process.started() as previews:
        assert previews.running
        previews.render_preview(tmp_path / "there.png", *args, notes=["RANDOM WEIGHTS"])
        previews.render_preview(tmp_path / "again.png", *args)  # a second job on the same worker
        assert previews.running
    assert (tmp_path / "there.png").read_bytes() == (tmp_path / "here.png").read_bytes()
    preview.render(tmp_path / "plain.png", preview_inputs(*args))
    assert (tmp_path / "again.png").read_bytes() == (tmp_path / "plain.png").read_bytes()


def test_the_worker_imports_no_torch() -> None:
    """What the worker imports, as the worker's bootstrap imports it (this package's root first on the path)."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import vggt_turbo.app.preview_process, "
            "vggt_turbo.app.preview, json; print(json.dumps(sorted(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code, preview_process._PACKAGE_ROOT], capture_output=True, text=True,
                          check=True)
    loaded = set(json.loads(done.stdout))
    assert "PIL.Image" in loaded
    assert "torch" not in loaded


def test_a_drawing_error_comes_back_as_itself_with_the_workers_traceback(tmp_path: Path) -> None:
    with preview_process.started() as previews:
        with pytest.raises(FileNotFoundError) as raised:
            previews.render_preview(tmp_path / "missing" / "p.png", *scene())
        assert previews.running  # the worker survives a failed job
        previews.render_preview(tmp_path / "p.png", *scene())
    assert (tmp_path / "p.png").stat().st_size > 0
    if sys.version_info >= (3, 11):
        assert "in the preview's worker process" in raised.value.__notes__[0]


def test_no_worker_means_drawing_here(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "no-python"))
    with preview_process.started() as previews:
        assert not previews.running
        previews.render_preview(tmp_path / "p.png", *scene())
    preview.render(tmp_path / "ref.png", preview_inputs(*scene()))
    assert (tmp_path / "p.png").read_bytes() == (tmp_path / "ref.png").read_bytes()


def test_a_worker_that_died_means_drawing_here(tmp_path: Path) -> None:
    with preview_process.started() as previews:
        proc = previews._proc
        assert proc is not None
        proc.kill()
        proc.wait()
        previews.render_preview(tmp_path / "p.png", *scene())
        assert not previews.running
    preview.render(tmp_path / "ref.png", preview_inputs(*scene()))
    assert (tmp_path / "p.png").read_bytes() == (tmp_path / "ref.png").read_bytes()


def test_a_worker_whose_output_is_not_the_protocol_means_drawing_here(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Something in the worker's start-up (a sitecustomize, a start-up file) prints to its stdout."""
    printing = "print('Matplotlib is building the font cache'); " + preview_process._BOOTSTRAP
    monkeypatch.setattr(preview_process, "_BOOTSTRAP", printing)
    with preview_process.started() as previews:
        previews.render_preview(tmp_path / "p.png", *scene())
        assert not previews.running
    preview.render(tmp_path / "ref.png", preview_inputs(*scene()))
    assert (tmp_path / "p.png").read_bytes() == (tmp_path / "ref.png").read_bytes()


def test_the_worker_ends_with_the_block_also_on_an_error() -> None:
    with pytest.raises(KeyError):
        with preview_process.started() as previews:
            proc = previews._proc
            raise KeyError("a phase failed")
    assert proc is not None and proc.poll() is not None
    previews.close()  # idempotent


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="reads the worker's environment from /proc")
def test_the_worker_runs_one_blas_thread_unless_the_user_chose(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    with preview_process.started() as previews:
        assert previews._proc is not None
        environ = _environ(previews._proc.pid)
    assert b"OPENBLAS_NUM_THREADS=1" in environ and b"OMP_NUM_THREADS=3" in environ


def _environ(pid: int) -> list[bytes]:
    """A process's environment from /proc: empty for a moment while it is being exec'd, so read until it is not."""
    deadline = time.monotonic() + 10
    while not (data := Path(f"/proc/{pid}/environ").read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.01)
    return data.split(b"\0")
