"""fused_layer_scale — replaces ``Block.forward(x, pos=None)`` of every frame and global block and
``NestedTensorBlock.forward(x_or_x_list)`` of the patch embed's (DINOv2) blocks, for tensor inputs.

Why faster: each residual step of upstream's block, ``x = x + ls(branch)``, is two passes over the token tensor:
LayerScale's broadcast product (PyTorch's slower non-vectorised kernel) and the sum. ``kernels.scale_add`` does
both in one pass and writes the block's second sum into its first one's buffer (a tensor of the block's own, not
an input or a kept output). Measured on an H100 at 10 frames, the products and sums took 3.2 ms of each 24-block
stack (about 10 ms of the forward).

Exact, bit for bit: the same operations with the same roundings (see ``kernels/scale_add.py``); the norms,
attention and MLP are upstream's own modules, called in upstream's order. With ``fused_add_norm`` on, the first
sum's kernel also writes ``norm2`` of it (LayerNorm in fp32 in another summation order: within an ulp of the
output dtype of PyTorch's, so exact to bf16 rounding rather than bit for bit), saving that norm's pass over the
tokens; it applies outside autocast only (with ``bf16_weights``), where ``norm2`` returns the sum's dtype. Runs in inference (eval, autograd off)
on any device (the CPU runs the PyTorch reference); in training, with autograd on, for list inputs (the DINOv2
nested-tensor path) or when a LayerScale is absent (``init_values=None``) upstream runs. Sequences long enough for
``chunked_mlp`` to slice take its path instead, with PyTorch's sums (there attention dominates the time).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from ..config import TurboConfig
from ..autocast import autocast_dtype
from ..kernels.scale_add import scale_add, scale_add_norm
from ..upstream import AGGREGATOR_LAYOUT, aggregator_of, dino_blocks, first_block, members
from ._base import Patch, Target, aggregator_path, join


def _x_pos(x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    return x, pos


def _x_or_x_list(x_or_x_list: Any) -> tuple[Any, None]:
    return x_or_x_list, None


def _gamma(layer_scale: nn.Module) -> Optional[torch.Tensor]:
    """The LayerScale's weight, or None when the module is not one (``nn.Identity`` without ``init_values``)."""
    gamma = getattr(layer_scale, "gamma", None)
    return gamma if isinstance(gamma, torch.Tensor) and gamma.dim() == 1 else None


def _fusable_norm(norm: nn.Module) -> bool:
    """A plain affine LayerNorm over the last dimension, outside autocast (which would run it in fp32)."""
    return (
        type(norm) is nn.LayerNorm
        and norm.elementwise_affine
        and isinstance(norm.bias, torch.Tensor)
        and len(norm.normalized_shape) == 1
        and autocast_dtype(norm.weight.device.type) is None
    )


def make_wrapper(bind: Callable[..., tuple[Any, Optional[torch.Tensor]]], fuse_norm: bool):
    """The block forward wrapper for one upstream signature (``bind`` names its arguments); ``fuse_norm``
    (``fused_add_norm``): the first sum and ``norm2`` of it in one pass where ``_fusable_norm``."""

    def block_forward(wrapped: Any, block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        x, pos = bind(*args, **kwargs)
        gamma1, gamma2 = _gamma(block.ls1), _gamma(block.ls2)
        if block.training or torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or gamma1 is None or gamma2 is None:
            return wrapped(*args, **kwargs)
        branch = block.attn(block.norm1(x), pos=pos)
        if fuse_norm and _fusable_norm(block.norm2):
            x, normed = scale_add_norm(x, branch, gamma1, block.norm2.weight, block.norm2.bias, block.norm2.eps)
        else:
            x = scale_add(x, branch, gamma1)
            normed = block.norm2(x)
        return scale_add(x, block.mlp(normed), gamma2, out=x)

    return block_forward


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    agg = aggregator_of(root)
    path = aggregator_path(root)
    aggregator_blocks = make_wrapper(_x_pos, config.fused_add_norm)
    targets = [
        Target(join(path, kind, str(i)), "forward", aggregator_blocks)
        for kind in ("frame_blocks", "global_blocks")
        for i in range(len(getattr(agg, kind)))
    ]
    dino = make_wrapper(_x_or_x_list, config.fused_add_norm)
    return targets + [Target(join(path, "patch_embed", "blocks", str(i)), "forward", dino) for i in range(len(dino_blocks(root)))]


def _first_dino_block(root: nn.Module) -> Optional[nn.Module]:
    blocks = dino_blocks(root)
    return blocks[0] if blocks else first_block(root)  # no DINO blocks: nothing more to check


BLOCK_MEMBERS = (("norm1", None), ("attn", None), ("ls1", None), ("norm2", None), ("mlp", None), ("ls2", None))

PATCH = Patch(
    name="fused_layer_scale",
    exact=True,
    requirements=AGGREGATOR_LAYOUT
    + members("Block", first_block, ("forward", ("x", "pos")), *BLOCK_MEMBERS)
    + members("NestedTensorBlock", _first_dino_block, *BLOCK_MEMBERS),
    enabled=lambda c: c.fused_layer_scale,
    targets=_targets,
)
