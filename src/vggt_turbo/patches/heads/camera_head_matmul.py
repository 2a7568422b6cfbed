"""camera_head_matmul — wraps ``forward`` of each ``nn.Linear`` in the camera head.

The camera head runs in fp32 (upstream turns autocast off for the heads) on one token per frame, so its products
have as many rows as frames: for 10 frames, 10 rows against weights of up to 2048 x 8192. There cuBLAS's choice
for ``F.linear`` (x W^T, a "small-n" kernel) reads the weights well below the memory bandwidth, while the same
product asked the other way round, W x^T (its transpose), gets a kernel that streams them faster (the probe of
each shape and the model's A/B: benchmarks/RESULTS.md). So calls of ``ROWS`` rows compute ``addmm(b, W, x^T)``
and return its transpose, contiguous; with fewer rows (1 frame: cuBLAS's kernel is already at the bandwidth) or
more, upstream's call runs.

Exact: the same fp32 products of the same operands (no TF32, no lower precision), summed in another order by
another kernel; the outputs differ from upstream's by fp32 rounding only (tests: the CPU in fp32, and on the GPU
against upstream in fp32). Applies to inference calls (eval, autograd off) with fp32 inputs and weights outside
autocast, as upstream runs the head.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...autocast import autocast_dtype
from ...config import TurboConfig
from ...upstream import head_of, looks_like_vggt, members
from .._base import Patch, Target, Tier, join

ROWS = range(8, 101)  # rows (frames x batch) computed as W x^T: where it was measured faster, on an H200


def linear_forward(wrapped: Any, linear: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else kwargs.get("input")
    weight, bias = linear.weight, linear.bias
    if (linear.training or torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or x.dim() < 2
            or x.dtype != torch.float32 or weight.dtype != torch.float32
            or autocast_dtype(x.device.type) is not None or x.numel() // x.shape[-1] not in ROWS):
        return wrapped(*args, **kwargs)
    rows = x.reshape(-1, x.shape[-1])
    out = torch.mm(weight, rows.t()) if bias is None else torch.addmm(bias[:, None], weight, rows.t())
    return out.t().contiguous().reshape(*x.shape[:-1], weight.shape[0])


def _linears(root: nn.Module) -> list[str]:
    head = getattr(root, "camera_head", None) if looks_like_vggt(root) else None
    if head is None:
        return []
    return [join("camera_head", name) for name, module in head.named_modules() if type(module) is nn.Linear]


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    return [Target(path, "forward", linear_forward) for path in _linears(root)]


PATCH = Patch(
    name="camera_head_matmul",
    tier=Tier.EXACT,
    sequence_parallel=True,  # each call's own rows, wherever it runs
    summary=(
        "the camera head's fp32 products of 8 to 100 rows (frames) computed as W x^T, a kernel that streams the"
        " weights faster"
    ),
    requirements=members("CameraHead", head_of("camera_head"), ("trunk", None)),  # its linear layers are found in it
    enabled=lambda c: c.camera_head_matmul,
    targets=_targets,
)
