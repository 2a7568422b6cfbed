"""The contract with upstream VGGT: what the patches rely on, checked before anything is touched.

Upstream (facebookresearch/vggt) has no version number that changes (it is always 0.0.1), so support is declared
by structure: each patch lists the upstream methods it replaces or calls, with their parameter names, and the
attributes it reads. ``check`` compares them with the *installed* classes of the instance being patched and raises
``IncompatibleUpstreamError`` naming the symbol and what differs. Nothing is patched when any check fails.

Tested against the pinned commit ``PINNED_COMMIT`` and against the older layout of 2025-10 (``44b3afbd``), whose
``Aggregator`` keeps all 24 intermediates instead of the four the heads read; both satisfy the contract.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

PINNED_COMMIT = "a288dd0f14786c93483e45524328726ab7b1b4ce"


class IncompatibleUpstreamError(RuntimeError):
    """The installed upstream VGGT lacks something a requested patch needs (symbol and difference named)."""


@dataclass(frozen=True)
class Requirement:
    """One upstream symbol a patch relies on.

    ``owner`` names the upstream class (for messages); ``locate`` finds an instance of it in the model being
    patched (None when the model has no such part, e.g. no RoPE); ``params`` are the expected parameter names
    (without ``self``) of a method, or None for a plain attribute.
    """

    owner: str
    attr: str
    locate: Callable[[nn.Module], Optional[object]]
    params: Optional[tuple[str, ...]] = None

    @property
    def symbol(self) -> str:
        if self.params is None:
            return f"{self.owner}.{self.attr}"
        return f"{self.owner}.{self.attr}({', '.join(self.params)})"

    def check(self, root: nn.Module, patch: str) -> None:
        target = self.locate(root)
        if target is None:
            return
        where = target.__name__ if isinstance(target, types.ModuleType) else f"{type(target).__module__}.{type(target).__qualname__}"
        if not hasattr(target, self.attr):
            raise IncompatibleUpstreamError(
                f"patch {patch!r} needs upstream {self.symbol}, but {where} has no attribute {self.attr!r}"
            )
        if self.params is None:
            return
        owner = target if isinstance(target, types.ModuleType) else type(target)
        member = inspect.getattr_static(owner, self.attr, None)
        if not callable(member):
            raise IncompatibleUpstreamError(f"patch {patch!r} needs upstream method {self.symbol}; {where}.{self.attr} is not a method")
        found = tuple(p for p in inspect.signature(member).parameters if p != "self")
        if found != self.params:
            raise IncompatibleUpstreamError(
                f"patch {patch!r} needs upstream {self.symbol}, but the installed {where}.{self.attr} "
                f"takes ({', '.join(found)})"
            )


def aggregator_of(root: nn.Module) -> nn.Module:
    """The Aggregator of a VGGT, or the module itself when it is an Aggregator."""
    return root.aggregator if hasattr(root, "aggregator") else root


def upstream_module(name: str) -> Callable[[nn.Module], types.ModuleType]:
    """A ``locate`` for a module-level upstream helper, e.g. ``upstream_module("vggt.models.aggregator")``."""
    import importlib

    return lambda root: importlib.import_module(name)


def first_block(root: nn.Module) -> Optional[nn.Module]:
    blocks = getattr(aggregator_of(root), "frame_blocks", None)
    return blocks[0] if blocks else None


def dino_blocks(root: nn.Module) -> list[nn.Module]:
    """The patch embed's (DINOv2) transformer blocks; none when it is a plain convolution."""
    blocks = getattr(aggregator_of(root).patch_embed, "blocks", None)
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def first_attention(root: nn.Module) -> Optional[nn.Module]:
    block = first_block(root)
    return block.attn if block is not None else None


def rope_of(root: nn.Module) -> Optional[nn.Module]:
    return getattr(aggregator_of(root), "rope", None)


def looks_like_vggt(model: object) -> bool:
    return isinstance(model, nn.Module) and hasattr(model, "aggregator") and looks_like_aggregator(model.aggregator)


DPT_HEADS = ("depth_head", "point_head", "track_head.feature_extractor")  # paths of VGGT's DPT heads


def dpt_heads(root: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, head) of every DPT head ``root`` has (none when it is not a VGGT, e.g. a bare Aggregator)."""
    found = []
    if not looks_like_vggt(root):
        return found
    for path in DPT_HEADS:
        head: object = root
        for part in path.split("."):
            head = getattr(head, part, None)
            if head is None:
                break
        if head is not None:
            found.append((path, head))
    return found


def first_dpt_head(root: nn.Module) -> Optional[nn.Module]:
    heads = dpt_heads(root)
    return heads[0][1] if heads else None


def looks_like_aggregator(model: object) -> bool:
    return isinstance(model, nn.Module) and all(
        hasattr(model, name) for name in ("frame_blocks", "global_blocks", "patch_embed", "aa_order")
    )


def check(root: nn.Module, requirements: dict[str, tuple[Requirement, ...]]) -> None:
    """Check every requirement of every requested patch; raise on the first mismatch."""
    for patch, reqs in requirements.items():
        for req in reqs:
            req.check(root, patch)


def members(
    owner: str, locate: Callable[[nn.Module], Optional[object]], *specs: tuple[str, Optional[tuple[str, ...]]]
) -> tuple[Requirement, ...]:
    """Requirements on several members of one upstream class: ``(name, parameter names or None)`` each."""
    return tuple(Requirement(owner, name, locate, params) for name, params in specs)


# Requirements shared by several patches.
# Aggregator members (name, parameters) of patches that re-run its forward loop step by step.
AGGREGATOR_STEPS = (
    ("forward", ("images",)),
    ("_process_frame_attention", ("tokens", "B", "S", "P", "C", "frame_idx", "pos")),
    ("_process_global_attention", ("tokens", "B", "S", "P", "C", "global_idx", "pos")),
)
AGGREGATOR_LAYOUT = (
    Requirement("Aggregator", "frame_blocks", aggregator_of),
    Requirement("Aggregator", "global_blocks", aggregator_of),
    Requirement("Aggregator", "aa_block_size", aggregator_of),
    Requirement("Aggregator", "aa_order", aggregator_of),
)

# Every member of upstream's Attention that a patch re-implementing its forward (sdpa, fused_qk_norm_rope,
# sequence_parallel, dino_attention) reads, besides the forward itself.
ATTENTION_PARTS = (
    ("qkv", None),
    ("q_norm", None),
    ("k_norm", None),
    ("rope", None),
    ("proj", None),
    ("proj_drop", None),
    ("num_heads", None),
    ("head_dim", None),
)
ATTENTION_MEMBERS = members("Attention", first_attention, ("forward", ("x", "pos")), *ATTENTION_PARTS)


def x_pos(x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Bind the arguments of upstream's ``Attention.forward(x, pos=None)`` (``Block.forward`` has the same), for the
    patches' wrappers, which receive them as ``args`` and ``kwargs``."""
    return x, pos
