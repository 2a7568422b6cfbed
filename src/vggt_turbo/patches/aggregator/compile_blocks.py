"""compile — replaces ``Block.forward(x, pos=None)`` of every frame and global block by ``torch.compile`` of
upstream's ``Block.forward`` (opt-in: the first call per input shape compiles for tens of seconds).

Why faster: between its matmuls and its attention kernel a block runs about twenty elementwise and normalisation
kernels (LayerNorms, qk-norm, LayerScale, residual adds, GELU, RoPE), each reading and writing the full token
tensor. Inductor fuses them into a few Triton kernels (its speed and compile time: benchmarks/RESULTS.md).
Submodules patched by other flags (RoPE, attention)
are called as they are, so their wrappers run eagerly between compiled regions.

Compiled code is upstream's ``Block.forward``, shared by all blocks (same code, parameters as inputs) and
specialised per shape (``dynamic=False``). It applies on CUDA in inference only; on CPU, in training or with
autograd on, upstream runs. With ``chunked_mlp`` on, sequences long enough to be sliced run that eager path
instead: there the attention dominates and the memory bound matters more than the fusion.

Exact to the fused kernels' rounding (Inductor may reorder a reduction or keep an intermediate in fp32).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from ...config import TurboConfig
from ...upstream import AGGREGATOR_LAYOUT, BLOCK_FORWARD
from .._base import Patch, Target, Tier, aggregator_blocks
from .. import _token_slices

OPTIONS: dict[str, Any] = {"dynamic": False}


@functools.lru_cache(maxsize=None)
def compiled(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """One compiled function per upstream ``Block.forward`` (shared by every block and every patched model)."""
    return torch.compile(forward, **OPTIONS)


def make_wrapper(slice_long: bool):
    """The ``Block.forward`` wrapper; with ``slice_long`` (``chunked_mlp``), sequences long enough for their MLP to
    run in slices (``_token_slices``) run ``wrapped``."""

    def block_forward(wrapped: Any, block: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
        x, pos = BLOCK_FORWARD.bind(*args, **kwargs)
        long = slice_long and _token_slices.is_long(x.numel() // x.shape[-1])
        if not x.is_cuda or block.training or torch.is_grad_enabled() or long:
            return wrapped(*args, **kwargs)
        return compiled(type(block).forward)(block, x, pos=pos)

    return block_forward


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    wrapper = make_wrapper(config.chunked_mlp)
    return [Target(path, "forward", wrapper) for path, _ in aggregator_blocks(root)]


PATCH = Patch(
    name="compile",
    tier=Tier.EXACT,
    summary="`torch.compile` of upstream's `Block.forward` (first call per shape compiles)",
    requirements=AGGREGATOR_LAYOUT + (BLOCK_FORWARD.requirement,),
    enabled=lambda c: c.compile,
    targets=_targets,
)
