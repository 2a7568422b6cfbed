"""TurboConfig: defaults, presets, validation (every bad value refused before anything is patched)."""

from __future__ import annotations

import pytest

from helpers import BOOL_FLAGS

from vggt_turbo import PRESETS, TurboConfig
from vggt_turbo.config import FAST_GLOBAL_TO_FRAME_LAYERS, FAST_KV_SUBSAMPLE, resolve
from vggt_turbo.patches import check


def test_exact_preset_is_the_default() -> None:
    cfg = TurboConfig()
    assert PRESETS["exact"] == cfg == TurboConfig.preset("exact") == resolve(None)
    assert cfg.is_exact
    # on: the exact patches that were measured to win; off: no measured gain (sdpa, fused_frame_batching) or a cost (nvtx)
    assert (cfg.sync_free_rope, cfg.cached_positions, cfg.cuda_graphs) == (True, True, True)
    assert (cfg.fused_frame_batching, cfg.sdpa, cfg.nvtx) == (False, False, False)
    assert cfg.sdpa_backend == "auto" and cfg.global_to_frame_layers == ()
    assert cfg.chunked_patch_embed is True and cfg.offload_intermediates == "auto"


def test_fast_preset_adds_only_reduced_precision_and_the_approximations() -> None:
    fast = TurboConfig.preset("fast")
    assert not fast.is_exact
    assert fast.global_to_frame_layers == FAST_GLOBAL_TO_FRAME_LAYERS and fast.kv_subsample == FAST_KV_SUBSAMPLE
    assert fast.bf16_weights and not PRESETS["exact"].bf16_weights
    assert fast.replace(bf16_weights=False, global_to_frame_layers=(), kv_subsample=1) == PRESETS["exact"]


def test_layers_are_normalised_to_a_sorted_tuple() -> None:
    assert TurboConfig(global_to_frame_layers=[4, 0, 2]).global_to_frame_layers == (0, 2, 4)
    assert TurboConfig(global_to_frame_layers=range(3)).global_to_frame_layers == (0, 1, 2)


def test_resolve_applies_flags_over_a_preset() -> None:
    cfg = resolve("fast", sdpa_backend="math", nvtx=True)
    assert cfg == PRESETS["fast"].replace(sdpa_backend="math", nvtx=True)
    assert resolve(cfg) is cfg
    assert cfg.as_dict()["sdpa_backend"] == "math"


def test_config_is_frozen() -> None:
    with pytest.raises(AttributeError):
        TurboConfig().sdpa = False  # type: ignore[misc]


@pytest.mark.parametrize("flag", BOOL_FLAGS)
@pytest.mark.parametrize("value", [1, 0, "yes", None])
def test_non_bool_flag_refused(flag: str, value: object) -> None:
    with pytest.raises(TypeError, match=flag):
        TurboConfig(**{flag: value})


@pytest.mark.parametrize("value", [True, False, "auto"])
def test_offload_intermediates_takes_true_false_or_auto(value: object) -> None:
    assert TurboConfig(offload_intermediates=value).offload_intermediates is value


@pytest.mark.parametrize("value", ["AUTO", "on", "", 1, 0, 2.0, None, ["auto"]])
def test_offload_intermediates_refuses_other_values(value: object) -> None:
    with pytest.raises(TypeError, match="offload_intermediates must be True, False or 'auto'"):
        TurboConfig(offload_intermediates=value)


@pytest.mark.parametrize("value", [True, "auto"])
def test_offload_intermediates_needs_cached_positions_unless_off(value: object) -> None:
    no_positions = dict(cached_positions=False, cuda_graphs=False)
    with pytest.raises(ValueError, match=f"offload_intermediates={value!r} needs \\['cached_positions'\\]"):
        check(TurboConfig(offload_intermediates=value, **no_positions))
    check(TurboConfig(offload_intermediates=False, **no_positions))


@pytest.mark.parametrize("value", ["x", "", "CUDNN", 3, None])
def test_unknown_sdpa_backend_refused(value: object) -> None:
    with pytest.raises(ValueError, match="sdpa_backend"):
        TurboConfig(sdpa_backend=value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("layers", "error"),
    [
        ((-1,), ValueError),
        ((1, 1), ValueError),
        (("a",), TypeError),
        ((True,), TypeError),
        ((1.0,), TypeError),
        ("01", TypeError),
        (3, TypeError),
        (None, TypeError),
    ],
)
def test_bad_layers_refused(layers: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="global_to_frame_layers"):
        TurboConfig(global_to_frame_layers=layers)  # type: ignore[arg-type]


def test_unknown_flag_refused() -> None:
    with pytest.raises(TypeError, match="unknown vggt_turbo flag"):
        TurboConfig().replace(turbo=True)
    with pytest.raises(TypeError, match="unknown vggt_turbo flag"):
        resolve("exact", fused_frame=True)


@pytest.mark.parametrize("name", ["turbo", "EXACT", "", 3])
def test_unknown_preset_refused(name: object) -> None:
    with pytest.raises(ValueError, match="unknown preset"):
        TurboConfig.preset(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("config", [3, {"sdpa": False}, ["exact"]])
def test_config_of_wrong_type_refused(config: object) -> None:
    with pytest.raises(TypeError, match="config must be"):
        resolve(config)  # type: ignore[arg-type]


def test_switched_off_takes_the_flags_that_need_it_along() -> None:
    from vggt_turbo.patches import switched_off

    exact = TurboConfig.preset("exact")
    without = switched_off(exact, "fused_layer_scale")
    assert not without.fused_layer_scale and not without.fused_add_norm and without.cuda_graphs
    without = switched_off(exact, "sync_free_rope")  # cuda_graphs and fused_qk_norm_rope need it
    assert not (without.sync_free_rope or without.cuda_graphs or without.fused_qk_norm_rope) and without.cached_positions
    assert switched_off(exact, "nvtx") == exact  # already off, needed by nothing
