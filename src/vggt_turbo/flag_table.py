"""The README's flag table, made from the patches' own facts (``Patch.name``, ``tier``, ``summary``, ``options``)
and the presets: ``python -m vggt_turbo.flag_table`` prints it; a test keeps the README's copy equal to it."""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import PRESETS, TurboConfig
from .patches import ALL_PATCHES

START, END = "<!-- flag table: python -m vggt_turbo.flag_table -->", "<!-- end of flag table -->"


def _value(config: TurboConfig, field: str) -> str:
    value: Any = getattr(config, field)
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return f"`{value}`" if value else "–"
    return f"`{value}`"


def rows() -> list[tuple[str, str, str, str, str]]:
    """(flag, exact, fast, tier, what it does), one per TurboConfig field, in the config's field order: each
    patch's flag, then the options it reads."""
    by_field = {}
    for patch in ALL_PATCHES:
        by_field[patch.name] = (patch, patch.summary)
        for option, summary in patch.options.items():
            by_field[option] = (patch, summary)
    out = []
    for f in dataclasses.fields(TurboConfig):
        patch, summary = by_field[f.name]
        tier = patch.tier.label if f.name == patch.name else f"as `{patch.name}`"
        out.append((f"`{f.name}`", _value(PRESETS["exact"], f.name), _value(PRESETS["fast"], f.name), tier, summary))
    return out


def markdown() -> str:
    lines = [START, "| flag | `exact` | `fast` | tier | what it does |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows()]
    return "\n".join(lines + [END])


if __name__ == "__main__":
    print(markdown())
