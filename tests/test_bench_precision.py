"""``vggt-turbo bench --precision``: rows against upstream in fp32, the floor row, the contract verdict, the table."""

from __future__ import annotations

import math

import torch

from vggt_turbo import PRESETS
from vggt_turbo.bench import precision
from vggt_turbo.bench.precision import PrecisionVariant
from vggt_turbo.patches import Tier
from vggt_turbo.random_model import random_images

VARIANTS = [
    PrecisionVariant(precision.UPSTREAM, None),
    PrecisionVariant("exact", PRESETS["exact"]),
    PrecisionVariant("exact+bf16_weights", PRESETS["exact"].replace(bf16_weights=True)),
]


def test_variants_cover_upstream_exact_every_exact_flag_and_fast() -> None:
    variants = precision.precision_variants()
    names = [v.name for v in variants]
    assert names[:2] == [precision.UPSTREAM, "exact"] and names[-1] == "fast"
    assert {"cached_casts", "fused_layer_scale", "fused_add_norm", "cuda_graphs"} <= set(names)
    assert "bf16_weights" not in names  # reduced precision: only on top of exact, named as such
    assert all(v.tier is Tier.EXACT for v in variants[1:-2])


def test_rows_measure_against_fp32_with_the_autocast_floor(model) -> None:
    images = random_images(2)
    rows = precision.measure(model, images, VARIANTS, precision.query_points_for(images, 3))
    floor, exact, reduced = rows
    assert floor["variant"] == precision.UPSTREAM and "within_contract" not in floor
    assert set(floor["errors_vs_fp32"]) == set(precision.OUTPUTS + precision.TRACK_OUTPUTS)
    assert all(0 < e < 0.1 for e in floor["errors_vs_fp32"].values()), "bf16 autocast differs from fp32"
    # the verdict is the worst ratio against the contract (on this 2-frame CPU sample the CPU's fused qk-norm/RoPE
    # rounds once where CPU autocast rounds more, and the pose lands 1.35x from fp32: the contract is the GPU's)
    assert exact["tier"] == "exact" and exact["within_contract"] is (exact["worst_ratio"] <= precision.CONTRACT)
    assert exact["worst_ratio"] == max(exact["ratio_vs_upstream_autocast"].values())
    assert reduced["tier"] == "reduced precision" and reduced["worst_ratio"] > exact["worst_ratio"]
    assert floor["rot_deg_vs_fp32"] > 0 and math.isfinite(reduced["rot_deg_vs_fp32"])
    assert all(p.dtype == torch.float32 for p in model.parameters())  # nothing left patched or swapped


def test_ratio_of_exact_zero_errors() -> None:
    assert precision.ratios({"a": 0.0, "b": 2e-3, "c": 1e-3}, {"a": 0.0, "b": 1e-3, "c": 0.0}) == {
        "a": 1.0, "b": 2.0, "c": math.inf}


def test_markdown_names_the_variants_outside_the_contract(model) -> None:
    rows = precision.measure(model, random_images(1), VARIANTS)
    rows[1] = {**rows[1], "within_contract": False, "worst_ratio": 3.0}
    meta = dict(gpu="cpu", torch="x", upstream_commit="a288dd0f14786c", vggt_turbo_commit="abc", date="d",
                weights="random", inputs="random", reference="fp32", autocast="bf16")
    text = precision.markdown({"meta": meta, "rows": rows})
    assert "| exact | exact |" in text and "**out**" in text
    assert text.rstrip().endswith("outside the contract in any table:** exact.")
