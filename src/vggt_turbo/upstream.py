"""The contract with upstream VGGT: what the patches rely on, checked before anything is touched.

Upstream (facebookresearch/vggt) has no version number that changes (it is always 0.0.1), so support is declared
by structure: each patch lists the upstream methods it replaces or calls, with their parameter names, and the
attributes it reads. ``check`` compares them with the *installed* classes of the instance being patched and raises
``IncompatibleUpstreamError`` naming the symbol and what differs. Nothing is patched when any check fails.

A method whose arguments a patch's wrapper reads is declared once, as a ``Method`` (``AGGREGATOR_FORWARD``,
``ATTENTION_FORWARD``, ...): the same declaration is the patch's requirement and binds the wrapper's ``args`` and
``kwargs`` to upstream's parameter names, so an upstream rename is one line to change here.

Tested against the pinned commit ``PINNED_COMMIT`` and against the older layout of 2025-10 (``44b3afbd``), whose
``Aggregator`` keeps all 24 intermediates instead of the four the heads read; both satisfy the contract.
"""

from __future__ import annotations

import inspect
import types
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional

from torch import nn

PINNED_COMMIT = "a288dd0f14786c93483e45524328726ab7b1b4ce"


class IncompatibleUpstreamError(RuntimeError):
    """The installed upstream VGGT lacks something a requested patch needs (symbol and difference named)."""


@dataclass(frozen=True)
class Requirement:
    """One upstream symbol a patch relies on.

    ``owner`` names the upstream class (for messages); ``locate`` finds an instance of it in the model being
    patched (None when the model has no such part, e.g. no RoPE); ``params`` are the expected parameter names
    (without ``self``) of a method, or None for a plain attribute; ``defaults``, when given, are the method's
    default values as a patch's binder fills them in (checked too: a default changed upstream would otherwise hand
    the patch another value than upstream's own call gets).
    """

    owner: str
    attr: str
    locate: Callable[[nn.Module], Optional[object]]
    params: Optional[tuple[str, ...]] = None
    defaults: Optional[Mapping[str, Any]] = None

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
        parameters = {p: v for p, v in inspect.signature(member).parameters.items() if p != "self"}
        found = tuple(parameters)
        if found != self.params:
            raise IncompatibleUpstreamError(
                f"patch {patch!r} needs upstream {self.symbol}, but the installed {where}.{self.attr} "
                f"takes ({', '.join(found)})"
            )
        if self.defaults is None:
            return
        found_defaults = {p: v.default for p, v in parameters.items() if v.default is not inspect.Parameter.empty}
        if found_defaults != dict(self.defaults):
            raise IncompatibleUpstreamError(
                f"patch {patch!r} needs upstream {self.symbol} with defaults {dict(self.defaults)}, but the installed "
                f"{where}.{self.attr} has {found_defaults}"
            )


@dataclass(frozen=True)
class Method:
    """One upstream method whose arguments a patch's wrapper reads: its ``requirement`` (checked as any other) and
    ``bind``, called as ``bind(*args, **kwargs)`` with the wrapper's arguments, which returns them as a tuple in
    ``params`` order, ``defaults`` filled in for those not passed (upstream's defaults).

    ``bind`` is a plain function made once from the declared names, as dataclasses make ``__init__``, so that it
    costs what a hand-written one does: wrappers run it on every call (an attention forward about a hundred times
    per model call), where binding through ``inspect`` would be many times slower.
    """

    owner: str
    name: str
    locate: Callable[[nn.Module], Optional[object]]
    params: tuple[str, ...]
    defaults: Mapping[str, Any] = field(default_factory=dict)
    bind: Callable[..., tuple] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.defaults) - set(self.params))
        if unknown:
            raise ValueError(f"{self.owner}.{self.name} has no parameters {unknown} to default")
        signature = ", ".join(f"{p}=defaults[{p!r}]" if p in self.defaults else p for p in self.params)
        namespace: dict[str, Any] = {"defaults": self.defaults}
        exec(f"def bind({signature}):\n    return ({', '.join(self.params)},)", namespace)
        bind = namespace["bind"]
        bind.__qualname__ = f"{self.owner}.{self.name}"  # a wrong call's TypeError names upstream's method
        object.__setattr__(self, "bind", bind)

    @property
    def requirement(self) -> Requirement:
        return self.requirement_at(self.locate)

    def requirement_at(self, locate: Callable[[nn.Module], Optional[object]]) -> Requirement:
        """The requirement checked on another instance of the owner class (e.g. the camera head's attention)."""
        return Requirement(self.owner, self.name, locate, self.params, self.defaults)


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


def first_dino_block(root: nn.Module) -> Optional[nn.Module]:
    blocks = dino_blocks(root)
    return blocks[0] if blocks else None


def first_dino_attention(root: nn.Module) -> Optional[nn.Module]:
    block = first_dino_block(root)
    return block.attn if block is not None else None


def patch_embed_projection(root: nn.Module) -> Optional[nn.Module]:
    """Upstream's ``PatchEmbed``: the projection in front of the DINOv2 blocks, or the aggregator's patch embed
    itself when it is that (``"conv"``)."""
    embed = aggregator_of(root).patch_embed
    for candidate in (embed, getattr(embed, "patch_embed", None)):
        if type(candidate).__name__ == "PatchEmbed":
            return candidate
    return None


def rope_of(root: nn.Module) -> Optional[nn.Module]:
    return getattr(aggregator_of(root), "rope", None)


def looks_like_vggt(model: object) -> bool:
    return isinstance(model, nn.Module) and hasattr(model, "aggregator") and looks_like_aggregator(model.aggregator)


def vggt_of(root: nn.Module) -> Optional[nn.Module]:
    """The root when it is a whole VGGT (None for an Aggregator patched alone)."""
    return root if looks_like_vggt(root) else None


def head_of(name: str) -> Callable[[nn.Module], Optional[nn.Module]]:
    """A ``locate`` for one of a VGGT's heads (None when patching an Aggregator alone or the head is off)."""
    return lambda root: getattr(root, name, None) if looks_like_vggt(root) else None


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


def first_residual_unit(root: nn.Module) -> Optional[nn.Module]:
    for _, head in dpt_heads(root):
        for module in head.modules():
            if type(module).__name__ == "ResidualConvUnit":
                return module
    return None


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


# The upstream methods whose arguments the patches' wrappers read (``Method``), with upstream's defaults.
AGGREGATOR_FORWARD = Method("Aggregator", "forward", aggregator_of, ("images",))
FRAME_STEP = Method(
    "Aggregator", "_process_frame_attention", aggregator_of, ("tokens", "B", "S", "P", "C", "frame_idx", "pos"),
    {"pos": None},
)
GLOBAL_STEP = Method(
    "Aggregator", "_process_global_attention", aggregator_of, ("tokens", "B", "S", "P", "C", "global_idx", "pos"),
    {"pos": None},
)
VGGT_FORWARD = Method("VGGT", "forward", vggt_of, ("images", "query_points"), {"query_points": None})
BLOCK_FORWARD = Method("Block", "forward", first_block, ("x", "pos"), {"pos": None})
ATTENTION_FORWARD = Method("Attention", "forward", first_attention, ("x", "pos"), {"pos": None})
ROPE_FORWARD = Method("RotaryPositionEmbedding2D", "forward", rope_of, ("tokens", "positions"))
PATCH_EMBED_FORWARD = Method("PatchEmbed", "forward", patch_embed_projection, ("x",))
DINO_BLOCK_FORWARD = Method("NestedTensorBlock", "forward", first_dino_block, ("x_or_x_list",))
DINO_ATTENTION_FORWARD = Method(
    "MemEffAttention", "forward", first_dino_attention, ("x", "attn_bias", "pos"), {"attn_bias": None, "pos": None}
)
CAMERA_HEAD_FORWARD = Method(
    "CameraHead", "forward", head_of("camera_head"), ("aggregated_tokens_list", "num_iterations"), {"num_iterations": 4}
)
DPT_FORWARD = Method(
    "DPTHead", "forward", head_of("depth_head"),
    ("aggregated_tokens_list", "images", "patch_start_idx", "frames_chunk_size"), {"frames_chunk_size": 8},
)
DPT_FORWARD_IMPL = Method(
    "DPTHead", "_forward_impl", head_of("depth_head"),
    ("aggregated_tokens_list", "images", "patch_start_idx", "frames_start_idx", "frames_end_idx"),
    {"frames_start_idx": None, "frames_end_idx": None},
)
RESIDUAL_UNIT_FORWARD = Method("ResidualConvUnit", "forward", first_residual_unit, ("x",))

# Requirements shared by several patches.
# The Aggregator methods of patches that re-run its forward loop step by step.
AGGREGATOR_STEPS = tuple(m.requirement for m in (AGGREGATOR_FORWARD, FRAME_STEP, GLOBAL_STEP))
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
ATTENTION_MEMBERS = (ATTENTION_FORWARD.requirement, *members("Attention", first_attention, *ATTENTION_PARTS))
