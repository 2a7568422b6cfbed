"""chunked_mlp — replaces ``Block.forward(x, pos=None)`` of every frame and global block.

Why leaner: a block's MLP widens each token to 4x the model width (4,096 values for the full model) and its
activation keeps a second such tensor: at 200 frames (274,800 tokens) that is 2 x 2.1 GiB in bf16 at once,
the largest transient of the whole forward. Every MLP step (LayerNorm, the two linears, GELU, LayerScale) works
token by token, so this version adds the MLP's residual in place, one slice of tokens at a time: the wide
activation never exists for more than one slice (``_token_slices``). The slices are large enough for the matmuls
to run at full speed; sequences with fewer tokens run upstream's code unchanged. With ``fused_layer_scale`` on,
that patch's block wrapper (stacked above this one) slices the MLP itself, with its fused sums; this wrapper then
serves the calls it leaves to upstream's forward (e.g. a block without LayerScale).

Exact: the same operations on the same rows (a matmul over fewer rows may pick another kernel, whose rounding can
differ in the last bits). In training or with autograd on, upstream's forward runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import TurboConfig
from ...upstream import AGGREGATOR_LAYOUT, BLOCK_FORWARD, first_block, members
from .. import _token_slices
from .._base import Patch, Target, Tier, aggregator_blocks


def block_forward(wrapped: Any, block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    x, pos = BLOCK_FORWARD.bind(*args, **kwargs)
    tokens = x.numel() // x.shape[-1]
    if block.training or torch.is_grad_enabled() or not _token_slices.is_long(tokens):
        return wrapped(*args, **kwargs)
    x = x + block.ls1(block.attn(block.norm1(x), pos=pos))
    rows = x.view(tokens, x.shape[-1])
    for part_rows in _token_slices.token_slices(tokens):
        part = rows[part_rows]
        update = block.ls2(block.mlp(block.norm2(part)))
        if update.dtype != rows.dtype:  # upstream's out-of-place add would promote: do the same, once
            x = x.to(torch.promote_types(x.dtype, update.dtype))
            rows = x.view(tokens, x.shape[-1])
            part = rows[part_rows]
        part += update
    return x


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    return [Target(path, "forward", block_forward) for path, _ in aggregator_blocks(root)]


PATCH = Patch(
    name="chunked_mlp",
    tier=Tier.EXACT,
    sequence_parallel=True,
    summary="the blocks' MLP over 32,768-token slices (long sequences)",
    requirements=AGGREGATOR_LAYOUT
    + (BLOCK_FORWARD.requirement,)
    + members(
        "Block",
        first_block,
        ("norm1", None),
        ("attn", None),
        ("ls1", None),
        ("norm2", None),
        ("mlp", None),
        ("ls2", None),
    ),
    enabled=lambda c: c.chunked_mlp,
    targets=_targets,
)
