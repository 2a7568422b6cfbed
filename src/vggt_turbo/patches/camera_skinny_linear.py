"""camera_skinny_linear — replaces ``Linear.forward(input)`` of every linear layer of the camera head.

Why faster: the camera head runs in fp32 on one token per frame (its trunk: 4 blocks of 2048 wide, 4 refinement
iterations), so with a few frames each product reads a large fp32 weight for a handful of rows. cuBLAS runs a gemv
for one row but a many-row GEMM kernel for 2–16, which reads the weights at a fraction of the memory's speed
(``kernels/skinny_linear.py``); here calls of at most 16 rows run the Triton kernel there, which streams each weight
once.

Exact to fp32 rounding: the same fp32 products and sums in another order (a few ulps from cuBLAS's). Runs on CUDA
for fp32 calls of at most ``kernels.skinny_linear.MAX_ROWS`` rows outside autocast and autograd (upstream runs its
heads with autocast off); any other call, and every call in training, runs upstream's ``F.linear``. With
``single_key_attention`` on, the value rows it multiplies go through the same kernel (``camera_linear``).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..autocast import autocast_dtype
from ..config import TurboConfig
from ..kernels.skinny_linear import skinny_linear
from ..upstream import looks_like_vggt, members
from ._base import Patch, Target, join


def _input(input: torch.Tensor) -> torch.Tensor:
    return input


def camera_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, on the skinny kernel where it covers the call and CUDA autocast is off (under
    autocast ``F.linear`` would round to the autocast dtype; the kernel is fp32 only)."""
    if x.is_cuda and autocast_dtype("cuda") is None:
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_forward(wrapped: Any, linear: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    x = _input(*args, **kwargs)
    if linear.training or not isinstance(x, torch.Tensor):
        return wrapped(*args, **kwargs)
    return camera_linear(x, linear.weight, linear.bias)


def _camera_head(root: nn.Module) -> Any:
    return getattr(root, "camera_head", None) if looks_like_vggt(root) else None


def _linears(root: nn.Module) -> list[str]:
    head = _camera_head(root)
    if head is None:
        return []
    return [name for name, module in head.named_modules() if type(module) is nn.Linear]


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    return [Target(join("camera_head", name), "forward", linear_forward) for name in _linears(root)]


def _first_linear(root: nn.Module) -> Any:
    names = _linears(root)
    return _camera_head(root).get_submodule(names[0]) if names else None


PATCH = Patch(
    name="camera_skinny_linear",
    exact=True,
    requirements=members("Linear", _first_linear, ("forward", ("input",)), ("weight", None), ("bias", None)),
    enabled=lambda c: c.camera_skinny_linear,
    targets=_targets,
)
