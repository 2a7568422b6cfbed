"""The fidelity harness: how far the presets and the approximations are from upstream in fp32, beside upstream's
own bf16 autocast, on the same inputs (``vggt-turbo fidelity``, in ``fidelity_cli``, is its command line).

Reference: upstream in fp32 (no autocast, TF32 off: ``fp32_reference_mode``). The first rows are the noise floor:
``upstream`` (its recommended bf16 autocast) and ``exact``; then each variant in ``VARIANTS``: ``fast`` (stride 4),
``fast_kv2`` (the same with the milder stride 2), and approximations alone (``global_to_frame``,
``kv_subsample_2``, ``kv_subsample_4``). So an approximation's error reads against upstream's own rounding.

Metrics per variant, input and frame count (``compare``), over every frame of the sequence:
  - depth and world points: relative error ``||a - b|| / ||b||`` and the median absolute error ``|a - b|``;
  - cameras, from ``pose_enc`` through upstream's ``pose_encoding_to_extri_intri``: the rotation angle between
    the two world-to-camera rotations, the angle between the two translation vectors (direction only: a scale
    change is not an error here) and the focal length's relative error (the larger of fx, fy), each as mean and
    max over frames;
  - on CUDA, the median seconds per call and the speed-up over upstream under bf16 autocast.

Inputs: upstream's example scenes (``<examples>/<scene>/images``, loaded by upstream's loader as the ``reconstruct``
command does; shrunk to the small model's 4-patch width for ``--size small``) and synthetic sequences of random
images, for each requested frame count.

Weights: ``--weights PATH`` loads a local VGGT checkpoint. Without it the model has random weights, and the
errors only check that the harness and the approximations run: they say nothing about accuracy on real scenes.
The log and the JSON (``meta.random_weights``, ``meta.note``) say so. (Random weights get a fixed field of view
from ``weights.load_model``, so their focal errors are 0 by construction.)
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..app import inputs
from ..app.selection import select
from ..config import FAST_GLOBAL_TO_FRAME_LAYERS, PRESETS, TurboConfig
from ..patching import apply_optimizations, revert_optimizations
from ..random_model import SMALL_IMAGE, Size, random_images

log = logging.getLogger(__name__)

UPSTREAM = "upstream"  # upstream under bf16 autocast: the noise floor row
VARIANTS: Mapping[str, TurboConfig] = {
    "fast": PRESETS["fast"],
    "fast_kv2": PRESETS["fast"].replace(kv_subsample=2),
    "global_to_frame": PRESETS["exact"].replace(global_to_frame_layers=FAST_GLOBAL_TO_FRAME_LAYERS),
    "kv_subsample_2": PRESETS["exact"].replace(kv_subsample=2),
    "kv_subsample_4": PRESETS["exact"].replace(kv_subsample=4),
}
PREDICTIONS = ("depth", "world_points", "pose_enc")
FULL_IMAGE = 518


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


def fresh_upstream_caches(model: nn.Module) -> None:
    """Empty upstream's RoPE table caches, so that the next call makes its tables as in a fresh process. Upstream
    keeps the table the first call made under a key that ignores autocast: after an fp32 call, upstream-autocast
    would reuse fp32 tables it never makes on its own (its einsum runs in bf16 under CUDA autocast)."""
    for module in model.modules():
        cache = getattr(module, "frequency_cache", None)
        if isinstance(cache, dict):
            cache.clear()


@contextlib.contextmanager
def fp32_reference_mode() -> Iterator[None]:
    """TF32 off for matmuls and convolutions (the reference is true fp32), restored after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float32 over the finite entries (inf when shapes or the non-finite pattern differ).

    Both are divided by ``max|b|`` first so that the squares cannot overflow float32 (the ratio is unchanged).
    """
    a = a.detach().float()
    b = b.detach().to(a.device).float()
    if a.shape != b.shape:
        return math.inf
    finite_a, finite_b = torch.isfinite(a), torch.isfinite(b)
    if not torch.equal(finite_a, finite_b):
        return math.inf
    if not bool(finite_a.all()):
        a, b = a[finite_a], b[finite_b]
    if b.numel() == 0:
        return 0.0
    scale = b.abs().max().clamp_min(torch.finfo(torch.float32).tiny)
    num = torch.linalg.vector_norm((a - b) / scale).item()
    den = torch.linalg.vector_norm(b / scale).item()
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def median_abs_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().median().item()


def rotation_angles_deg(rot_a: torch.Tensor, rot_b: torch.Tensor) -> torch.Tensor:
    """Angle of ``rot_a @ rot_bᵀ`` per (..., 3, 3) pair of rotations, in degrees, from atan2(sin, cos): accurate
    for small angles too (an arccos of the trace loses them to rounding)."""
    r = rot_a.double() @ rot_b.double().transpose(-2, -1)
    sin = torch.stack([r[..., 2, 1] - r[..., 1, 2], r[..., 0, 2] - r[..., 2, 0], r[..., 1, 0] - r[..., 0, 1]], -1)
    cos = r.diagonal(dim1=-2, dim2=-1).sum(-1) - 1
    return torch.rad2deg(torch.atan2(torch.linalg.vector_norm(sin, dim=-1), cos))  # both sides doubled


def direction_angles_deg(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Angle between (..., 3) vectors in degrees (0 where either is zero: no direction to compare)."""
    a, b = a.double(), b.double()
    return torch.rad2deg(torch.atan2(torch.linalg.vector_norm(torch.cross(a, b, dim=-1), dim=-1), (a * b).sum(-1)))


def _cameras(pose_enc: torch.Tensor, image_hw: Optional[tuple[int, int]] = None) -> tuple[torch.Tensor, Any]:
    """Upstream's (extrinsics, intrinsics) of a (B, S, 9) ``pose_enc``; no intrinsics without an image size."""
    from vggt.utils.pose_enc import pose_encoding_to_extri_intri

    pose = pose_enc.detach().cpu().double()
    return pose_encoding_to_extri_intri(pose, image_size_hw=image_hw, build_intrinsics=image_hw is not None)


def pose_rotation_errors_deg(pose_a: torch.Tensor, pose_b: torch.Tensor) -> torch.Tensor:
    """Per frame, the angle between the camera rotations two (B, S, 9) ``pose_enc`` encode, in degrees."""
    (ext_a, _), (ext_b, _) = _cameras(pose_a), _cameras(pose_b)
    return rotation_angles_deg(ext_a[..., :3, :3], ext_b[..., :3, :3])


def camera_errors(pose_a: torch.Tensor, pose_b: torch.Tensor, image_hw: tuple[int, int]) -> dict[str, float]:
    """Rotation, translation-direction and focal errors of ``pose_a`` against ``pose_b``, mean and max over frames."""
    (ext_a, int_a), (ext_b, int_b) = (_cameras(p, image_hw) for p in (pose_a, pose_b))
    focal_a, focal_b = (i.diagonal(dim1=-2, dim2=-1)[..., :2].double() for i in (int_a, int_b))
    per_frame = {
        "rotation_deg": rotation_angles_deg(ext_a[..., :3, :3], ext_b[..., :3, :3]),
        "translation_dir_deg": direction_angles_deg(ext_a[..., :3, 3], ext_b[..., :3, 3]),
        "focal_rel": ((focal_a - focal_b).abs() / focal_b.abs()).amax(-1),
    }
    out = {}
    for name, values in per_frame.items():
        out[f"{name}_mean"], out[f"{name}_max"] = values.mean().item(), values.max().item()
    return out


def compare(
    pred: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], image_hw: tuple[int, int]
) -> dict[str, float]:
    """Every metric of ``pred`` against ``ref`` (see the module docstring)."""
    out = {}
    for key in ("depth", "world_points"):
        out[f"{key}_rel"] = relative_error(pred[key], ref[key])
        out[f"{key}_median_abs"] = median_abs_error(pred[key], ref[key])
    return {**out, **camera_errors(pred["pose_enc"], ref["pose_enc"], image_hw)}


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Input:
    name: str  # the example scene's folder name, or "synthetic"
    images: torch.Tensor  # (1, S, 3, H, W) in [0, 1]


def _shrink(images: torch.Tensor) -> torch.Tensor:
    """(S, 3, H, W) resized to the small model's width, the height rounded to whole 14 px patches."""
    height = max(14, round(images.shape[-2] * SMALL_IMAGE / images.shape[-1] / 14) * 14)
    return F.interpolate(images, size=(height, SMALL_IMAGE), mode="bilinear", antialias=True).clamp(0, 1)


def example_inputs(root: Path, frames: Sequence[int], size: Size) -> list[Input]:
    """Each scene folder ``root/<scene>/images`` at each frame count it has enough images for (frames evenly
    spaced through the folder)."""
    out = []
    for scene in sorted(d for d in root.iterdir() if (d / "images").is_dir()):
        paths = inputs.list_images(scene / "images")
        for n in frames:
            if n > len(paths):
                log.info("%s: %d frames skipped (the scene has %d images)", scene.name, n, len(paths))
                continue
            images = inputs.load_images([paths[i] for i in select(len(paths), n)], mode="crop")
            out.append(Input(scene.name, (_shrink(images) if size == "small" else images)[None]))
    return out


def synthetic_inputs(frames: Sequence[int], size: Size, seed: int = 0) -> list[Input]:
    px = SMALL_IMAGE if size == "small" else FULL_IMAGE
    return [Input("synthetic", random_images(n, size=px, seed=seed + n)) for n in frames]


def find_examples() -> Optional[Path]:
    """``$VGGT_EXAMPLES``, else ``shared/data/vggt-examples`` in or beside the working directory."""
    env = os.environ.get("VGGT_EXAMPLES")
    here = Path.cwd()
    candidates = [Path(env)] if env else [here / "shared/data/vggt-examples", here.parent / "shared/data/vggt-examples"]
    return next((c for c in candidates if c.is_dir()), None)


# --------------------------------------------------------------------------------------------------------------
# Runner
# --------------------------------------------------------------------------------------------------------------


def predict(
    model: nn.Module, images: torch.Tensor, config: Optional[TurboConfig], repeats: int, autocast: bool = True
) -> tuple[dict[str, torch.Tensor], Optional[float]]:
    """The predictions (fp32, on the CPU) of ``config`` (None: upstream) under bf16 autocast (``autocast=False``:
    fp32, TF32 off) and, on CUDA, its median seconds per call over ``repeats`` calls after the first (which may
    capture a CUDA graph)."""
    cuda = images.is_cuda
    fresh_upstream_caches(model)
    if config is not None:
        apply_optimizations(model, config)
    mode = contextlib.nullcontext() if autocast else fp32_reference_mode()
    try:
        with mode, torch.no_grad(), torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = model(images)
            preds = {k: out[k].float().cpu() for k in PREDICTIONS}
            del out
            times = []
            for _ in range(repeats if cuda and autocast else 0):
                torch.cuda.synchronize()
                start = time.perf_counter()
                model(images)
                torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
    finally:
        if config is not None:
            revert_optimizations(model)
    return preds, statistics.median(times) if times else None


def measure(
    model: nn.Module, cases: Sequence[Input], variants: Mapping[str, TurboConfig], repeats: int
) -> list[dict[str, Any]]:
    """One row per variant and input: the metrics against upstream in fp32 on the same images, after the noise
    floor's rows (``upstream`` under autocast, then ``exact``); speed-ups against upstream-autocast."""
    device = next(model.parameters()).device
    rows = []
    for case in cases:
        images = case.images.to(device)
        image_hw = (images.shape[-2], images.shape[-1])
        reference, _ = predict(model, images, None, 0, autocast=False)
        upstream_seconds = None
        for name, config in {UPSTREAM: None, "exact": PRESETS["exact"], **variants}.items():
            pred, seconds = predict(model, images, config, repeats)
            upstream_seconds = seconds if config is None else upstream_seconds
            row = {"variant": name, "input": case.name, "frames": images.shape[1], "image_hw": list(image_hw)}
            row.update(compare(pred, reference, image_hw))
            row.update(seconds=seconds, upstream_seconds=upstream_seconds,
                       speedup=upstream_seconds / seconds if seconds and upstream_seconds else None)
            log.info("%s", _line(row))
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Rows as text
# --------------------------------------------------------------------------------------------------------------

COLUMNS = (
    ("variant", "variant", "{}"),
    ("input", "input", "{}"),
    ("frames", "frames", "{}"),
    ("depth_rel", "depth rel", "{:.2e}"),
    ("world_points_rel", "points rel", "{:.2e}"),
    ("rotation_deg_mean", "rot mean°", "{:.3f}"),
    ("rotation_deg_max", "rot max°", "{:.3f}"),
    ("translation_dir_deg_max", "t-dir max°", "{:.3f}"),
    ("focal_rel_max", "focal max", "{:.2e}"),
    ("speedup", "speedup", "{:.2f}x"),
)


def _cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
    value = row.get(key)
    return "-" if value is None else fmt.format(value)


def _line(row: Mapping[str, Any]) -> str:
    return "  ".join(f"{title} {_cell(row, key, fmt)}" for key, title, fmt in COLUMNS)


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(title for _, title, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, key, fmt) for key, _, fmt in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)
