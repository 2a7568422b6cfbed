"""dpt_channels_last_weights — wraps ``forward`` of each DPT head (depth, points, track features).

Why faster: the DPT heads' feature maps are channels-last (upstream's layout from 2 frames on; ``dpt_channels_last``
gives them that layout with one frame too), and a convolution whose input is channels-last converts its weight to
that layout in every call (PyTorch's ``weight.contiguous(input.suggest_memory_format())``): for every convolution
of the heads with a kernel larger than 1 x 1, a copy of its fp32 weight per forward (their size and the time they
took: benchmarks/RESULTS.md). Here those copies are kept between calls (``_shadow.Shadow``: rebuilt when a weight
is moved, replaced or changed in place) and swapped into the convolutions' ``.data`` for the head's forward, so the
conversion finds them in that layout already. They stay allocated between calls; ``revert_optimizations`` frees
them.

Exact, bit for bit: each convolution receives the same values in the layout it would have converted them to.
Needs ``dpt_channels_last``: with one frame upstream's first maps are contiguous, and a channels-last weight would
make such a convolution run channels-last (another kernel, other roundings). Applies to inference (eval, autograd
off) outside autocast, as upstream runs its heads; otherwise upstream's forward.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from ...autocast import autocast_dtype
from ...config import TurboConfig
from ...upstream import DPT_FORWARD, dpt_heads
from .._base import Patch, Target, Tier
from .._head_inputs import first_param
from .._shadow import Shadows

CONVS = (nn.Conv2d, nn.ConvTranspose2d)


def spatial_weights(head: nn.Module) -> Iterator[nn.Parameter]:
    """The 4-D weights of ``head``'s convolutions with a kernel larger than 1 x 1 (a 1 x 1 kernel is laid out the
    same either way)."""
    for module in head.modules():
        if type(module) in CONVS and isinstance(module.weight, nn.Parameter) and module.weight.dim() == 4 \
                and module.weight.shape[-2:] != (1, 1):
            yield module.weight


def make_wrapper():
    """The ``DPTHead.forward`` wrapper; its copies are per head instance (weakly held, dropped on revert)."""
    shadows = Shadows(spatial_weights)

    def head_forward(wrapped: Any, head: nn.Module, args: tuple, kwargs: dict) -> Any:
        if head.training or torch.is_grad_enabled() or autocast_dtype(first_param(head).device.type) is not None:
            return wrapped(*args, **kwargs)
        with shadows.swapped(head, torch.float32, torch.channels_last):
            return wrapped(*args, **kwargs)

    head_forward.shadows = shadows  # type: ignore[attr-defined]
    return head_forward


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    return [Target(path, "forward", make_wrapper()) for path, _ in dpt_heads(root)]


PATCH = Patch(
    name="dpt_channels_last_weights",
    tier=Tier.EXACT,
    sequence_parallel=True,  # the same weights' copies on every rank
    summary=(
        "channels-last copies of the DPT heads' k x k convolution weights kept between calls, instead of the"
        " conversion PyTorch makes in every call for channels-last maps (bit for bit; the copies stay allocated)"
    ),
    requirements=(DPT_FORWARD.requirement,),
    enabled=lambda c: c.dpt_channels_last_weights,
    targets=_targets,
    requires=("dpt_channels_last",),
)
