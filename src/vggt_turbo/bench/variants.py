"""The benchmarked configurations: upstream, each ``TurboConfig`` flag alone, and the presets."""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass
from typing import Any, Optional

from ..config import AUTO_FLAGS, PRESETS, TurboConfig
from ..patches import check, flag_requirements, switched_off
from .report import UPSTREAM

log = logging.getLogger(__name__)

PRESET_NAMES = ("exact", "fast")
# Fields that only modify what other flags do (the kernel their attention runs on): no standalone variant; ablate
# them on a preset instead (``exact-flash_attention_4``).
MODIFIER_FIELDS = frozenset({"sdpa_backend", "flash_attention_4"})
# Fields that need a multi-process job: measured by ``bench --sequence-parallel`` under torchrun instead.
DISTRIBUTED_FIELDS = frozenset({"sequence_parallel", "sequence_parallel_output"})


@dataclass(frozen=True)
class Variant:
    """One benchmarked configuration; ``config`` None means upstream, unpatched."""

    name: str
    config: Optional[TurboConfig]

    @property
    def exact(self) -> bool:
        return self.config is None or self.config.is_exact

    @property
    def tier(self) -> str:
        """The loosest precision tier of its patches ("upstream" for upstream itself)."""
        return "upstream" if self.config is None else self.config.tier.label

    def config_dict(self) -> Optional[dict[str, Any]]:
        if self.config is None:
            return None
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.config.as_dict().items()}


def flag_variants() -> list[Variant]:
    """Each ``TurboConfig`` field alone: every boolean field False except that one (plus the flags it cannot work
    without, ``patches.flag_requirements``).

    A non-boolean field (e.g. ``global_to_frame_layers``) gets the ``fast`` preset's value when it is the flag and
    its default otherwise; fields whose ``fast`` value equals the default (nothing to switch on, e.g.
    ``cuda_graph_max_frames``), the modifier fields (``sdpa_backend``) and the distributed ones get no standalone
    variant.
    """
    default, fast = TurboConfig(), PRESETS["fast"]
    requires = flag_requirements()
    fields = dataclasses.fields(TurboConfig)
    # "auto" flags (config.AUTO_FLAGS) are boolean here: off is False, alone is True
    is_bool = {f.name: isinstance(getattr(default, f.name), bool) or f.name in AUTO_FLAGS for f in fields}
    off = {f.name: False if is_bool[f.name] else getattr(default, f.name) for f in fields}
    out = []
    for f in fields:
        if f.name in MODIFIER_FIELDS or f.name in DISTRIBUTED_FIELDS:
            continue
        if is_bool[f.name]:
            value: Any = True
        else:
            value = getattr(fast, f.name)
            if value == getattr(default, f.name):
                log.debug("no standalone variant for %s: the fast preset keeps its default", f.name)
                continue
        flags = {f.name: value}
        pending = list(requires.get(f.name, ()))
        while pending:  # the flags this one needs, transitively
            need = pending.pop()
            if need not in flags:
                flags[need] = True
                pending += list(requires.get(need, ()))
        try:
            config = TurboConfig(**{**off, **flags})
            check(config)
            out.append(Variant(f.name, config))
        except (TypeError, ValueError) as err:  # a flag that cannot stand alone: say so, keep the others
            log.warning("no standalone variant for %s: %s", f.name, err)
    return out


def all_variants() -> list[Variant]:
    """upstream, each flag alone, then the presets."""
    return [Variant(UPSTREAM, None), *flag_variants(), *(Variant(p, PRESETS[p]) for p in PRESET_NAMES)]


def combined(spec: str) -> Variant:
    """``PRESET+FLAG-FLAG...``: the preset with boolean flags switched on (``+``) or off (``-``; the flags that need
    one switched off go off with it, ``patches.switched_off``) (``ValueError`` for unknown names and for
    combinations ``TurboConfig`` or ``patches.check`` refuse)."""
    preset, *parts = re.split(r"([+-])", spec)
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} in variant {spec!r}; choose one of {sorted(PRESETS)}")
    flags = {flag: sign == "+" for sign, flag in zip(parts[::2], parts[1::2])}
    try:
        on = PRESETS[preset].replace(**{f: True for f, value in flags.items() if value})
        config = switched_off(on, *(f for f, value in flags.items() if not value))
        lost = [f for f, value in flags.items() if value and not getattr(config, f)]
        if lost:  # asked for, but it needs a flag the spec switches off
            needs = flag_requirements()
            raise ValueError(f"{lost} needs {sorted({n for f in lost for n in needs[f]})} on as well")
        check(config)
        return Variant(spec, config)
    except (TypeError, ValueError) as err:
        raise ValueError(f"variant {spec!r}: {err}") from None


def select_variants(spec: Optional[str]) -> list[Variant]:
    """Parse ``--variants``: names, the groups ``all``, ``presets`` (upstream, exact, fast), ``flags``, or a preset
    with boolean flags switched on or off, ``PRESET+FLAG-FLAG...`` (e.g. ``exact+compile``,
    ``exact-flash_attention_4``)."""
    available = all_variants()
    by_name = {v.name: v for v in available}
    if not spec:
        return available
    chosen: list[str] = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        if item == "all":
            names = [v.name for v in available]
        elif item == "presets":
            names = [UPSTREAM, *PRESET_NAMES]
        elif item == "flags":
            names = [v.name for v in flag_variants()]
        elif item in by_name:
            names = [item]
        elif "+" in item or "-" in item:  # a preset with flags switched, e.g. exact+compile
            extra = combined(item)
            available.append(extra)
            by_name[extra.name] = extra
            names = [extra.name]
        else:
            raise ValueError(f"unknown variant {item!r}; choose from {sorted(by_name)} or all, presets, flags")
        chosen += [n for n in names if n not in chosen]
    return [v for v in available if v.name in chosen]  # canonical order, upstream first
