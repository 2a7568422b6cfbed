"""The rules between flags, derived from what each patch declares (``Patch.requires``, ``Patch.conflicts``,
``Patch.sequence_parallel``), and checked in one place (``check``, called by ``patching._plan`` before anything is
touched).

One behaviour everywhere: a config that breaks a rule is refused with a ``ValueError`` whose message gives the call
that works (e.g. switching off the flags that need the one switched off). ``switched_off`` builds that config for
ablations: a flag off, and every flag that needs it off with it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Mapping

from ..config import AUTO_FLAGS, TurboConfig
from ._base import Patch


def requirements(patches: Iterable[Patch]) -> Mapping[str, tuple[str, ...]]:
    """Flag -> the flags it needs on: each patch's ``requires``, and each of its ``dependent_options`` needs the
    patch's own flag (``fused_add_norm`` is an option of ``fused_layer_scale``)."""
    needs: dict[str, tuple[str, ...]] = {}
    for patch in patches:
        if patch.requires:
            needs[patch.name] = tuple(patch.requires)
        for option in patch.dependent_options:
            needs[option] = (patch.name,)
    return needs


def off_value(flag: str) -> Any:
    """The value that switches ``flag`` off: False for a boolean flag (``"auto"`` ones too), else its default
    (e.g. ``global_to_frame_layers=()``, ``kv_subsample=1``)."""
    field = {f.name: f for f in dataclasses.fields(TurboConfig)}[flag]
    return False if field.type in ("bool", bool) or flag in AUTO_FLAGS or flag == "sequence_parallel" else field.default


def _call(flags: Iterable[str]) -> str:
    return "apply_optimizations(model, ..., " + ", ".join(f"{f}={off_value(f)!r}" for f in sorted(set(flags))) + ")"


def _is_on(config: TurboConfig, flag: str) -> bool:
    value = getattr(config, flag)
    return value is not False and value != off_value(flag)


def switched_off(config: TurboConfig, patches: Iterable[Patch], *flags: str) -> TurboConfig:
    """``config`` with ``flags`` off, and with them every flag that needs one of them (transitively), so that
    ablating a flag that others build on gives a valid config (``exact`` without ``fused_layer_scale`` is also
    without ``fused_add_norm``)."""
    needs = requirements(patches)
    off = set(flags)
    while True:
        dependents = {f for f, n in needs.items() if f not in off and off & set(n) and _is_on(config, f)}
        if not dependents:
            return config.replace(**{f: off_value(f) for f in off})
        off |= dependents


def check(config: TurboConfig, patches: Iterable[Patch]) -> None:
    """``ValueError``, naming the call that works, when ``config`` breaks a rule: a flag on without a flag it needs,
    a patch that conflicts with the config, or a patch not verified under ``sequence_parallel`` together with it."""
    patches = list(patches)
    needs_of = requirements(patches)
    for flag, needs in needs_of.items():
        missing = [n for n in needs if not _is_on(config, n)]
        if _is_on(config, flag) and missing:
            dependents = {flag} | {f for f, n in needs_of.items() if set(n) & set(missing) and _is_on(config, f)}
            raise ValueError(
                f"TurboConfig.{flag}={getattr(config, flag)!r} needs {missing} on as well: turn "
                f"{' and '.join(missing)} on, or switch off what needs it too: {_call(dependents | set(missing))}"
            )
    enabled = [p for p in patches if p.enabled(config)]
    for patch in enabled:
        reason = patch.conflicts(config) if patch.conflicts is not None else None
        if reason:
            raise ValueError(f"{patch.name}: {reason}")
    if any(p.name == "sequence_parallel" for p in enabled):
        unverified = sorted(p.name for p in enabled if not p.sequence_parallel)
        if unverified:
            raise ValueError(
                f"sequence_parallel is not supported together with {unverified} (not verified to be exact across "
                f"ranks): switch them off, e.g. {_call(unverified)}"
            )
