"""Per-instance, atomic, revertible patching of an upstream VGGT (or Aggregator).

Mechanics, and why:
  - Wrappers follow wrapt's convention ``wrapper(wrapped, instance, args, kwargs)`` and are bound with a
    ``wrapt.FunctionWrapper`` stored in the *instance's* ``__dict__``; no class is ever mutated, so other VGGT
    instances keep upstream behaviour.
  - The wrapper subclass below can be deep-copied (plain wrapt proxies refuse ``copy.deepcopy``): the copy wraps
    the copied module's own bound method, so a deep-copied model is patched the same way and independently.
  - Parameters and buffers are never touched, so ``state_dict`` and ``.to(device)`` behave as upstream's.
  - Applying is atomic: the config is validated and every upstream requirement checked before the first
    attribute is set; if setting one fails, the ones already set are undone.
  - The root keeps one attribute, ``_vggt_turbo`` (a ``TurboState``), recording the config and the instance
    attributes it replaced, so ``revert_optimizations`` restores exactly what was there and leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import wrapt
from torch import nn

from . import upstream
from .config import ConfigLike, TurboConfig, resolve
from .patches import ALL_PATCHES, Target, Tier, check, patch_tiers

log = logging.getLogger(__name__)

STATE_ATTR = "_vggt_turbo"


class _InstanceWrapper(wrapt.FunctionWrapper):
    """A wrapt wrapper around one instance's bound method that survives ``copy.deepcopy``."""

    def __deepcopy__(self, memo: dict) -> "_InstanceWrapper":
        return type(self)(copy.deepcopy(self.__wrapped__, memo), self._self_wrapper)

    def __reduce_ex__(self, protocol: int) -> Any:
        raise TypeError(
            "a model patched by vggt_turbo cannot be pickled whole; save model.state_dict() (unchanged by the "
            "exact patches) or call vggt_turbo.revert_optimizations(model) first"
        )


@dataclass
class _Saved:
    """What an instance attribute held before patching (``present=False``: nothing, the class method applied)."""

    path: str
    attr: str
    present: bool
    value: Any = None


@dataclass
class TurboState:
    """Stored on the patched root as ``_vggt_turbo``."""

    config: TurboConfig
    saved: list[_Saved] = field(default_factory=list)
    targets: dict[str, list[str]] = field(default_factory=dict)  # patch name -> ["module.path.attr", ...]


@dataclass(frozen=True)
class Description:
    """What ``describe`` reports: the config applied (None when unpatched) and what each patch replaced."""

    config: Optional[TurboConfig]
    targets: dict[str, list[str]]

    @property
    def tier(self) -> Tier:
        """The loosest precision tier applied (``Tier.EXACT`` when unpatched)."""
        return Tier.EXACT if self.config is None else self.config.tier

    @property
    def exact(self) -> bool:
        return self.tier is Tier.EXACT

    @property
    def stacks(self) -> dict[str, list[str]]:
        """Each wrapped method (``module.path.attr``) -> the patches wrapping it, in call order (outermost first)."""
        order = [p.name for p in reversed(ALL_PATCHES)]  # ALL_PATCHES stacks the last outermost
        stacks: dict[str, list[str]] = {}
        for name in sorted(self.targets, key=order.index):
            for path in self.targets[name]:
                stacks.setdefault(path, []).append(name)
        return stacks

    def __str__(self) -> str:
        if self.config is None:
            return "vggt_turbo: not applied (upstream behaviour)"
        kind = self.tier.label if self.exact else self.tier.label.upper()
        lines = [f"vggt_turbo: applied ({kind}) {self.config}"]
        tiers = patch_tiers()
        for name, paths in self.targets.items():
            shown = ", ".join(paths[:3]) + (f", ... ({len(paths)} in all)" if len(paths) > 3 else "")
            lines.append(f"  {name} [{tiers[name].label}]: {shown}")
        lines.append("wrapper stacks, outermost first (N: every number with the same stack):")
        groups: dict[str, dict[str, tuple[str, ...]]] = {}
        for path, names in self.stacks.items():
            groups.setdefault(re.sub(r"\d+", "N", path), {})[path] = tuple(names)
        for pattern, members in groups.items():
            same = len(set(members.values())) == 1
            shown = {pattern: next(iter(members.values()))} if same else members
            lines += [f"  {path}: {' > '.join(names)}" for path, names in shown.items()]
        return "\n".join(lines)


def _state(model: nn.Module) -> Optional[TurboState]:
    state = model.__dict__.get(STATE_ATTR)
    return state if isinstance(state, TurboState) else None


def _check_model(model: Any) -> None:
    """Refuse what is not a VGGT/Aggregator, and a model part of which is patched through another root."""
    if not (upstream.looks_like_vggt(model) or upstream.looks_like_aggregator(model)):
        raise TypeError(
            "vggt_turbo patches an upstream vggt.models.vggt.VGGT or vggt.models.aggregator.Aggregator instance, "
            f"got {type(model).__module__}.{type(model).__qualname__}"
        )
    state = _state(model)
    owned = {(s.path, s.attr) for s in state.saved} if state is not None else set()
    for name, sub in model.named_modules():
        if name and _state(sub) is not None:
            raise ValueError(
                f"model.{name} was optimized on its own; call vggt_turbo.revert_optimizations(model.{name}) "
                "before optimizing the whole model"
            )
        for attr, value in vars(sub).items():
            if isinstance(value, _InstanceWrapper) and (name, attr) not in owned:
                raise ValueError(
                    f"{name or type(model).__name__}.{attr} is already patched by vggt_turbo through another model "
                    "(e.g. its parent VGGT); revert that one first"
                )


def _module(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def _plan(model: nn.Module, config: TurboConfig) -> tuple[list[Target], dict[str, list[str]]]:
    """Validate and collect every target of every enabled patch, touching nothing."""
    check(config)
    patches = [p for p in ALL_PATCHES if p.enabled(config)]
    upstream.check(model, {p.name: p.requirements for p in patches})
    targets: list[Target] = []
    names: dict[str, list[str]] = {}
    for patch in patches:
        found = patch.targets(model, config)
        targets.extend(found)
        names[patch.name] = [f"{t.path}.{t.attr}" if t.path else t.attr for t in found]
    return targets, names


def _install(model: nn.Module, config: TurboConfig, targets: list[Target], names: dict[str, list[str]]) -> None:
    state = TurboState(config=config, targets=names)
    seen: set[tuple[str, str]] = set()
    try:
        for t in targets:
            module = _module(model, t.path)
            if (t.path, t.attr) not in seen:
                seen.add((t.path, t.attr))
                state.saved.append(_Saved(t.path, t.attr, t.attr in module.__dict__, module.__dict__.get(t.attr)))
            setattr(module, t.attr, _InstanceWrapper(getattr(module, t.attr), t.wrapper))
    except BaseException:
        _restore(model, state.saved)
        raise
    model.__dict__[STATE_ATTR] = state


def _restore(model: nn.Module, saved: list[_Saved]) -> None:
    for s in reversed(saved):
        module = _module(model, s.path)
        if s.present:
            setattr(module, s.attr, s.value)
        else:
            module.__dict__.pop(s.attr, None)


def apply_optimizations(model: nn.Module, config: ConfigLike = None, **flags: Any) -> nn.Module:
    """Patch ``model`` (an upstream ``VGGT`` or ``Aggregator``) in place and return it.

    ``config`` is a ``TurboConfig``, a preset name (``"exact"``, the default, or ``"fast"``) or None; ``**flags``
    override single fields, e.g. ``apply_optimizations(model, "fast", sdpa_backend="flash")``. Everything is
    validated first (``TypeError``/``ValueError`` for bad names or values, ``IncompatibleUpstreamError`` when the
    installed upstream lacks what a patch needs); then all requested patches are applied, or none. Applying the
    same config twice is a no-op; applying a different one replaces the previous.
    """
    cfg = resolve(config, **flags)
    _check_model(model)
    previous = _state(model)
    if previous is not None and previous.config == cfg:
        return model
    targets, names = _plan(model, cfg)
    if previous is not None:
        revert_optimizations(model)
    try:
        _install(model, cfg, targets, names)
    except BaseException:
        if previous is not None:
            _install(model, previous.config, *_plan(model, previous.config))
        raise
    log.info("vggt_turbo applied to %s: %s", type(model).__name__, cfg)
    return model


def revert_optimizations(model: nn.Module) -> nn.Module:
    """Restore upstream behaviour exactly; no attribute of vggt_turbo is left on the model. No-op if unpatched."""
    state = _state(model)
    if state is None:
        return model
    _restore(model, state.saved)
    del model.__dict__[STATE_ATTR]
    log.info("vggt_turbo reverted on %s", type(model).__name__)
    return model


def describe(model: nn.Module) -> Description:
    """What vggt_turbo has applied to ``model``: the config and, per patch, the replaced methods."""
    state = _state(model)
    if state is None:
        return Description(config=None, targets={})
    return Description(config=state.config, targets={k: list(v) for k, v in state.targets.items()})


@contextlib.contextmanager
def optimized(model: nn.Module, config: ConfigLike = None, **flags: Any) -> Iterator[nn.Module]:
    """Apply for the duration of a ``with`` block, then restore what the model had before (patched or not)."""
    previous = _state(model)
    apply_optimizations(model, config, **flags)
    try:
        yield model
    finally:
        if previous is None:
            revert_optimizations(model)
        else:
            apply_optimizations(model, previous.config)
