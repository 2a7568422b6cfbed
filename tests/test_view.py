"""``vggt-turbo view``: the folder check, the scene it loads, and the page in a real headless browser.

The browser test runs the viewer as a separate process on a free loopback port, takes a screenshot with headless
Chromium (software WebGL) and looks for the points' colour in it. It skips, saying why, where viser or Chromium
is not installed (Debian: apt-get install chromium). Every wait is bounded and the server is always stopped.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vggt_turbo
from test_reconstruct import SMALL, run_cli
from vggt_turbo import cli
from vggt_turbo.app import view

POINT_COLOUR = (255, 170, 0)  # orange: neither viser's white background, its grey GUI nor a frustum's colour


@pytest.fixture(scope="module")
def orange(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A reconstruct output of two plain orange frames (the small random model: the geometry means nothing,
    but every point is orange, which a screenshot can find)."""
    folder = tmp_path_factory.mktemp("view")
    (folder / "in").mkdir()
    for i in range(2):
        Image.new("RGB", (64, 64), POINT_COLOUR).save(folder / "in" / f"{i}.png")
    code, _, stderr = run_cli(folder / "in", "--out", folder / "rec", "--export", "ply", *SMALL)
    assert code == 0, stderr
    return folder / "rec"


def run_view(*argv: object, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = cli.main(["view", *map(str, argv)])
    return code, capsys.readouterr().err


def test_load_reads_points_colours_and_cameras(orange: Path) -> None:
    scene = view.load(orange)
    d = np.load(orange / "predictions.npz")
    assert len(scene.points) == d["world_points"][..., 0].size  # the random model's points are all finite
    np.testing.assert_array_equal(scene.points, d["world_points"].reshape(-1, 3))
    assert (scene.colours == POINT_COLOUR).all()
    assert scene.frame_of_point.tolist() == [0] * (len(scene.points) // 2) + [1] * (len(scene.points) // 2)
    assert scene.names == ["0.png", "1.png"] and scene.random_weights is True
    assert scene.images.shape == (2, *d["world_points"].shape[1:3], 3)


def test_not_a_reconstruct_folder_is_a_one_line_error(tmp_path: Path, orange: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, err = run_view(tmp_path / "absent", capsys=capsys)
    assert code == 2 and err.strip() == f"vggt-turbo view: error: {tmp_path / 'absent'} is not a folder " \
                                       "(give the --out folder of vggt-turbo reconstruct)"
    code, err = run_view(tmp_path, capsys=capsys)
    assert code == 2 and "not a vggt-turbo reconstruct output: it has no predictions.npz" in err
    np.savez(tmp_path / "predictions.npz", depth=np.zeros(3))
    code, err = run_view(tmp_path, capsys=capsys)
    assert code == 2 and "lacks extrinsics, intrinsics, world_points, world_points_conf, image_names" in err

    copy = tmp_path / "copy"
    shutil.copytree(orange, copy)
    (copy / "images" / "1.png").unlink()
    code, err = run_view(copy, capsys=capsys)
    assert code == 2 and "1.png is missing" in err and len(err.strip().splitlines()) == 1


def test_without_viser_says_how_to_install_it(orange: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "viser", None)  # makes `import viser` raise ImportError
    code, err = run_view(orange, capsys=capsys)
    assert code == 2 and "pip install 'vggt-turbo[view]'" in err


def _chromium() -> str | None:
    return next((path for name in ("chromium", "chromium-browser", "google-chrome")
                 if (path := shutil.which(name))), None)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert server.poll() is None, server.communicate()[0]
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"the viewer did not listen on port {port} within {timeout} s")


def _orange_pixels(pixels: np.ndarray) -> int:
    """Orange points in the 3-D view, between the notice (top left, an orange bar), the axes (bottom left) and the
    panel (right). Points are shaded and blended with the white background, so look for their hue, not their exact
    colour: red highest, green well above blue (a red or cyan frustum, grey or white are not that)."""
    r, g, b = pixels[150:700, 320:940].transpose(2, 0, 1)
    return int(((r > 200) & (r - g > 20) & (g - b > 40)).sum())


def _panel_labels(pixels: np.ndarray) -> int:
    """Dark pixels where the controls sit under the panel's header (dark labels on white)."""
    return int((pixels[60:500, 950:1260].sum(axis=-1) < 150).sum())


def _rendered(pixels: np.ndarray) -> bool:
    return _orange_pixels(pixels) > 500 and _panel_labels(pixels) > 400


def test_page_shows_the_points_in_headless_chromium(orange: Path, tmp_path: Path) -> None:
    pytest.importorskip("viser", reason="the viewer's extra is not installed (pip install 'vggt-turbo[view]')")
    browser = _chromium()
    if browser is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium)")
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(vggt_turbo.__file__).parents[1]),
                                                       os.environ.get("PYTHONPATH", "")]))
    server = subprocess.Popen([sys.executable, "-m", "vggt_turbo.cli", "view", str(orange), "--port", str(port)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    shot = tmp_path / "view.png"
    try:
        _wait_for_port(port, server, timeout=60)
        # Virtual time lets the page connect, receive the scene and render before the screenshot is taken; the
        # scene and the panel arrive over a socket in real time, so a busy machine gets a second, longer look.
        for budget in (20000, 60000):
            subprocess.run([browser, "--headless", "--no-sandbox", "--use-angle=swiftshader",
                            "--enable-unsafe-swiftshader", "--hide-scrollbars", "--window-size=1280,800",
                            f"--virtual-time-budget={budget}", f"--screenshot={shot}", f"http://127.0.0.1:{port}"],
                           capture_output=True, timeout=180, check=True)
            if _rendered(np.asarray(Image.open(shot).convert("RGB")).astype(int)):
                break
    finally:
        server.terminate()
        try:
            output = server.communicate(timeout=10)[0]
        except subprocess.TimeoutExpired:
            server.kill()
            output = server.communicate()[0]
    assert f"at http://127.0.0.1:{port}" in output
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert _orange_pixels(pixels) > 500, f"no points in the screenshot {shot}"
    assert _panel_labels(pixels) > 400
