"""cached_casts — wraps ``Aggregator.forward(images)``.

Why faster: under ``torch.autocast`` upstream keeps fp32 weights, and autocast casts every linear and convolution
weight (and bias) to bf16 again in every forward: for the full model about 0.9 B parameters read in fp32 and
written in bf16 per call, several milliseconds of memory traffic that at one frame is a large share of the whole
forward. This patch keeps those bf16 copies between calls and hands them to autocast, whose cast is then a
no-op.

How: the copies are ``_shadow.Shadow``'s — rebuilt when a weight is moved, replaced or changed in place (storage
address or version counter), swapped into the ``nn.Linear`` and ``nn.Conv2d`` modules' ``.data`` for the duration
of the aggregator's forward and swapped back after. Autocast stays on; norms, LayerScale, the residual stream,
RoPE and positional embeddings keep upstream's fp32 (their parameters are not copied). Between calls the copies
stay allocated: half the aggregator's matmul weights in size (about 1.7 GiB for the full model), the same copies
autocast's cast cache holds during upstream's forward.

When it applies: inference (eval mode, autograd off) under autocast to bf16 or fp16 on the input's device, with
fp32 weights. Otherwise (fp32 runs, training, ``bf16_weights``, which turns autocast off inside the aggregator and
keeps copies of its own) upstream's casts run.

EXACT, bit for bit: autocast's cast is the same round-to-nearest ``.to(dtype)`` of the same weights; the matmuls
receive identical operands.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ...autocast import autocast_dtype
from ...config import TurboConfig
from ...upstream import AGGREGATOR_FORWARD
from .._base import Patch, Target, Tier, aggregator_path
from .._shadow import Shadows

MATMUL_MODULES = (nn.Linear, nn.Conv2d)  # what autocast casts for: linear and conv2d run in its lower precision
HALF_DTYPES = (torch.bfloat16, torch.float16)


def matmul_parameters(module: nn.Module) -> Iterator[nn.Parameter]:
    """The weights and biases of ``module``'s linear and convolution layers (each once)."""
    seen: set[int] = set()
    for sub in module.modules():
        if isinstance(sub, MATMUL_MODULES):
            for p in (sub.weight, sub.bias):
                if isinstance(p, nn.Parameter) and id(p) not in seen:
                    seen.add(id(p))
                    yield p


def make_wrapper():
    """The ``Aggregator.forward`` wrapper; its copies are per aggregator instance (weakly held, dropped on revert)."""
    shadows = Shadows(matmul_parameters)

    def aggregator_forward(wrapped: Any, agg: nn.Module, args: tuple, kwargs: dict) -> Any:
        dtype = autocast_dtype(AGGREGATOR_FORWARD.bind(*args, **kwargs)[0].device.type)
        if agg.training or torch.is_grad_enabled() or dtype not in HALF_DTYPES:
            return wrapped(*args, **kwargs)
        with shadows.swapped(agg, dtype):
            return wrapped(*args, **kwargs)

    aggregator_forward.shadows = shadows  # type: ignore[attr-defined]
    return aggregator_forward


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    return [Target(aggregator_path(root), "forward", make_wrapper())]


PATCH = Patch(
    name="cached_casts",
    tier=Tier.EXACT,
    sequence_parallel=True,  # the same weights' copies on every rank
    summary=(
        "autocast's bf16 copies of the aggregator's linear and convolution weights kept between calls instead"
        " of cast again in every forward (bit for bit; the copies stay allocated)"
    ),
    requirements=(AGGREGATOR_FORWARD.requirement,),
    enabled=lambda c: c.cached_casts,
    targets=_targets,
)
