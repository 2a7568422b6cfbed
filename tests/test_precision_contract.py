"""The precision tiers (issue #17): which patches are exact, and the contract the exact ones keep on the CPU.

Against upstream in fp32, every output of an exact patch under bf16 autocast stays within 1.25x of
upstream-autocast's own error (the GPU version of this check is in test_gpu.py; the full-size figures come from
``vggt-turbo bench --precision``). In fp32 the exact patches stay within 1e-5 of upstream (test_equivalence.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

from helpers import BOOL_FLAGS, errors, only, run

import vggt_turbo
from vggt_turbo import PRESETS, TurboConfig
from vggt_turbo.patches import ALL_PATCHES, Tier, patch_tiers
from vggt_turbo.bench import precision
from vggt_turbo.random_model import random_images

CONTRACT = precision.CONTRACT


def test_every_patch_declares_a_tier() -> None:
    tiers = patch_tiers()
    assert all(isinstance(p.tier, Tier) for p in ALL_PATCHES)
    assert tiers["bf16_weights"] is Tier.REDUCED
    assert tiers["kv_subsample"] is tiers["global_to_frame_layers"] is Tier.APPROXIMATE
    assert tiers["cached_casts"] is tiers["fused_layer_scale"] is Tier.EXACT  # fused_add_norm is an option of it


def test_exact_preset_holds_only_exact_patches_and_fast_the_others() -> None:
    exact, fast = PRESETS["exact"], PRESETS["fast"]
    assert exact.tier is Tier.EXACT and exact.is_exact
    assert all(p.tier is Tier.EXACT for p in ALL_PATCHES if p.enabled(exact))
    assert fast.bf16_weights and fast.tier is Tier.APPROXIMATE and not fast.is_exact
    assert TurboConfig(bf16_weights=True).tier is Tier.REDUCED


@pytest.fixture(scope="module")
def contract_inputs(pristine):
    images = random_images(3)
    with torch.no_grad():
        fp32 = run(pristine, images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            autocast = run(pristine, images)
    return images, fp32, errors(autocast, fp32)


EXACT_FLAGS = [f for f in BOOL_FLAGS if patch_tiers().get(f, Tier.EXACT) is Tier.EXACT and f != "sequence_parallel"]


@pytest.mark.parametrize("config", ["exact", *EXACT_FLAGS])
def test_exact_patches_keep_the_contract_under_cpu_autocast(pristine, contract_inputs, config) -> None:
    images, fp32, floor = contract_inputs
    model = copy.deepcopy(pristine)
    vggt_turbo.apply_optimizations(model, config if config == "exact" else only(config))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = errors(run(model, images), fp32)
    too_far = {k: (e, floor[k]) for k, e in got.items() if not e <= CONTRACT * floor[k]}
    assert not too_far, too_far


def test_bf16_weights_is_reduced_precision_for_a_reason(pristine, contract_inputs) -> None:
    """The reduced tier is not a label of convenience: bf16_weights breaks the contract on this model (pose)."""
    images, fp32, floor = contract_inputs
    model = copy.deepcopy(pristine)
    vggt_turbo.apply_optimizations(model, only("bf16_weights"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = errors(run(model, images), fp32)
    assert any(e > CONTRACT * floor[k] for k, e in got.items()), (got, floor)
