"""What ``reconstruct`` reads: the frames of INPUT (a folder of images or a video) and upstream's preprocessing.

The functions here do no printing and show no progress: they return lists or yield one item at a time, so the
command can wrap them in progress bars, and raise ``UserError`` for anything the user can fix.

The model sees exactly what upstream's demos feed it: ``preprocess`` applies the steps of upstream's
``vggt.utils.load_fn.load_and_preprocess_images`` (resize to 518 px wide, crop or pad, divisible by 14) to each
opened image, and the tests hold it to that loader's tensors bit for bit (example images, odd sizes, crop and
pad, mixed shapes). The loader itself (``upstream_loader``:
the tests' and the reconstruct benchmark's reference, never imported by ``reconstruct``) imports torchvision for
``transforms.ToTensor`` alone. Where torchvision cannot be imported — PyPI's Linux wheels are CUDA builds that fail
beside a CPU-only torch, whose matching CPU wheels live on PyTorch's own index — it is imported with a stand-in
``ToTensor`` doing the same documented conversion (RGB uint8 HWC to float CHW in [0, 1]); the stand-in is visible
to that module only.

Upstream's loader turns every file into RGB with ``convert("RGB")`` (RGBA composited on white first). That is
right for 8-bit RGB, RGBA, grey and opaque palette images, and wrong for others: 16-bit grey is clipped to almost
white, grey or palette images with transparency lose it instead of going onto white, and EXIF rotation is
ignored. Such files are converted here to the 8-bit RGB image a viewer shows (``as_viewed``) before upstream's
steps; every other file reaches them untouched, so ordinary images give upstream's tensors bit for bit. Images
upstream's arithmetic cannot resize sensibly (too small, extreme aspect ratio) are refused by ``image_problem``
before any model work.

Loading is parallel and decodes each file once (``load_folder``, ``load_frames``): a thread per core opens,
checks and preprocesses one image (PIL's decoders and resampling, and torch's conversion, release the GIL), and
video frames go from the decoder to the preprocessing as arrays, never through files.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sys
import tempfile
import types
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import UserError

log = logging.getLogger(__name__)

DEFAULT_VIDEO_FRAMES = 32  # a video has thousands of frames; VGGT needs a few dozen views of a scene
# Smaller than one 14-px patch a side, an image carries no detail the model can use (upscaled to 518 px it is blur).
MIN_SIDE = 14
# Upstream makes one side 518 px and rounds the other to a multiple of 14: at 74:1 that side becomes 0 px (its
# loader raises), and well before that the frame is a sliver of a few patches. 8:1 keeps at least 70 px (5 patches).
MAX_ASPECT = 8.0
# Modes upstream's convert("RGB") already turns into what a viewer shows (when the image is not EXIF-rotated and,
# for palettes, has no transparency). CMYK is in it: PIL's conversion is the usual naive one, as ours would be.
_UPSTREAM_OK = {"1", "L", "P", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"}
_WITH_ALPHA = {"LA", "PA", "La", "RGBa"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N", "I"}
_EXIF_ORIENTATION = 0x0112
TARGET_SIZE = 518  # upstream's load_and_preprocess_images: the width (crop) or the longer side (pad)
PATCH = 14


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
    Used frames are also checked for what upstream's resize cannot handle: a side under ``MIN_SIDE`` px, an
    aspect ratio beyond ``MAX_ASPECT``, or a colour mode that has no RGB view.
    """
    try:
        with Image.open(path) as img:
            if decode:
                img.load()
                return shape_problem(img.size) or mode_problem(img)
    except UnidentifiedImageError:
        return "not an image"
    except Exception as exc:  # a broken image: PIL raises OSError, SyntaxError, ValueError... depending on the format
        return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def shape_problem(size: tuple[int, int]) -> Optional[str]:
    """Why an image of ``size`` (width, height) cannot be preprocessed sensibly, or None."""
    width, height = size
    if min(width, height) < MIN_SIDE:
        return f"too small: {width}x{height}, at least {MIN_SIDE} px a side"
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT:
        return f"aspect ratio {ratio:.0f}:1 ({width}x{height}) is beyond {MAX_ASPECT:.0f}:1; crop it"
    return None


def mode_problem(img: Image.Image) -> Optional[str]:
    """Why ``img``'s colour mode has no RGB view here, or None."""
    if img.mode in _UPSTREAM_OK | _WITH_ALPHA | _SIXTEEN_BIT:
        return None
    return f"colour mode {img.mode} is not supported; save it as 8- or 16-bit RGB or grey"


def needs_conversion(img: Image.Image) -> bool:
    """Whether upstream's ``convert("RGB")`` would show the model something else than a viewer shows."""
    rotated = img.getexif().get(_EXIF_ORIENTATION, 1) not in (1, None)
    transparent_palette = img.mode in ("P", "L", "RGB") and "transparency" in img.info
    return rotated or transparent_palette or img.mode not in _UPSTREAM_OK


def as_viewed(img: Image.Image) -> Image.Image:
    """``img`` as the 8-bit RGB image a viewer shows: EXIF rotation applied, 16-bit scaled (not clipped) to 8
    bits, transparency composited on white (as upstream does for RGBA), other modes by PIL's conversion."""
    img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT:
        values = np.asarray(img).astype(np.float64)
        if values.max(initial=0) > 65535 or values.min(initial=0) < 0:
            raise ValueError(f"{img.mode} values outside 0..65535")
        return Image.fromarray(np.round(values / 257.0).astype(np.uint8), "L").convert("RGB")
    if img.mode in _WITH_ALPHA or "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        return Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img).convert("RGB")
    return img.convert("RGB")


def raise_for_problems(problems: dict[Path, str]) -> None:
    """One line naming every file that is not a readable image (users fix them all at once, not one per run)."""
    if problems:
        shown = "; ".join(f"{p.name} ({why})" for p, why in problems.items())
        raise UserError(f"{len(problems)} file(s) in {next(iter(problems)).parent} are not readable images: {shown}")


class DecoderNoise:
    """What video decoders write to the process's stderr while they run, kept from the terminal.

    Why: FFmpeg (inside OpenCV, or imageio's plugins) prints to file descriptor 2 from C, past Python's
    ``sys.stderr`` and ``--quiet``: a damaged video printed thousands of lines. Each decoder call runs with fd 2
    pointed at a temporary file (``capture``); the command then names the count and the first message in its own
    one line. Progress bars are drawn between the calls, so they still reach the terminal.
    """

    _PREFIX = re.compile(r"^\[[^\]]*@ 0x[0-9a-fA-F]+\]\s*")  # FFmpeg's "[mpeg4 @ 0x55d...] "

    def __init__(self) -> None:
        self.lines: list[str] = []

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError):  # no fd 2 to redirect (a closed or replaced stderr): nothing to capture
            yield
            return
        with tempfile.TemporaryFile() as sink:
            os.dup2(sink.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                sink.seek(0)
                text = sink.read().decode("utf-8", errors="replace")
                self.lines += [line.strip() for line in text.splitlines() if line.strip()]

    def summary(self) -> str:
        """E.g. "the decoder reported 3 errors, first: 'header damaged'" (empty when it said nothing)."""
        if not self.lines:
            return ""
        first = self._PREFIX.sub("", self.lines[0])[:120]
        return f"the decoder reported {len(self.lines)} problem(s), first: {first!r}"


def video_frame_count(path: Path, noise: Optional[DecoderNoise] = None) -> int:
    """Number of frames of the video at ``path`` (decoded with OpenCV, else imageio)."""
    decoder = _decoder()
    noise = noise or DecoderNoise()
    try:
        with noise.capture():
            count = decoder.count(path)
    except UserError:
        raise
    except Exception as exc:  # each backend has its own error types for a file it cannot read
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path}: cannot read it as a video ({first[:200]})") from exc
    if count == 0:
        extra = f" ({noise.summary()})" if noise.lines else ""
        raise UserError(f"{path}: is not a folder of images nor a video with frames{extra}")
    return count


def video_frames(path: Path, indices: list[int], noise: Optional[DecoderNoise] = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (index, RGB uint8 frame) for each of ``indices``, in order, decoding the video once; what the
    decoder prints meanwhile goes to ``noise``."""
    noise = noise or DecoderNoise()
    frames = _decoder().frames(path, set(indices))
    try:
        while True:
            with noise.capture():
                item = next(frames, None)
            if item is None:
                return
            yield item
    finally:
        with noise.capture():
            frames.close()


def workers() -> int:
    """Threads for loading: one per core this process may use (decoding and resizing are CPU-bound)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def preprocess(img: Image.Image, mode: str) -> torch.Tensor:
    """(3, H, W) in [0, 1]: upstream's ``load_and_preprocess_images`` steps for one opened image.

    Why a copy of upstream's steps rather than a call: upstream's loader takes paths and decodes each file
    itself, so a file checked here would be decoded twice and a video frame would have to be written to disk
    first. The steps are upstream's in upstream's order (RGBA onto white, ``convert("RGB")``, bicubic resize to
    518 px wide (crop) or 518 px on the longer side (pad), the other side rounded to a multiple of 14, then
    ``ToTensor``'s conversion, then the centre crop or the white padding); the crop is taken before the
    conversion, which is elementwise, so the values are the same. The conversion looks each byte up in
    ``_unit_values``, torch's own ``float().div(255)`` of the 256 byte values: the same floats, without torch's
    per-call overhead, which dominated the loading of small images.
    """
    if mode not in ("crop", "pad"):
        raise ValueError("Mode must be either 'crop' or 'pad'")
    if img.mode == "RGBA":
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    img = img.convert("RGB")
    width, height = img.size
    if mode == "pad" and width < height:
        new_height = TARGET_SIZE
        new_width = round(width * (new_height / height) / PATCH) * PATCH
    else:
        new_width = TARGET_SIZE
        new_height = round(height * (new_width / width) / PATCH) * PATCH
    array = np.asarray(img.resize((new_width, new_height), Image.Resampling.BICUBIC))
    if mode == "crop" and new_height > TARGET_SIZE:
        start_y = (new_height - TARGET_SIZE) // 2
        array = array[start_y : start_y + TARGET_SIZE]
    tensor = torch.from_numpy(np.take(_unit_values(), np.ascontiguousarray(array.transpose(2, 0, 1))))
    if mode == "pad":
        return _pad_to(tensor, TARGET_SIZE, TARGET_SIZE)
    return tensor


@functools.lru_cache(maxsize=None)
def _unit_values() -> np.ndarray:
    """(256,) float32: ``ToTensor``'s value for each byte, computed by ``ToTensor``'s own torch arithmetic."""
    return torch.arange(256, dtype=torch.uint8).float().div(255).numpy()


def _pad_to(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Upstream's centre padding with white (1.0), the odd pixel at the bottom and right."""
    h_padding, w_padding = height - img.shape[1], width - img.shape[2]
    if h_padding <= 0 and w_padding <= 0:
        return img
    top, left = h_padding // 2, w_padding // 2
    return torch.nn.functional.pad(img, (left, w_padding - left, top, h_padding - top), mode="constant", value=1.0)


def stack(images: list[torch.Tensor]) -> torch.Tensor:
    """(S, 3, H, W): upstream's batching; frames of different shapes are padded with white to the largest (and,
    as upstream prints, a warning says so)."""
    shapes = {tuple(img.shape[1:]) for img in images}
    if len(shapes) > 1:
        log.warning("upstream: Warning: Found images with different shapes: %s", shapes)
        height, width = max(s[0] for s in shapes), max(s[1] for s in shapes)
        images = [_pad_to(img, height, width) for img in images]
    return torch.stack(images)


def _open_and_preprocess(path: Path, mode: str) -> tuple[Optional[torch.Tensor], Optional[str]]:
    """(tensor, None) for a usable image, (None, why) for a file that is not one (see ``image_problem``).

    One decode serves the check and the preprocessing. Files upstream's ``convert("RGB")`` would misread are
    preprocessed as ``as_viewed``; a file that cannot be shown in 8 bits raises ``UserError``.
    """
    try:
        with Image.open(path) as img:
            img.load()
            problem = shape_problem(img.size) or mode_problem(img)
            if problem:
                return None, problem
            if needs_conversion(img):
                log.info("%s: mode %s converted to the RGB a viewer shows", path.name, img.mode)
                try:
                    img = as_viewed(img)
                except ValueError as exc:  # e.g. a 32-bit integer image beyond 16-bit range
                    raise UserError(f"{path}: cannot show it as an 8-bit RGB image ({exc})") from exc
            return preprocess(img, mode), None
    except UserError:
        raise
    except UnidentifiedImageError:
        return None, "not an image"
    except Exception as exc:  # a broken image: PIL raises OSError, SyntaxError, ValueError... depending on the format
        return None, str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def load_folder(files: list[Path], chosen: list[int], mode: str,
                on_file: Callable[[str], None] = lambda name: None) -> torch.Tensor:
    """(S, 3, H, W) of the ``chosen`` files, preprocessed in parallel; the other files only identified.

    Every file that is not a usable image is named in one ``UserError`` (users fix them all at once).
    ``on_file(name)`` is called in order, once per file, as each is done (for a progress bar).
    """
    used = set(chosen)
    problems: dict[Path, str] = {}
    tensors: dict[int, torch.Tensor] = {}
    unviewable: Optional[UserError] = None  # raised after the list of unreadable files, which names more at once
    with ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="vggt-turbo-load") as pool:
        futures = {i: pool.submit(_open_and_preprocess, files[i], mode) for i in chosen}
        for i, path in enumerate(files):
            problem = None
            if i in used:
                try:
                    tensor, problem = futures[i].result()
                except UserError as exc:
                    unviewable = unviewable or exc
                    tensor = None
                if tensor is not None:
                    tensors[i] = tensor
            else:
                problem = image_problem(path, decode=False)
            if problem:
                problems[path] = problem
            on_file(path.name)
    raise_for_problems(problems)
    if unviewable is not None:
        raise unviewable
    return stack([tensors[i] for i in chosen])


def load_images(paths: list[Path], mode: str) -> torch.Tensor:
    """(S, 3, H, W) in [0, 1]: upstream's ``load_and_preprocess_images(paths, mode)``, computed in parallel.

    Files that upstream's ``convert("RGB")`` would misread (``needs_conversion``) are preprocessed as the image a
    viewer shows (``as_viewed``); the others give upstream's tensors bit for bit.
    """
    return load_folder(list(paths), list(range(len(paths))), mode)


def load_frames(frames: Iterable[tuple[int, np.ndarray]], mode: str,
                on_frame: Callable[[int], None] = lambda index: None) -> tuple[torch.Tensor, list[int]]:
    """(S, 3, H, W) of decoded RGB uint8 frames (``(index, frame)``, e.g. from ``video_frames``), and their
    indices; empty indices (and a (0, 3, 0, 0) tensor) when there were none.

    Each frame is preprocessed on a worker thread while the decoder (sequential by nature) reads the next one.
    The tensors equal those upstream's loader gives for the frames saved as lossless PNGs (tested).
    """
    indices: list[int] = []
    futures: list[Future[torch.Tensor]] = []
    with ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="vggt-turbo-load") as pool:
        for index, rgb in frames:
            indices.append(index)
            futures.append(pool.submit(preprocess, Image.fromarray(rgb), mode))
            on_frame(index)
        tensors = [f.result() for f in futures]
    if not tensors:
        return torch.empty(0, 3, 0, 0), indices
    return stack(tensors), indices


class ToTensor:
    """torchvision's ``transforms.ToTensor`` for the RGB PIL images upstream's loader passes it."""

    def __call__(self, pic: Image.Image) -> torch.Tensor:
        array = np.array(pic, dtype=np.uint8, copy=True)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous().float().div(255)


def upstream_loader():  # type: ignore[no-untyped-def]
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
