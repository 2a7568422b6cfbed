"""single_key_attention — replaces ``Attention.forward(x, pos=None)`` of the camera head's trunk blocks, for calls
whose sequence is one token long.

The camera head's trunk attends across frames: one camera token per frame, so with one frame every attention has a
single key. Softmax over one score is exactly 1 whatever the score (exp(s - s) = 1, divided by itself), so the
output is that key's value: attention(q, k, v) = v, and q, k, qk-norm, RoPE and the attention kernel do not matter.
Here such a call computes only v, from the value rows of the fused qkv weight (a view, no copy), and the output
projection.

Why faster: the trunk runs in fp32 on one token, so it is bound by reading its weights (4 iterations x 4 blocks
of 50 M fp32 parameters at one frame); skipping the q and k rows skips a sixth of those reads, and the 16
attention kernels go too (their share of the camera head's time: benchmarks/RESULTS.md).

Exact: the identity above holds in floating point too, up to the last bits: torch's kernels return v bit for bit
on the CPU, and in bf16 and fp64 on an H100, while its fp32 kernel does not compute exp(s - s) as exactly 1 and
returns v within 1e-6 (``tests/test_single_key_attention.py``). The value rows' product can also differ from the
same rows of upstream's wider qkv product by the order of its fp32 accumulation (on an H100 at one frame, full
model, ``exact`` preset: pose_enc within 2e-7 of the same model without this patch, the other outputs bit for bit;
its speed: ``benchmarks/ab_flag.py``, benchmarks/RESULTS.md).
One difference outside rounding: a non-finite score (inf or NaN in q or k) makes upstream's output NaN, or 0 on
the CPU's kernel, where this returns v. Applies to inference calls (eval, autograd off) of exactly one token per
sequence; all other calls, and every call in training, run upstream's forward.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...config import TurboConfig
from ...upstream import ATTENTION_FORWARD, looks_like_vggt, members
from .._base import Patch, Target, Tier, join


def attention_forward(wrapped: Any, attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    x, _ = ATTENTION_FORWARD.bind(*args, **kwargs)
    if attn.training or torch.is_grad_enabled() or not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[1] != 1:
        return wrapped(*args, **kwargs)
    C = x.shape[-1]
    weight, bias = attn.qkv.weight, attn.qkv.bias
    if weight.shape[0] != 3 * C:  # not upstream's fused (q, k, v) rows
        return wrapped(*args, **kwargs)
    v = F.linear(x, weight[2 * C:], None if bias is None else bias[2 * C:])  # upstream's (B, H, 1, d) v, token-major
    return attn.proj_drop(attn.proj(v))


def _trunk(root: nn.Module) -> list[nn.Module]:
    head = getattr(root, "camera_head", None) if looks_like_vggt(root) else None
    trunk = getattr(head, "trunk", None)
    return list(trunk) if isinstance(trunk, nn.Sequential) else []


def _first_trunk_attention(root: nn.Module) -> Optional[nn.Module]:
    trunk = _trunk(root)
    return trunk[0].attn if trunk else None


def _targets(root: nn.Module, config: TurboConfig) -> list[Target]:
    return [Target(join("camera_head", "trunk", str(i), "attn"), "forward", attention_forward) for i in range(len(_trunk(root)))]


PATCH = Patch(
    name="single_key_attention",
    tier=Tier.EXACT,
    sequence_parallel=True,  # an identity of one call's own input (one token per sequence), wherever it runs
    summary="with one frame, the camera head's single-key attention is its value rows: no q, k or attention kernel",
    requirements=(ATTENTION_FORWARD.requirement_at(_first_trunk_attention),)
    + members("Attention", _first_trunk_attention, ("qkv", None), ("proj", None), ("proj_drop", None)),
    enabled=lambda c: c.single_key_attention,
    targets=_targets,
)
