"""The ``vggt-turbo`` process: ``cli.run`` ends it without the interpreter's teardown (most of a second of a
one-shot command), so what a command writes must be complete when ``main`` returns: its files, its output streams
(block-buffered when piped), its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def vggt_turbo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vggt_turbo.cli", *args], capture_output=True, text=True, timeout=300)


def test_the_console_script_is_run() -> None:
    scripts = (ROOT / "pyproject.toml").read_text().split("[project.scripts]\n", 1)[1].split("\n\n", 1)[0]
    assert scripts.strip() == 'vggt-turbo = "vggt_turbo.cli:run"'


def test_piped_output_arrives_whole() -> None:
    done = vggt_turbo("plan", "--frames", "10")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("10 frames at 518x392") and lines[-1].startswith("fast + offload")


def test_a_user_error_keeps_its_exit_code_and_line(tmp_path: Path) -> None:
    done = vggt_turbo("reconstruct", str(tmp_path / "missing"), "--out", str(tmp_path / "out"), "--random-weights")
    assert done.returncode == 2 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and "missing" in done.stderr
    assert vggt_turbo("plan").returncode == 2  # argparse's usage error: SystemExit, the ordinary way


def test_reconstruct_files_are_complete_when_the_process_ends(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = vggt_turbo("reconstruct", "--example", "--out", str(out), "--random-weights", "--model-size", "small",
                      "--device", "cpu", "--export", "ply,colmap,nerfstudio")
    assert done.returncode == 0, done.stderr
    assert "vggt-turbo reconstruct: done in" in done.stdout and str(out) in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["frames"] == 4
    for name in ("predictions.npz", "points.ply", "preview.png", "transforms.json", "sparse/0/points3D.bin"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "points.ply", "rb") as f:
        header = f.read(400).split(b"end_header\n")[0].decode()
    count = int(next(line.split()[-1] for line in header.splitlines() if line.startswith("element vertex")))
    assert (out / "points.ply").stat().st_size == len(header) + len("end_header\n") + count * 15  # xyz f4, rgb u1


def test_a_reader_that_goes_away_ends_it_quietly() -> None:
    """``vggt-turbo plan | head -1``: the pipe is closed before the command writes (it is still importing torch)."""
    child = subprocess.Popen([sys.executable, "-m", "vggt_turbo.cli", "plan", "--frames", "10", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    child.stdout.close()
    stderr = child.stderr.read()
    assert child.wait(timeout=300) == 1 and "Traceback" not in stderr and "Broken pipe" not in stderr, stderr
