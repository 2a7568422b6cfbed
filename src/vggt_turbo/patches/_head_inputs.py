"""Wrappers that hand each VGGT head its inputs on its own device and dtype, one chunk at a time — shared by the
patches that store the aggregator's kept intermediates differently from upstream (``bf16_weights``: in bf16;
``offload_intermediates``: in host memory).

Upstream's heads read ``aggregated_tokens_list`` directly: the camera head token 0 of each frame of the last
layer, each DPT head (depth, points, the track head's feature extractor) its ``intermediate_layer_idx`` layers,
``frames_chunk_size`` frames at a time through ``_forward_impl``. These wrappers convert only what the head is
about to read, just before it runs, so no full-size converted copy of an intermediate ever exists. A tensor
already on the head's device and dtype passes through untouched (so two patches may stack these wrappers).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..upstream import Requirement, looks_like_vggt
from ._base import Target


def first_param(module: nn.Module) -> torch.Tensor:
    """A parameter of ``module``: the device and dtype its head computes in."""
    return next(module.parameters())


def _fits(t: torch.Tensor, like: torch.Tensor) -> bool:
    return t.dtype == like.dtype and t.device == like.device


def _camera_args(aggregated_tokens_list: list, num_iterations: int = 4) -> tuple[list, int]:
    return aggregated_tokens_list, num_iterations


def camera_head_forward(wrapped: Any, head: nn.Module, args: tuple, kwargs: dict) -> Any:
    """The camera head reads only token 0 of each frame of the last layer: convert that slice alone."""
    tokens, num_iterations = _camera_args(*args, **kwargs)
    like = first_param(head)
    if _fits(tokens[-1], like):
        return wrapped(*args, **kwargs)
    last = tokens[-1][:, :, :1].to(device=like.device, dtype=like.dtype, non_blocking=True)
    return wrapped([*tokens[:-1], last], num_iterations)


def _dpt_args(
    aggregated_tokens_list: list,
    images: torch.Tensor,
    patch_start_idx: int,
    frames_start_idx: Optional[int] = None,
    frames_end_idx: Optional[int] = None,
) -> tuple[list, torch.Tensor, int, Optional[int], Optional[int]]:
    return aggregated_tokens_list, images, patch_start_idx, frames_start_idx, frames_end_idx


def dpt_forward_impl(wrapped: Any, head: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Convert only the layers this DPT head reads, only for the frames of this chunk (the chunk's frames are
    then passed as the whole sequence: upstream's ``_forward_impl`` uses ``images`` for its shape only)."""
    tokens, images, patch_start_idx, start, end = _dpt_args(*args, **kwargs)
    like = first_param(head)
    layers = sorted(set(head.intermediate_layer_idx))
    if all(_fits(tokens[i], like) for i in layers):
        return wrapped(*args, **kwargs)
    frames = slice(start, end) if start is not None and end is not None else slice(None)
    chunk = list(tokens)
    for i in layers:
        chunk[i] = tokens[i][:, frames].to(device=like.device, dtype=like.dtype, non_blocking=True)
    return wrapped(chunk, images[:, frames], patch_start_idx)


def head_input_targets(root: nn.Module) -> list[Target]:
    """The wrappers for every head ``root`` (a VGGT) has."""
    targets = []
    if getattr(root, "camera_head", None) is not None:
        targets.append(Target("camera_head", "forward", camera_head_forward))
    for path in ("depth_head", "point_head"):
        if getattr(root, path, None) is not None:
            targets.append(Target(path, "_forward_impl", dpt_forward_impl))
    if getattr(root, "track_head", None) is not None:
        targets.append(Target("track_head.feature_extractor", "_forward_impl", dpt_forward_impl))
    return targets


def head_of(name: str) -> Callable[[nn.Module], Optional[nn.Module]]:
    """A ``locate`` for one of a VGGT's heads (None when patching an Aggregator alone or the head is off)."""
    return lambda root: getattr(root, name, None) if looks_like_vggt(root) else None


HEAD_INPUT_REQUIREMENTS = (
    Requirement("CameraHead", "forward", head_of("camera_head"), ("aggregated_tokens_list", "num_iterations")),
    Requirement(
        "DPTHead",
        "_forward_impl",
        head_of("depth_head"),
        ("aggregated_tokens_list", "images", "patch_start_idx", "frames_start_idx", "frames_end_idx"),
    ),
    Requirement("DPTHead", "intermediate_layer_idx", head_of("depth_head")),
)
