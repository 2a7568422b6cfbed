"""cached_positions — replaces ``Aggregator.forward(images)``.

Why faster: upstream's forward rebuilds the RoPE positions on every call — it clones the (B*S, P, 2) grid and
creates the special tokens' zero positions on the CPU, then copies them to the GPU (``torch.zeros(...).to(dev)``).
That host-to-device copy costs a synchronising transfer per call and makes the forward impossible to capture in
a CUDA graph. This version builds the full position tensor once per (frames, grid, device) directly on the
device and reuses it; everything else is upstream's sequence: normalise, patch embed, special tokens, then the
alternating frame/global steps through the (possibly patched) ``_process_frame_attention`` and
``_process_global_attention``. The returned list has upstream's layout for the installed version: ``None`` for
layers outside ``cached_layer_indices`` (pinned upstream), or every layer (older upstream, which has none).

It is also leaner: upstream's forward holds the normalised images, the patch tokens and the first token tensor
through all 48 blocks (about 1.4 GiB at 100 frames); here they are freed once the tokens exist.

Exact: the same values in the same order. In training mode upstream's forward runs unchanged.
"""

from __future__ import annotations

import weakref
from typing import Any, Optional

import torch
from torch import nn

from ...config import TurboConfig
from ...upstream import AGGREGATOR_FORWARD, AGGREGATOR_LAYOUT, AGGREGATOR_STEPS, aggregator_of, members, upstream_module
from .._base import Patch, Target, Tier, aggregator_path
from .._store import STORE

_MAX_CACHED_SHAPES = 8


class PositionCache:
    """Per aggregator: (B*S, grid h, grid w, device) -> positions (B*S, P, 2), specials at 0, patches at grid+1."""

    def __init__(self) -> None:
        self._by_key: dict[tuple, torch.Tensor] = {}

    def get(self, aggregator: nn.Module, frames: int, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        key = (frames, grid_h, grid_w, device)
        pos = self._by_key.get(key)
        if pos is None:
            # .to(device): upstream's PositionGetter caches per grid size, not per device, so a model run on the
            # CPU before .cuda() would hand back CPU positions.
            grid = aggregator.position_getter(1, grid_h, grid_w, device=device)[0].to(device)
            if aggregator.patch_start_idx > 0:
                grid = torch.cat([grid.new_zeros(aggregator.patch_start_idx, 2), grid + 1])
            pos = grid.expand(frames, -1, -1).contiguous()
            if len(self._by_key) >= _MAX_CACHED_SHAPES:
                self._by_key.pop(next(iter(self._by_key)))
            self._by_key[key] = pos
        return pos


def make_wrapper():
    """The ``Aggregator.forward`` wrapper; its position caches are per aggregator instance (weakly held)."""
    caches: "weakref.WeakKeyDictionary[nn.Module, PositionCache]" = weakref.WeakKeyDictionary()

    def aggregator_forward(wrapped: Any, agg: nn.Module, args: tuple, kwargs: dict) -> Any:
        if agg.training or agg.rope is None:
            return wrapped(*args, **kwargs)
        cache = caches.get(agg)
        if cache is None:
            cache = caches[agg] = PositionCache()
        # Built inside the call expression: no local of this frame keeps the first tokens alive during the loop.
        return _alternate(agg, *_embed(agg, AGGREGATOR_FORWARD.bind(*args, **kwargs)[0], cache)), agg.patch_start_idx

    return aggregator_forward


def _embed(agg: nn.Module, images: torch.Tensor, cache: PositionCache) -> tuple:
    """Upstream's input stage: normalise, patch embed, prepend camera and register tokens; plus the positions.

    Returns (tokens, B, S, P, C, pos). The normalised images and patch tokens die when this returns (upstream
    keeps both alive through the whole forward).
    """
    from vggt.models.aggregator import slice_expand_and_flatten

    B, S, C_in, H, W = images.shape
    if C_in != 3:
        raise ValueError(f"Expected 3 input channels, got {C_in}")
    images = (images - agg._resnet_mean) / agg._resnet_std
    patch_tokens = agg.patch_embed(images.view(B * S, C_in, H, W))
    if isinstance(patch_tokens, dict):
        patch_tokens = patch_tokens["x_norm_patchtokens"]
    camera = slice_expand_and_flatten(agg.camera_token, B, S)
    register = slice_expand_and_flatten(agg.register_token, B, S)
    tokens = torch.cat([camera, register, patch_tokens], dim=1)
    _, P, C = tokens.shape
    pos = cache.get(agg, B * S, H // agg.patch_size, W // agg.patch_size, images.device)
    return tokens, B, S, P, C, pos


def _alternate(agg: nn.Module, tokens: torch.Tensor, B: int, S: int, P: int, C: int, pos: torch.Tensor) -> list:
    """Upstream's alternating frame/global loop and its output list (see module docstring)."""
    cached: Optional[set] = getattr(agg, "cached_layer_indices", None)
    frame_idx = global_idx = 0
    outputs: list[Optional[torch.Tensor]] = []
    for _ in range(agg.aa_block_num):
        for kind in agg.aa_order:
            if kind == "frame":
                tokens, frame_idx, frame_inter = agg._process_frame_attention(tokens, B, S, P, C, frame_idx, pos=pos)
            elif kind == "global":
                tokens, global_idx, global_inter = agg._process_global_attention(tokens, B, S, P, C, global_idx, pos=pos)
            else:
                raise ValueError(f"Unknown attention type: {kind}")
        store = STORE.get()
        for f, g in zip(frame_inter, global_inter):
            keep = cached is None or len(outputs) in cached
            outputs.append(store(torch.cat([f, g], dim=-1)) if keep else None)
    return outputs


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    return [Target(aggregator_path(root), "forward", make_wrapper())]


PATCH = Patch(
    name="cached_positions",
    tier=Tier.EXACT,
    sequence_parallel=True,
    summary="RoPE positions built once per shape on the GPU; input-stage tensors freed early",
    requirements=AGGREGATOR_LAYOUT
    + AGGREGATOR_STEPS
    + members(
        "Aggregator",
        aggregator_of,
        ("aa_block_num", None),
        ("patch_start_idx", None),
        ("patch_size", None),
        ("position_getter", None),
        ("camera_token", None),
        ("register_token", None),
        ("_resnet_mean", None),
        ("_resnet_std", None),
    )
    + members(
        "vggt.models.aggregator",
        upstream_module("vggt.models.aggregator"),
        ("slice_expand_and_flatten", ("token_tensor", "B", "S")),
    ),
    enabled=lambda c: c.cached_positions,
    targets=_targets,
)
