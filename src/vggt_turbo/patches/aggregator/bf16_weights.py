"""bf16_weights — wraps ``Aggregator.forward(images)`` and its ``patch_embed.forward``, and the heads' entry points
``CameraHead.forward(aggregated_tokens_list, ...)`` and ``DPTHead._forward_impl(aggregated_tokens_list, images,
patch_start_idx, frames_start_idx, frames_end_idx)`` (depth, point and the track head's feature extractor).

Why faster: under ``torch.autocast(dtype=torch.bfloat16)`` upstream keeps fp32 weights and an fp32 residual stream:
every LayerNorm runs in fp32 (autocast's policy), every matmul input is cast to bf16 first, LayerScale and the
residual adds write fp32, and RoPE runs in fp32 — a large share of the GPU time at 10+ frames is this fp32
elementwise traffic (profiles in benchmarks/RESULTS.md). This
patch runs the aggregator natively in bf16 instead: from a bf16 copy of its weights, with autocast off inside it,
so the residual stream, norms, RoPE and activations are bf16 (half the bytes). The heads keep upstream's fp32: they
receive the intermediates upcast to fp32, one chunk of frames at a time, so the kept intermediates are stored in
bf16 (half of upstream's memory for them).

The bf16 copy (half the aggregator's fp32 size, about 1.7 GiB for the full model) is made on the first call and
kept for later calls (``_shadow.Shadow``: rebuilt when a parameter is moved, replaced or changed in place).

When it applies: inference (eval mode, autograd off), under bf16 autocast on the input's device, with fp32
parameters. Otherwise (fp32 runs, fp16 autocast, training, a model already converted to bf16) upstream runs as is.

REDUCED PRECISION, not exact: the same operations, rounded to bf16 at more places than under autocast (the
residual stream, the norms' outputs, RoPE tables). Upstream-autocast keeps the residual stream in fp32, and
measured against upstream in fp32 this patch's error is a few times autocast's own (pose and camera rotation
most), so it is off in ``exact`` and on in ``fast``; ``cached_casts`` and ``fused_add_norm`` win back most of its
speed within the exact tier (``benchmarks/results/<gpu>/precision.md``). Called alone, ``model.aggregator(images)``
returns bf16 intermediates when this patch is applied to the whole VGGT (the heads upcast them); applied to an
Aggregator alone it returns fp32, as upstream.
"""

from __future__ import annotations

import contextvars
from typing import Any

import torch
from torch import nn

from ...autocast import autocast_dtype
from ...config import TurboConfig
from ...upstream import AGGREGATOR_FORWARD, Requirement, aggregator_of, looks_like_vggt
from .._base import Patch, Target, Tier, aggregator_path, join
from .._head_inputs import HEAD_INPUT_REQUIREMENTS, head_input_targets
from .._shadow import Shadows

# True while a patched aggregator runs in bf16: tells its patch_embed to take bf16 input.
_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("vggt_turbo_bf16_active", default=False)


def make_aggregator_wrapper(upcast_outputs: bool):
    """The ``Aggregator.forward`` wrapper; ``upcast_outputs``: return fp32 intermediates (no patched heads)."""
    shadows = Shadows(nn.Module.parameters)

    def aggregator_forward(wrapped: Any, agg: nn.Module, args: tuple, kwargs: dict) -> Any:
        device_type = AGGREGATOR_FORWARD.bind(*args, **kwargs)[0].device.type
        first = next(agg.parameters(), None)
        if (
            agg.training
            or torch.is_grad_enabled()
            or autocast_dtype(device_type) != torch.bfloat16
            or first is None
            or first.dtype != torch.float32
        ):
            return wrapped(*args, **kwargs)
        token = _ACTIVE.set(True)
        try:
            with shadows.swapped(agg, torch.bfloat16), torch.autocast(device_type, enabled=False):
                outputs, patch_start_idx = wrapped(*args, **kwargs)
        finally:
            _ACTIVE.reset(token)
        if upcast_outputs:
            outputs = [None if t is None else t.float() for t in outputs]
        return outputs, patch_start_idx

    return aggregator_forward


def patch_embed_forward(wrapped: Any, embed: nn.Module, args: tuple, kwargs: dict) -> Any:
    """Cast the normalised images to the weights' bf16, as autocast's cast before the first convolution does."""
    if _ACTIVE.get() and args and isinstance(args[0], torch.Tensor):
        args = (args[0].to(torch.bfloat16), *args[1:])
    return wrapped(*args, **kwargs)


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    agg = aggregator_path(root)
    whole_model = looks_like_vggt(root)
    targets = [
        Target(agg, "forward", make_aggregator_wrapper(upcast_outputs=not whole_model)),
        Target(join(agg, "patch_embed"), "forward", patch_embed_forward),
    ]
    return targets + (head_input_targets(root) if whole_model else [])


PATCH = Patch(
    name="bf16_weights",
    tier=Tier.REDUCED,
    sequence_parallel=True,
    summary=(
        "the aggregator natively in bf16 from a bf16 copy of its weights: residual stream, norms and RoPE in "
        "bf16 (rounds more than autocast)"
    ),
    requirements=(
        AGGREGATOR_FORWARD.requirement,
        Requirement("Aggregator", "patch_embed", aggregator_of),
    )
    + HEAD_INPUT_REQUIREMENTS,
    enabled=lambda c: c.bf16_weights,
    targets=_targets,
)
