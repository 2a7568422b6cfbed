"""fused_dpt_upsample — replaces ``DPTHead._forward_impl(aggregated_tokens_list, images, patch_start_idx,
frames_start_idx, frames_end_idx)`` and ``FeatureFusionBlock.forward(*xs, size)`` of the depth and point heads
(and of the track head's feature extractor).

Why faster: the DPT heads run in fp32 and spend much of their time outside their convolutions (profiled on an
H100 at 10 frames: 23 % in bilinear resizes, 16 % in elementwise additions, against 37 % in convolutions):
  - PyTorch's channels-last bilinear kernel is slow; ``kernels/bilinear.py`` does the same arithmetic in one
    vectorised Triton pass;
  - the last resize (to the image size, 128 channels) is followed by ``x + pos_embed``, a second full-size pass;
    the kernel adds the embedding before its store, from two small tables (the embedding is separable);
  - upstream rebuilds the positional embeddings (a float64 sin/cos grid, up to 518² x 128) in every call, for
    every chunk of 8 frames and every head; here they are built once per shape by upstream's own functions and
    cached (at most ``MAX_CACHED`` shapes per head; past that they are rebuilt per call, as upstream does).
Everything else is upstream's modules, called in upstream's order.

Exact: the cached embeddings are upstream's values bit for bit, and the resize is PyTorch's arithmetic with its
fused multiply-adds: on an H100 with torch 2.11 the heads' outputs equal upstream's bit for bit (GPU test). On the
CPU, or without triton, the resize is PyTorch's own and the outputs equal upstream's bit for bit too. With autograd on, in
training, for a fusion block without ``align_corners``, or for inputs past upstream's ``custom_interpolate`` limit
(which it splits by batch), upstream's code runs.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable, Optional

import torch
from torch import nn

from ...config import TurboConfig
from ...kernels.bilinear import SeparableMap, bilinear
from ...upstream import DPT_FORWARD_IMPL, dpt_heads, first_dpt_head, members
from .._base import Patch, Target, Tier

MAX_CACHED = 32  # embeddings kept per head: 5 per input resolution (4 levels + the output), tens of MB in all
INT_MAX = 1610612736  # upstream custom_interpolate's limit on output elements per call


def _module_of(head: nn.Module) -> types.ModuleType:
    """The upstream module that defines the head's class: its helpers (pos-embed, activation) are the head's."""
    return sys.modules[type(head).__module__]


def _unchanged(module: nn.Module) -> bool:
    """Whether upstream's own code must run: autograd (the kernel has no backward) or training mode."""
    return module.training or torch.is_grad_enabled()


class _Embeddings:
    """DPT's positional embeddings (``_apply_pos_embed``'s ``pos_embed * ratio``) per shape, built once."""

    def __init__(self, module: types.ModuleType):
        self.module = module  # the head's upstream module: its create_uv_grid and position_grid_to_embed
        self.cache: dict[tuple, Any] = {}

    def _grid_embed(self, h: int, w: int, channels: int, W: int, H: int, ratio: float, dtype: torch.dtype,
                    device: torch.device, rows: Optional[slice] = None, cols: Optional[slice] = None) -> torch.Tensor:
        grid = self.module.create_uv_grid(w, h, aspect_ratio=W / H, dtype=dtype, device=device)
        if rows is not None:
            grid = grid[rows, cols]
        return self.module.position_grid_to_embed(grid, channels) * ratio

    def _get(self, key: tuple, build: Callable[[], Any]) -> Any:
        got = self.cache.get(key)
        if got is None:
            got = build()
            if len(self.cache) < MAX_CACHED:
                self.cache[key] = got
        return got

    def full(self, x: torch.Tensor, W: int, H: int, ratio: float = 0.1) -> torch.Tensor:
        """The (h, w, C) embedding upstream adds to ``x`` (N, C, h, w)."""
        h, w, c = x.shape[-2], x.shape[-1], x.shape[1]
        key = ("full", h, w, c, W, H, ratio, x.dtype, x.device)
        return self._get(key, lambda: self._grid_embed(h, w, c, W, H, ratio, x.dtype, x.device))

    def separable(self, size: tuple[int, int], channels: int, W: int, H: int, dtype: torch.dtype,
                  device: torch.device, ratio: float = 0.1) -> SeparableMap:
        """The same embedding for an (h, w) map as two tables: its first half of channels embeds the column's x
        coordinate (taken from grid row 0), the second half the row's y coordinate (from grid column 0)."""
        h, w = size
        key = ("separable", h, w, channels, W, H, ratio, dtype, device)

        def build() -> SeparableMap:
            by_col = self._grid_embed(h, w, channels, W, H, ratio, dtype, device, slice(0, 1), slice(None))[0]
            by_row = self._grid_embed(h, w, channels, W, H, ratio, dtype, device, slice(None), slice(0, 1))[:, 0]
            return SeparableMap(rows=by_row.contiguous(), cols=by_col.contiguous(), split=channels // 2)

        return self._get(key, build)


def _add_pos(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Upstream's ``x + pos_embed.permute(2, 0, 1)[None].expand(x.shape[0], -1, -1, -1)``."""
    return x + pos.permute(2, 0, 1)[None].expand(x.shape[0], -1, -1, -1)


def _resize(module: types.ModuleType, x: torch.Tensor, size: tuple[int, int], pos: Optional[SeparableMap]) -> torch.Tensor:
    """``custom_interpolate(x, size, bilinear, align_corners=True)`` (then ``+ pos``) in one pass; past upstream's
    element limit its own batch-splitting function runs."""
    if size[0] * size[1] * x.shape[0] * x.shape[1] > INT_MAX:
        out = module.custom_interpolate(x, size, mode="bilinear", align_corners=True)
        return out if pos is None else _add_pos(out, pos.full())
    return bilinear(x, size, pos)


def make_dpt_forward_impl(head: nn.Module) -> Callable[..., Any]:
    module = _module_of(head)
    embeddings = _Embeddings(module)

    def dpt_forward_impl(wrapped: Any, head: nn.Module, args: tuple, kwargs: dict) -> Any:
        if _unchanged(head):
            return wrapped(*args, **kwargs)
        tokens, images, patch_start_idx, start, end = DPT_FORWARD_IMPL.bind(*args, **kwargs)
        chunk = start is not None and end is not None
        B, S, _, H, W = images[:, start:end].shape if chunk else images.shape
        patch_h, patch_w = H // head.patch_size, W // head.patch_size
        levels = []
        for dpt_idx, layer_idx in enumerate(head.intermediate_layer_idx):
            x = tokens[layer_idx][:, :, patch_start_idx:]
            if chunk:
                x = x[:, start:end]
            x = head.norm(x.reshape(B * S, -1, x.shape[-1]))
            x = x.permute(0, 2, 1).reshape((x.shape[0], x.shape[-1], patch_h, patch_w))
            x = head.projects[dpt_idx](x)
            if head.pos_embed:
                x = _add_pos(x, embeddings.full(x, W, H))
            levels.append(head.resize_layers[dpt_idx](x))
        out = head.scratch_forward(levels)
        del levels
        size = (int(patch_h * head.patch_size / head.down_ratio), int(patch_w * head.patch_size / head.down_ratio))
        pos = embeddings.separable(size, out.shape[1], W, H, out.dtype, out.device) if head.pos_embed else None
        out = _resize(module, out, size, pos)
        if head.feature_only:
            return out.view(B, S, *out.shape[1:])
        out = head.scratch.output_conv2(out)
        preds, conf = module.activate_head(out, activation=head.activation, conf_activation=head.conf_activation)
        return preds.view(B, S, *preds.shape[1:]), conf.view(B, S, *conf.shape[1:])

    return dpt_forward_impl


def make_fusion_forward(head: nn.Module) -> Callable[..., Any]:
    module = _module_of(head)

    def fusion_forward(wrapped: Any, block: nn.Module, args: tuple, kwargs: dict) -> Any:
        if _unchanged(block) or not block.align_corners or set(kwargs) - {"size"}:
            return wrapped(*args, **kwargs)
        xs, size = args, kwargs.get("size")
        output = xs[0]
        if block.has_residual:
            output = block.skip_add.add(output, block.resConfUnit1(xs[1]))
        output = block.resConfUnit2(output)
        if size is None:
            size = block.size if block.size is not None else (int(output.shape[-2] * 2), int(output.shape[-1] * 2))
        if isinstance(size, int):
            size = (size, size)
        output = _resize(module, output, tuple(size), None)
        return block.out_conv(output)

    return fusion_forward


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    targets = []
    for path, head in dpt_heads(root):
        targets.append(Target(path, "_forward_impl", make_dpt_forward_impl(head)))
        fusion = make_fusion_forward(head)
        targets += [Target(f"{path}.scratch.refinenet{i}", "forward", fusion) for i in range(1, 5)]
    return targets


def _first_head_module(root: nn.Module) -> Optional[types.ModuleType]:
    head = first_dpt_head(root)
    return _module_of(head) if head is not None else None


def _first_fusion_block(root: nn.Module) -> Optional[nn.Module]:
    head = first_dpt_head(root)
    return head.scratch.refinenet1 if head is not None and hasattr(head, "scratch") else None


REQUIREMENTS = (
    DPT_FORWARD_IMPL.requirement_at(first_dpt_head),  # any DPT head: this patch replaces every one's
    *members(
        "DPTHead",
        first_dpt_head,
        ("intermediate_layer_idx", None),
        ("patch_size", None),
        ("norm", None),
        ("projects", None),
        ("resize_layers", None),
        ("pos_embed", None),
        ("scratch_forward", ("features",)),
        ("scratch", None),
        ("feature_only", None),
        ("down_ratio", None),
        ("activation", None),
        ("conf_activation", None),
    ),
    *members(
        "dpt_head",
        _first_head_module,
        ("create_uv_grid", None),
        ("position_grid_to_embed", None),
        ("custom_interpolate", None),
        ("activate_head", None),
    ),
    *members(
        "FeatureFusionBlock",
        _first_fusion_block,
        ("forward", ("xs", "size")),
        ("has_residual", None),
        ("resConfUnit2", None),
        ("skip_add", None),
        ("size", None),
        ("align_corners", None),
        ("out_conv", None),
    ),
)

PATCH = Patch(
    name="fused_dpt_upsample",
    tier=Tier.EXACT,
    sequence_parallel=True,  # the DPT heads run on each rank's own frames, as in one process
    summary="the DPT heads' bilinear resizes in one Triton kernel each; positional embeddings built once per shape",
    requirements=REQUIREMENTS,
    enabled=lambda c: c.fused_dpt_upsample,
    targets=_targets,
)
