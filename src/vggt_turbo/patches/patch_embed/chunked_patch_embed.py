"""chunked_patch_embed — wraps ``Aggregator.patch_embed.forward(x)`` (the DINOv2 ViT, or the conv ``PatchEmbed``).

Why leaner: upstream's ``Aggregator.forward`` runs the patch embed over all B*S frames in one call. For the full
model that is a ViT-L of 24 blocks: its 4x-wide MLP activation and its qkv exist for every token of the whole
sequence at once (about 3 GiB transient at 100 frames in bf16), the largest transient of the aggregator at long
sequences. This version runs it over slices of at most ``CHUNK_FRAMES`` frames and writes each slice's outputs into
output tensors allocated once (no ``torch.cat``, which would hold every slice and the result together): the
transient is one slice's, the outputs are upstream's size. 16 frames are ~22k tokens, enough rows for the matmuls
to run at full speed; calls with at most ``CHUNK_FRAMES`` frames run upstream's code unchanged.

The outputs keep upstream's structure: a tensor for the conv patch embed, the same dict (same keys) for DINOv2,
each tensor value assembled along dim 0 (frames); ``None`` values (``masks``) stay ``None``. DINOv2's
``x_norm_*`` values are views of one tensor in upstream; here they are separate tensors with the same values
(the same bytes in all). Under ``bf16_weights``, which casts the patch embed's input to bf16, this wrapper sits
outside: each slice is cast on its own, so no bf16 copy of all the images exists either.

Exact: every frame is embedded independently (the ViT attends within a frame only), so each frame's outputs are
computed by the same operations on the same values. A smaller batch may select other GEMM/convolution kernels on
the GPU, whose rounding can differ in the last bits (at the dtype's rounding). In training, with autograd on, or
for a call other than upstream's ``patch_embed(images)`` (one 4-D tensor, no keyword), upstream's forward runs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from ...config import TurboConfig
from ...upstream import Requirement, aggregator_of
from .._base import Patch, Target, Tier, aggregator_path, join

CHUNK_FRAMES = 16


def _allocate(first: Any, frames: int, chunk: int) -> Optional[Any]:
    """Empty outputs for all ``frames``, shaped like ``first`` (the outputs of the first ``chunk`` frames); None
    when ``first`` is not laid out frame by frame (then the caller runs the call whole)."""

    def like(t: Any) -> Optional[torch.Tensor]:
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != chunk:
            return None
        return t.new_empty((frames, *t.shape[1:]))

    if isinstance(first, torch.Tensor):
        return like(first)
    if not isinstance(first, dict):
        return None
    out = {}
    for key, value in first.items():
        if value is None:
            out[key] = None
            continue
        out[key] = like(value)
        if out[key] is None:
            return None
    return out


def _write(out: Any, part: Any, start: int) -> None:
    """Copy one slice's outputs into rows ``start:`` of ``out``."""
    if isinstance(out, torch.Tensor):
        out[start : start + part.shape[0]].copy_(part)
        return
    for key, value in out.items():
        if value is not None:
            value[start : start + part[key].shape[0]].copy_(part[key])


def patch_embed_forward(wrapped: Any, embed: nn.Module, args: tuple, kwargs: dict) -> Any:
    chunk = CHUNK_FRAMES
    x = args[0] if len(args) == 1 else None
    if (
        kwargs
        or not isinstance(x, torch.Tensor)
        or x.dim() != 4
        or x.shape[0] <= chunk
        or embed.training
        or torch.is_grad_enabled()
    ):
        return wrapped(*args, **kwargs)
    frames = x.shape[0]
    part = wrapped(x[:chunk])
    out = _allocate(part, frames, chunk)
    if out is None:  # an output this wrapper does not know how to assemble: upstream's call, whole
        del part
        return wrapped(x)
    _write(out, part, 0)
    del part
    for start in range(chunk, frames, chunk):
        _write(out, wrapped(x[start : start + chunk]), start)
    return out


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    return [Target(join(aggregator_path(root), "patch_embed"), "forward", patch_embed_forward)]


PATCH = Patch(
    name="chunked_patch_embed",
    tier=Tier.EXACT,
    sequence_parallel=True,  # each rank embeds its own frames, a slice at a time
    summary="the DINOv2 patch embed over slices of 16 frames (long sequences)",
    requirements=(Requirement("Aggregator", "patch_embed", aggregator_of),),
    enabled=lambda c: c.chunked_patch_embed,
    targets=_targets,
)
