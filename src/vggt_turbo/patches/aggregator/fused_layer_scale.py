"""fused_layer_scale — replaces ``Block.forward(x, pos=None)`` of every frame and global block and
``NestedTensorBlock.forward(x_or_x_list)`` of the patch embed's (DINOv2) blocks, for tensor inputs.

Why faster: each residual step of upstream's block, ``x = x + ls(branch)``, is two passes over the token tensor:
LayerScale's broadcast product (PyTorch's slower non-vectorised kernel) and the sum. ``kernels.scale_add`` does
both in one pass and writes the block's second sum into its first one's buffer (a tensor of the block's own, not
an input or a kept output). The products and sums are a visible share of the forward at a few frames (profiles in
benchmarks/RESULTS.md).

Exact, bit for bit: the same operations with the same roundings (see ``kernels/scale_add.py``); the norms, attention
and MLP are upstream's own modules, called in upstream's order. With ``fused_add_norm`` on, each sum's kernel also
writes the LayerNorm that reads it next, saving that norm's pass over the tokens: the first sum's ``norm2``, and the
second sum's (the block's output) ``norm1`` of the block that runs next (frame, global and DINOv2 blocks in
upstream's order), handed over to it (``_Handoff``). LayerNorm in fp32 in another summation order: within an ulp of
the output dtype of PyTorch's, so exact (another summation order) rather than bit for bit. Outside autocast (a model
run natively in one dtype, e.g. under ``bf16_weights``) the norm is written in the sum's dtype. Under autocast the
sum stays in upstream's fp32 and the norm is written in the autocast dtype: upstream's norm returns fp32 there, and
the next operation, always a linear layer (the attention's ``qkv``, the MLP's ``fc1``), casts it to that dtype,
so the kernel rounds the same fp32 value once, as that cast would. Runs in inference (eval, autograd off) on any
device (the CPU runs the PyTorch reference); in training, with autograd on, for list inputs (the DINOv2
nested-tensor path) or when a LayerScale is absent (``init_values=None``) the next wrapper (or upstream) runs.

With ``chunked_mlp`` on, a sequence long enough to slice (``_token_slices``) runs its MLP here slice by slice, with
the same fused sums and norms per slice: the first sum and ``norm2`` of a slice, its MLP, then its second sum and
the next block's ``norm1``, each written into the rows of whole-sequence buffers. LayerNorm, the MLP and the sums
work row by row, so the slices compute what one pass would; the wide MLP activation exists for one slice at a time,
as under ``chunked_mlp`` alone.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn
from torch.nn.modules import module as torch_module

from ...config import TurboConfig
from ...autocast import autocast_dtype
from ...kernels.scale_add import scale_add, scale_add_norm
from ...upstream import (
    AGGREGATOR_LAYOUT,
    BLOCK_FORWARD,
    DINO_BLOCK_FORWARD,
    Method,
    aggregator_of,
    dino_blocks,
    first_block,
    first_dino_block,
    members,
)
from .. import _token_slices
from .._base import Patch, Target, Tier, aggregator_blocks, aggregator_path, join


def _gamma(layer_scale: nn.Module) -> Optional[torch.Tensor]:
    """The LayerScale's weight, or None when the module is not one (``nn.Identity`` without ``init_values``)."""
    gamma = getattr(layer_scale, "gamma", None)
    return gamma if isinstance(gamma, torch.Tensor) and gamma.dim() == 1 else None


def _fusable_norm(norm: nn.Module) -> bool:
    """A plain affine LayerNorm over the last dimension."""
    return (
        type(norm) is nn.LayerNorm
        and norm.elementwise_affine
        and isinstance(norm.bias, torch.Tensor)
        and len(norm.normalized_shape) == 1
    )


def _norm_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype the norm's consumer computes in: autocast's on ``x``'s device (None outside autocast: the sum's)."""
    return autocast_dtype(x.device.type)


class _Handoff:
    """The next block's ``norm1`` output, written by the previous block's last kernel.

    A block that knows which block runs after it (``_successors``) computes that block's ``norm1`` of its output in
    the same pass as the output itself and leaves it here; the next block takes it instead of running the norm if
    its input is that output (the same memory: the aggregator only reshapes it between blocks) and the norm is its
    own. Anything else — another order of calls, a hook that could change the tensors in between — finds no
    match or no handoff, and the block runs its norm as upstream does. One slot per model, emptied on every take.
    """

    def __init__(self) -> None:
        self._slot: Optional[tuple[torch.Tensor, nn.Module, torch.Tensor]] = None

    def put(self, total: torch.Tensor, norm: nn.Module, normed: torch.Tensor) -> None:
        self._slot = (total, norm, normed)

    def take(self, x: torch.Tensor, norm: nn.Module) -> Optional[torch.Tensor]:
        slot, self._slot = self._slot, None
        if slot is None:
            return None
        total, expected_norm, normed = slot
        same = (
            expected_norm is norm
            and x.data_ptr() == total.data_ptr()
            and x.numel() == total.numel()
            and x.dtype == total.dtype
            and x.is_contiguous()
        )
        return normed.view(x.shape) if same else None


def _hooked(*blocks: nn.Module) -> bool:
    """Whether a forward hook could see or change a block's output, or a pre-hook the next block's input."""
    if torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks:
        return True
    return any(b._forward_hooks or b._forward_pre_hooks for b in blocks)


def make_wrapper(
    forward: Method,
    fuse_norm: bool,
    handoff: _Handoff,
    successor: Optional[nn.Module] = None,
    slice_long: bool = False,
):
    """The wrapper of one block's ``forward`` (``BLOCK_FORWARD`` or ``DINO_BLOCK_FORWARD``). ``fuse_norm``
    (``fused_add_norm``): each sum and the norm after it in one pass where ``_fusable_norm``: ``norm2`` inside the
    block, and ``successor``'s ``norm1`` (the block that runs next, if any), handed over through ``handoff``.
    ``slice_long`` (``chunked_mlp``): a long sequence's MLP runs over row slices (``_token_slices``)."""

    def block_forward(wrapped: Any, block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        bound = forward.bind(*args, **kwargs)  # (x, pos), or a DINOv2 block's (x_or_x_list,)
        x, pos = bound[0], bound[1] if len(bound) > 1 else None
        gamma1, gamma2 = _gamma(block.ls1), _gamma(block.ls2)
        if block.training or torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or gamma1 is None or gamma2 is None:
            return wrapped(*args, **kwargs)
        normed = handoff.take(x, block.norm1)
        branch = block.attn(block.norm1(x) if normed is None else normed, pos=pos)
        following = successor.norm1 if successor is not None else None
        if not (fuse_norm and following is not None and _fusable_norm(following) and not _hooked(block, successor)):
            following = None
        tokens = x.numel() // x.shape[-1]
        if slice_long and _token_slices.is_long(tokens):
            return _sliced_residuals(block, x, branch, gamma1, gamma2, fuse_norm, following, handoff)
        if fuse_norm and _fusable_norm(block.norm2):
            x, normed = scale_add_norm(x, branch, gamma1, block.norm2.weight, block.norm2.bias, block.norm2.eps,
                                       norm_dtype=_norm_dtype(x))
        else:
            x = scale_add(x, branch, gamma1)
            normed = block.norm2(x)
        branch = block.mlp(normed)
        if following is not None:
            x, normed = scale_add_norm(x, branch, gamma2, following.weight, following.bias, following.eps, out=x,
                                       norm_dtype=_norm_dtype(x))
            handoff.put(x, following, normed)
            return x
        return scale_add(x, branch, gamma2, out=x)

    return block_forward


def _sliced_residuals(block: nn.Module, x: torch.Tensor, branch: torch.Tensor, gamma1: torch.Tensor,
                      gamma2: torch.Tensor, fuse_norm: bool, following: Optional[nn.Module],
                      handoff: _Handoff) -> torch.Tensor:
    """The block's two residual steps after its attention, row slice by row slice: the first sum (and ``norm2``),
    the MLP and the second sum (and ``following``'s norm, if any) of each slice written into the rows of
    whole-sequence buffers, so the MLP's wide activation exists for one slice at a time."""
    C = x.shape[-1]
    tokens = x.numel() // C
    dtype = torch.promote_types(x.dtype, torch.promote_types(branch.dtype, gamma1.dtype))
    total = torch.empty(x.shape, dtype=dtype, device=x.device)
    rows, branch_rows, total_rows = x.reshape(tokens, C), branch.reshape(tokens, C), total.view(tokens, C)
    norm_dtype = _norm_dtype(x)
    next_normed = None
    if following is not None:
        next_normed = torch.empty(x.shape, dtype=norm_dtype or dtype, device=x.device)
    next_rows = next_normed.view(tokens, C) if next_normed is not None else None
    norm2 = block.norm2
    for part in _token_slices.token_slices(tokens):
        out = total_rows[part]
        if fuse_norm and _fusable_norm(norm2):
            _, normed = scale_add_norm(rows[part], branch_rows[part], gamma1, norm2.weight, norm2.bias, norm2.eps,
                                       out=out, norm_dtype=norm_dtype)
        else:
            scale_add(rows[part], branch_rows[part], gamma1, out=out)
            normed = norm2(out)
        update = block.mlp(normed)
        if following is not None:
            scale_add_norm(out, update, gamma2, following.weight, following.bias, following.eps, out=out,
                           norm_dtype=norm_dtype, norm_out=next_rows[part])
        else:
            scale_add(out, update, gamma2, out=out)
    if next_normed is not None:
        handoff.put(total, following, next_normed)
    return total


def _aggregator_order(agg: nn.Module) -> list[nn.Module]:
    """The aggregator's blocks in the order its forward runs them (upstream's loop: ``aa_block_num`` groups, each
    ``aa_block_size`` blocks of every kind in ``aa_order``)."""
    kinds = {"frame": agg.frame_blocks, "global": agg.global_blocks}
    size = agg.aa_block_size
    return [
        kinds[kind][group * size + i]
        for group in range(agg.aa_block_num)
        for kind in agg.aa_order
        if kind in kinds
        for i in range(size)
    ]


def _successors(blocks: list[nn.Module]) -> dict[int, nn.Module]:
    return {id(a): b for a, b in zip(blocks, blocks[1:])}


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    agg = aggregator_of(root)
    path = aggregator_path(root)
    handoff = _Handoff()
    following = _successors(_aggregator_order(agg))
    targets = [
        Target(
            block_path,
            "forward",
            make_wrapper(BLOCK_FORWARD, config.fused_add_norm, handoff, following.get(id(block)), config.chunked_mlp),
        )
        for block_path, block in aggregator_blocks(root)
    ]
    dino = dino_blocks(root)
    following = _successors(dino)
    return targets + [
        Target(
            join(path, "patch_embed", "blocks", str(i)),
            "forward",
            make_wrapper(DINO_BLOCK_FORWARD, config.fused_add_norm, handoff, following.get(id(block))),
        )
        for i, block in enumerate(dino)
    ]


BLOCK_MEMBERS = (("norm1", None), ("attn", None), ("ls1", None), ("norm2", None), ("mlp", None), ("ls2", None))

PATCH = Patch(
    name="fused_layer_scale",
    tier=Tier.EXACT,
    sequence_parallel=True,  # token-wise: the same sums on each rank's own tokens (fused_add_norm too)
    summary="every block's LayerScale product and residual sum in one pass (bit for bit)",
    dependent_options=("fused_add_norm",),
    options={
        "fused_add_norm": (
            "each residual sum and the LayerNorm after it in one pass: the fp32 sum kept, the norm "
            "written in the dtype the next matmul reads"
        ),
    },
    requirements=AGGREGATOR_LAYOUT
    + members("Aggregator", aggregator_of, ("aa_block_num", None))
    + (BLOCK_FORWARD.requirement,)
    + members("Block", first_block, *BLOCK_MEMBERS)
    + (DINO_BLOCK_FORWARD.requirement,)
    + members("NestedTensorBlock", first_dino_block, *BLOCK_MEMBERS),
    enabled=lambda c: c.fused_layer_scale,
    targets=_targets,
)
