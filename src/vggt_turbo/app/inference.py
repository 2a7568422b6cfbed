"""One forward pass of an upstream VGGT, timed per phase (aggregator, then the heads), returned as numpy.

The forward is upstream's own ``VGGT.forward`` (through whatever vggt_turbo patched); the phases are observed
with forward hooks on the aggregator and on each head, so nothing of upstream's control flow is duplicated. On
CUDA the hooks synchronise, so each phase's time is the GPU's, not the launch queue's.
"""

from __future__ import annotations

import time
from typing import Callable, Mapping, NamedTuple

import numpy as np
import torch
from torch import nn

from .percentile import percentile

PHASES = ("aggregator", "camera_head", "depth_head", "point_head")
OUTPUTS = ("depth", "depth_conf", "world_points", "world_points_conf")


def phases(model: nn.Module) -> list[str]:
    """The phases this model runs (a head set to None by upstream's enable_* flags is skipped)."""
    return [name for name in PHASES if getattr(model, name, None) is not None]


class Predicted(NamedTuple):
    predictions: dict[str, np.ndarray]  # the single scene's, float32 (see ``predict``)
    seconds: dict[str, float]  # spent in the aggregator and in the heads
    thresholds: dict[str, float]  # output name -> the percentile of it asked for (``percentiles``)


@torch.no_grad()
def predict(
    model: nn.Module, images: torch.Tensor, dtype: torch.dtype, on_phase: Callable[[str], None],
    percentiles: Mapping[str, float],
) -> Predicted:
    """Run ``model`` on ``images`` (S, 3, H, W) on the model's device under autocast ``dtype``.

    Returns the predictions of the single scene as float32 numpy (extrinsics (S, 3, 4), intrinsics (S, 3, 3),
    depth (S, H, W, 1), depth_conf, world_points (S, H, W, 3), world_points_conf), the seconds spent in the
    aggregator and in the heads, and for each ``output: q`` of ``percentiles`` the q-th percentile of that output
    (``app.percentile``: computed on the device, before the copy back).
    ``on_phase(name)`` is called as each phase ends (for a progress bar).
    """
    from vggt.utils.pose_enc import pose_encoding_to_extri_intri

    device = images.device
    ended: dict[str, float] = {}

    def hook(name: str) -> Callable[..., None]:
        def record(*_: object) -> None:
            _sync(device)
            ended[name] = time.perf_counter()
            on_phase(name)

        return record

    handles = [getattr(model, name).register_forward_hook(hook(name)) for name in phases(model)]
    try:
        _sync(device)
        start = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(images)
        extrinsics, intrinsics = pose_encoding_to_extri_intri(out["pose_enc"], images.shape[-2:])
        _sync(device)
        end = time.perf_counter()
    finally:
        for handle in handles:
            handle.remove()
    arrays = {"extrinsics": extrinsics, "intrinsics": intrinsics, **{k: out[k] for k in OUTPUTS}}
    scene = {k: v[0].float() for k, v in arrays.items()}  # drop the batch of one scene
    found = {name: percentile(scene[name], q) for name, q in percentiles.items()}
    predictions = {k: v.cpu().numpy() for k, v in scene.items()}
    aggregator_end = ended.get("aggregator", start)
    return Predicted(predictions, {"aggregator": aggregator_end - start, "heads": end - aggregator_end}, found)


def _sync(device: torch.device) -> None:
    # Never inside a CUDA-graph capture (a model patched with cuda_graphs), where synchronising is an error.
    if device.type == "cuda" and not torch.cuda.is_current_stream_capturing():
        torch.cuda.synchronize(device)
