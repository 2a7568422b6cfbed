"""patch_embed_matmul — replaces ``PatchEmbed.forward(x)``: the patch projection in front of the DINOv2 blocks
(``aggregator.patch_embed.patch_embed``), or the aggregator's own patch embed when it is that (``"conv"``).

Why faster: the projection is a convolution whose stride equals its kernel (14 x 14 pixels, 3 -> 1024 channels),
so every output token is one image patch, flattened, times the weight. cuDNN runs it on a generic implicit-GEMM
kernel, as slow as the DINOv2 blocks' 24 layer norms together in a profile at one frame (benchmarks/RESULTS.md).
Here the patches are gathered into rows (one copy of the image's pixels) and
multiplied by the weight viewed as a (1024, 588) matrix on cuBLAS, which writes the tokens directly in the
(B, patches, C) layout that upstream's forward gets by flattening and transposing the convolution's output.

Exact to the output dtype's rounding, not bit for bit: the same products, summed in fp32 in another order than the
convolution kernel's (fp32 on the CPU, full-size projection: 4.8e-7 relative, ‖a−b‖/‖b‖; bf16: within an ulp).
``F.linear`` is cast by autocast as ``F.conv2d`` is. The returned tokens are contiguous where upstream returns a
transposed view of the same values. Applies in inference (eval, autograd off) on CUDA in half precision (bf16 or
fp16 input, or under autocast: the ``exact`` preset's case) to a plain ``nn.Conv2d`` projection with stride equal to
kernel, no padding, dilation or groups, and an image that the patches tile. Anything else runs upstream's forward:
the CPU (the reason above is cuDNN's kernel; the CPU keeps upstream's bits), an image size upstream refuses, and
fp32 on CUDA, where cuDNN's convolution rounds its inputs to TF32 (PyTorch's default for convolutions, not for
matrix products) and a product in full fp32 would differ from it by more than fp32 rounding.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...autocast import autocast_dtype
from ...config import TurboConfig
from ...upstream import PATCH_EMBED_FORWARD, aggregator_of, members, patch_embed_projection
from .._base import Patch, Target, Tier, aggregator_path, join


def _covered(proj: nn.Module, x: Any) -> bool:
    """A plain non-overlapping convolution over an image (B, C, H, W) that its patches tile exactly."""
    if type(proj) is not nn.Conv2d or not isinstance(x, torch.Tensor) or x.dim() != 4:
        return False
    kh, kw = proj.kernel_size
    plain = (
        proj.stride == proj.kernel_size
        and proj.padding == (0, 0)
        and proj.dilation == (1, 1)
        and proj.groups == 1
        and proj.padding_mode == "zeros"
    )
    return plain and x.shape[1] == proj.in_channels and x.shape[2] % kh == 0 and x.shape[3] % kw == 0


def patch_embed_forward(wrapped: Any, embed: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    x = PATCH_EMBED_FORWARD.bind(*args, **kwargs)[0]
    if embed.training or torch.is_grad_enabled() or not _covered(embed.proj, x) or not _half_on_cuda(x):
        return wrapped(*args, **kwargs)
    return project(embed, x)


def _half_on_cuda(x: torch.Tensor) -> bool:
    return x.is_cuda and (x.dtype in (torch.bfloat16, torch.float16) or autocast_dtype("cuda") is not None)


def project(embed: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Upstream's ``PatchEmbed.forward(x)`` as a matrix product (for an ``x`` that ``_covered`` accepts)."""
    proj = embed.proj
    B, C, H, W = x.shape
    kh, kw = proj.kernel_size
    h, w = H // kh, W // kw
    # (B, C, h, kh, w, kw) -> one row per patch, its values in the weight's (C, kh, kw) order
    patches = x.reshape(B, C, h, kh, w, kw).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w, C * kh * kw)
    tokens = embed.norm(F.linear(patches, proj.weight.reshape(proj.out_channels, -1), proj.bias))
    if not embed.flatten_embedding:
        tokens = tokens.reshape(-1, h, w, embed.embed_dim)
    return tokens


def _path(root: nn.Module) -> Optional[str]:
    """Where the PatchEmbed sits: inside the DINOv2 model, or the aggregator's patch embed itself."""
    embed = patch_embed_projection(root)
    if embed is None:
        return None
    outer = join(aggregator_path(root), "patch_embed")
    return outer if embed is aggregator_of(root).patch_embed else join(outer, "patch_embed")


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    path = _path(root)
    return [] if path is None else [Target(path, "forward", patch_embed_forward)]


PATCH = Patch(
    name="patch_embed_matmul",
    tier=Tier.EXACT,
    sequence_parallel=True,  # each rank embeds its own frames
    summary="the 14 x 14 / stride-14 patch projection as one cuBLAS product instead of cuDNN's generic convolution",
    requirements=(PATCH_EMBED_FORWARD.requirement,)
    + members(
        "PatchEmbed", patch_embed_projection, ("proj", None), ("norm", None), ("flatten_embedding", None),
        ("embed_dim", None),
    ),
    enabled=lambda c: c.patch_embed_matmul,
    targets=_targets,
)
