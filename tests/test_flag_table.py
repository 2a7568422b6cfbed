"""The README's flag table is made from the patches' facts: every TurboConfig field once, and the README's copy is
the generated one (``python -m vggt_turbo.flag_table``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from vggt_turbo import PRESETS, TurboConfig, flag_table
from vggt_turbo.patches import ALL_PATCHES


def test_every_field_has_one_row_with_its_tier_and_summary() -> None:
    rows = flag_table.rows()
    assert [r[0] for r in rows] == [f"`{f.name}`" for f in dataclasses.fields(TurboConfig)]
    assert all(p.summary and "\n" not in p.summary for p in ALL_PATCHES)
    by_flag = {r[0]: r for r in rows}
    assert by_flag["`bf16_weights`"][1:4] == ("off", "on", "reduced precision")
    assert by_flag["`kv_subsample`"][1:4] == ("`1`", f"`{PRESETS['fast'].kv_subsample}`", "approximate")
    assert by_flag["`fused_add_norm`"][3] == "as `fused_layer_scale`"


def test_readme_holds_the_generated_table() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert flag_table.markdown() in readme, "README's flag table is stale: paste `python -m vggt_turbo.flag_table`"
