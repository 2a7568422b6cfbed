"""dpt_channels_last — replaces ``forward(input)`` of the DPT heads' ``projects`` convolutions (the first layer each
level of tokens goes through, in the depth, point and track-feature heads).

Why faster: the heads reshape each level's tokens (N, H*W, C) into an (N, C, H, W) map by ``permute`` and
``reshape``, which gives it channels-last memory. With two or more frames PyTorch sees that and runs every
convolution of the head channels-last. With one frame (N = 1) the reshape leaves a stride on the size-1 batch
dimension that PyTorch's layout check (``suggest_memory_format``) reads as "not channels-last", so the whole head
runs on contiguous (NCHW) maps and cuDNN transposes to NHWC and back around each convolution. This patch gives
the map the canonical channels-last strides before the first convolution: a view of the same memory (a size-1
dimension's stride addresses nothing), so no copy; from there on the head runs as it does for two or more frames.
Measured with and without it in one process on an H100 at 1 frame: faster heads, a faster CUDA-graph replay and
less memory reserved (``benchmarks/results/nvidia-h100-80gb-hbm3/dpt_heads_channels_last.json`` and
``ab_dpt_channels_last.json``).

Exact to rounding (‡), not bit for bit at one frame: the convolutions then run on other cuDNN kernels (the ones
upstream itself uses for every call of two or more frames), whose TF32 sums round differently. Measured on the
H100 at one frame against upstream's heads: world points 1.2e-4 relative (‖a−b‖/‖b‖; 3.7e-4 of the largest
value at most), depth 5e-6, confidences 3e-6. With two or more frames the map already has these strides and
nothing changes (bit for bit). Inference only (eval, autograd off); elsewhere upstream's call runs unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import TurboConfig
from ...upstream import dpt_heads, first_dpt_head, members
from .._base import Patch, Target, Tier


def channels_last_view(x: torch.Tensor) -> torch.Tensor:
    """``x`` (N, C, H, W), channels-last in memory, as a view with the canonical channels-last strides, which
    PyTorch's layout checks recognise; other tensors are returned as they are."""
    if x.dim() != 4 or not x.is_contiguous(memory_format=torch.channels_last):
        return x
    _, C, H, W = x.shape
    strides = (C * H * W, 1, W * C, C)
    return x if x.stride() == strides else x.as_strided(x.shape, strides)


def projects_forward(wrapped: Any, conv: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    if conv.training or torch.is_grad_enabled() or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return wrapped(*args, **kwargs)
    return wrapped(channels_last_view(args[0]), **kwargs)


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    return [
        Target(f"{path}.projects.{i}", "forward", projects_forward)
        for path, head in dpt_heads(root)
        for i in range(len(head.projects))
    ]


PATCH = Patch(
    name="dpt_channels_last",
    tier=Tier.EXACT,
    sequence_parallel=True,  # a view of each rank's own feature maps
    summary="the DPT heads' first feature maps given channels-last strides (a view), as upstream gets from 2 frames on",
    requirements=members("DPTHead", first_dpt_head, ("projects", None)),
    enabled=lambda c: c.dpt_channels_last,
    targets=_targets,
)
