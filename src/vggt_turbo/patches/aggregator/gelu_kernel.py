"""gelu_kernel — wraps ``forward`` of the GELU inside every MLP of the frame, global and patch-embed (DINOv2) blocks.

Why faster: the GELU is a separate pass over each MLP's widest activation (4x the model width), and PyTorch's
generic elementwise kernel runs it below the memory bandwidth; ``kernels/gelu.py`` runs it at the bandwidth
(measured in benchmarks/RESULTS.md). The matmuls around it are unchanged.

Exact, bit for bit: the kernel computes PyTorch's erf formula with PyTorch's roundings (``kernels/gelu.py``).
Only ``nn.GELU`` modules with ``approximate='none'`` (upstream's) are wrapped; on the CPU, for strided inputs, and
with autograd on (the kernel has no backward), PyTorch's GELU runs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...config import TurboConfig
from ...kernels.gelu import gelu, triton_covers
from ...upstream import aggregator_of, dino_blocks, first_block, members
from .._base import Patch, Target, Tier, aggregator_blocks, aggregator_path, join


def gelu_forward(wrapped: Any, act: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    x = args[0] if args else kwargs["input"]
    if x.is_cuda and not torch.is_grad_enabled() and triton_covers(x):
        return gelu(x)
    return wrapped(*args, **kwargs)


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    dino = join(aggregator_path(root), "patch_embed", "blocks")
    blocks = aggregator_blocks(root) + [(join(dino, str(i)), b) for i, b in enumerate(dino_blocks(root))]
    return [
        Target(join(path, "mlp", "act"), "forward", gelu_forward)
        for path, block in blocks
        if isinstance(getattr(getattr(block, "mlp", None), "act", None), nn.GELU) and block.mlp.act.approximate == "none"
    ]


PATCH = Patch(
    name="gelu_kernel",
    tier=Tier.EXACT,
    sequence_parallel=True,  # token by token: each rank's tokens as in one process
    summary="the MLPs' GELU (upstream's erf form) in one Triton pass at memory bandwidth",
    requirements=members("Aggregator", aggregator_of, ("frame_blocks", None), ("global_blocks", None))
    + members("Block", first_block, ("mlp", None)),
    enabled=lambda c: c.gelu_kernel,
    targets=_targets,
)
