"""What ``reconstruct`` reads: the frames of INPUT (a folder of images or a video) and upstream's preprocessing.

The functions here do no printing and show no progress: they return lists or yield one item at a time, so the
command can wrap them in progress bars, and raise ``UserError`` for anything the user can fix.

Images are preprocessed by upstream's own ``vggt.utils.load_fn.load_and_preprocess_images`` (resize to 518 px
wide, crop or pad, divisible by 14), so the model sees exactly what upstream's demos feed it. That loader imports
torchvision for ``transforms.ToTensor`` alone. Where torchvision cannot be imported — PyPI's Linux wheels are CUDA
builds that fail beside a CPU-only torch, whose matching CPU wheels live on PyTorch's own index — upstream's
loader is imported with a stand-in ``ToTensor`` doing the same documented conversion (RGB uint8 HWC to float CHW
in [0, 1]); the stand-in is visible to that module only (see ``_upstream_loader``).
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import types
from pathlib import Path
from typing import Iterator, Optional

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_VIDEO_FRAMES = 32  # a video has thousands of frames; VGGT needs a few dozen views of a scene


def select(count: int, frames: Optional[int] = None, stride: Optional[int] = None) -> list[int]:
    """Indices of the frames to use out of ``count``: ``frames`` evenly spaced (first and last included), or
    every ``stride``-th, or all. Asking for more frames than there are gives all of them."""
    if stride is not None:
        return list(range(0, count, stride))
    if frames is None or frames >= count:
        return list(range(count))
    return sorted({int(round(i)) for i in np.linspace(0, count - 1, frames)})


def list_images(folder: Path) -> list[Path]:
    """Every visible regular file in ``folder``, sorted by name; what is not an image is reported later, by name."""
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"{folder} is empty: put the images of one scene in it")
    return files


def image_problem(path: Path, decode: bool) -> Optional[str]:
    """Why ``path`` cannot be used as an image, or None.

    ``decode``: decode it in full, which catches truncated files too; for the frames that will be used. The
    others are only identified from their header, which is enough to name a file that is no image at all.
    """
    try:
        with Image.open(path) as img:
            if decode:
                img.load()
    except UnidentifiedImageError:
        return "not an image"
    except Exception as exc:  # a broken image: PIL raises OSError, SyntaxError, ValueError... depending on the format
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def raise_for_problems(problems: dict[Path, str]) -> None:
    """One line naming every file that is not a readable image (users fix them all at once, not one per run)."""
    if problems:
        shown = "; ".join(f"{p.name} ({why})" for p, why in problems.items())
        raise UserError(f"{len(problems)} file(s) in {next(iter(problems)).parent} are not readable images: {shown}")


def video_frame_count(path: Path) -> int:
    """Number of frames of the video at ``path`` (decoded with OpenCV, else imageio)."""
    decoder = _decoder()
    try:
        count = decoder.count(path)
    except UserError:
        raise
    except Exception as exc:  # each backend has its own error types for a file it cannot read
        raise UserError(f"{path}: cannot read it as a video ({exc})") from exc
    if count == 0:
        raise UserError(f"{path}: is not a folder of images nor a video with frames")
    return count


def video_frames(path: Path, indices: list[int]) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, RGB uint8 frame) for each of ``indices``, in order, decoding the video once."""
    wanted = set(indices)
    yield from _decoder().frames(path, wanted)


def save_frame(rgb: np.ndarray, path: Path) -> None:
    """A decoded video frame as a lossless PNG, for upstream's loader (which reads files)."""
    Image.fromarray(rgb).save(path)


def load_images(paths: list[Path], mode: str) -> torch.Tensor:
    """(S, 3, H, W) in [0, 1], by upstream's ``load_and_preprocess_images(paths, mode)``.

    Upstream prints a warning when frames have different shapes (they are padded to the largest); it is passed
    on to logging, where ``--quiet`` can silence it.
    """
    load_and_preprocess_images = _upstream_loader()
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        images = load_and_preprocess_images([str(p) for p in paths], mode=mode)
    for line in printed.getvalue().splitlines():
        log.warning("upstream: %s", line)
    return images


class ToTensor:
    """torchvision's ``transforms.ToTensor`` for the RGB PIL images upstream's loader passes it."""

    def __call__(self, pic: Image.Image) -> torch.Tensor:
        array = np.array(pic, dtype=np.uint8, copy=True)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)


def _upstream_loader():  # type: ignore[no-untyped-def]
    """Upstream's ``load_and_preprocess_images``; with the ``ToTensor`` stand-in if torchvision does not import.

    The stand-in sits in ``sys.modules`` only while upstream's ``load_fn`` is imported, so any other importer of
    torchvision still gets the real package (or its real error).
    """
    try:
        from vggt.utils.load_fn import load_and_preprocess_images

        return load_and_preprocess_images
    except (ImportError, RuntimeError, OSError) as exc:  # RuntimeError/OSError: a torchvision built for another torch
        if "torchvision" not in str(exc):
            raise
        log.info("torchvision does not import (%s); using the ToTensor stand-in for upstream's loader", exc)
    transforms = types.ModuleType("torchvision.transforms")
    transforms.ToTensor = ToTensor  # type: ignore[attr-defined]
    package = types.ModuleType("torchvision")
    package.transforms = transforms  # type: ignore[attr-defined]
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] == "torchvision"}
    sys.modules.pop("vggt.utils.load_fn", None)
    sys.modules.update({"torchvision": package, "torchvision.transforms": transforms})
    try:
        from vggt.utils.load_fn import load_and_preprocess_images
    finally:
        del sys.modules["torchvision"], sys.modules["torchvision.transforms"]
        sys.modules.update(saved)
    return load_and_preprocess_images


class _OpenCV:
    """Video decoding with OpenCV (``opencv-python-headless``), the preferred backend: fast seeking-free grab()."""

    def __init__(self, cv2) -> None:  # type: ignore[no-untyped-def]
        self.cv2 = cv2

    def _open(self, path: Path):  # type: ignore[no-untyped-def]
        cap = self.cv2.VideoCapture(str(path))
        if not cap.isOpened():
            raise UserError(f"{path}: is not a folder of images nor a video OpenCV can decode")
        return cap

    def count(self, path: Path) -> int:
        cap = self._open(path)
        try:
            count = int(cap.get(self.cv2.CAP_PROP_FRAME_COUNT))
            if count <= 0:  # some containers do not store it: count by decoding
                count = 0
                while cap.grab():
                    count += 1
            return count
        finally:
            cap.release()

    def frames(self, path: Path, wanted: set[int]) -> Iterator[tuple[int, np.ndarray]]:
        cap = self._open(path)
        try:
            index, last = 0, max(wanted, default=-1)
            while index <= last and cap.grab():
                if index in wanted:
                    ok, bgr = cap.retrieve()
                    if ok:
                        yield index, self.cv2.cvtColor(bgr, self.cv2.COLOR_BGR2RGB)
                index += 1
        finally:
            cap.release()


class _ImageIO:
    """Video decoding with imageio (needs a plugin for the container: imageio-ffmpeg or av; pillow for GIF)."""

    def __init__(self, iio) -> None:  # type: ignore[no-untyped-def]
        self.iio = iio

    def count(self, path: Path) -> int:
        return sum(1 for _ in self.iio.imiter(path))

    def frames(self, path: Path, wanted: set[int]) -> Iterator[tuple[int, np.ndarray]]:
        for index, frame in enumerate(self.iio.imiter(path)):
            if index in wanted:
                yield index, np.asarray(Image.fromarray(np.asarray(frame)).convert("RGB"))


def _decoder() -> "_OpenCV | _ImageIO":
    try:
        import cv2

        return _OpenCV(cv2)
    except ImportError:
        pass
    try:
        import imageio.v3 as iio

        return _ImageIO(iio)
    except ImportError:
        raise UserError("no video decoder: pip install opencv-python-headless") from None
