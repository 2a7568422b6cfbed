"""Each patch really runs and does what its module says (without this, the equivalence tests could pass with
patches that are never called)."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import nvtx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import NO_FLAGS, assert_close, layer_outputs, only

import vggt_turbo
from vggt_turbo.patches import _rope_table
from vggt_turbo.patches.aggregator import fused_frame_batching
from vggt_turbo.patches.approximate import global_to_frame
from vggt_turbo.random_model import random_images

DEPTH = 24  # layers of each kind in the small model, as in upstream's


def counting(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str, record: Callable[..., Any] = lambda *a, **k: None):
    """Replace ``owner.name`` by a pass-through that calls ``record(*args, **kwargs)`` first; returns the call log."""
    calls: list[Any] = []
    original = getattr(owner, name)

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(record(*args, **kwargs))
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


def aggregate(model: nn.Module, images: torch.Tensor) -> list:
    with torch.no_grad():
        return model.aggregator(images)[0]


# --- sync_free_rope -------------------------------------------------------------------------------------------


def test_sync_free_rope_never_reads_a_tensor_on_the_host(model, images, monkeypatch) -> None:
    """Upstream's RoPE does ``int(positions.max())`` (a device-to-host sync on a GPU) in each of its 2 calls per
    attention layer; the patched aggregator calls ``Tensor.__int__`` not once."""
    calls = counting(monkeypatch, torch.Tensor, "__int__")
    aggregate(model, images)
    assert len(calls) >= 2 * 2 * DEPTH
    calls.clear()
    vggt_turbo.apply_optimizations(model, only("sync_free_rope"))
    aggregate(model, images)
    assert calls == []


@pytest.mark.parametrize(("height", "width"), [(56, 56), (56, 28), (28, 42), (14, 70)])
def test_sync_free_rope_builds_upstreams_table(model, height: int, width: int) -> None:
    """The table length computed on the host is upstream's ``int(positions.max()) + 1``: the patched RoPE makes the
    same (dim, length, device, dtype) tables (kept apart from upstream's cache, which stays untouched). A longer
    table would give the same outputs, so compare keys."""
    images = random_images(2, size=56)[..., :height, :width]
    rope = model.aggregator.rope
    rope.frequency_cache.clear()
    aggregate(model, images)
    upstream_keys = set(rope.frequency_cache)
    rope.frequency_cache.clear()
    vggt_turbo.apply_optimizations(model, only("sync_free_rope"))
    aggregate(model, images)
    assert rope.frequency_cache == {}
    assert set(_rope_table._TABLES[rope]) == upstream_keys and len(upstream_keys) == 1


def test_sync_free_rope_called_alone_falls_back_to_upstream(model, monkeypatch) -> None:
    """Outside its aggregator's forward the RoPE does not know the grid: upstream's code runs, sync included."""
    rope = model.aggregator.rope
    tokens = torch.randn(2, 4, 10, 16)
    positions = torch.randint(0, 5, (2, 10, 2))
    expected = rope(tokens, positions)
    vggt_turbo.apply_optimizations(model, only("sync_free_rope"))
    calls = counting(monkeypatch, torch.Tensor, "__int__")
    assert torch.equal(rope(tokens, positions), expected)
    assert len(calls) == 1


# --- sdpa ------------------------------------------------------------------------------------------------------

BACKEND_FLAGS = {
    "flash": torch.backends.cuda.flash_sdp_enabled,
    "efficient": torch.backends.cuda.mem_efficient_sdp_enabled,
    "math": torch.backends.cuda.math_sdp_enabled,
    "cudnn": torch.backends.cuda.cudnn_sdp_enabled,
}


def sdpa_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """What a spy on ``scaled_dot_product_attention`` records: layout of q/k/v and the enabled backends."""
    return {
        "contiguous": (q.is_contiguous(), k.is_contiguous(), v.is_contiguous()),
        "backends": {name: enabled() for name, enabled in BACKEND_FLAGS.items()},
    }


def test_sdpa_runs_every_attention_and_copies_nothing(model, images, monkeypatch) -> None:
    """q/k come contiguous from RoPE; v stays upstream's strided view (a copy cost memory and no time)."""
    calls = counting(monkeypatch, F, "scaled_dot_product_attention", sdpa_call)
    aggregate(model, images)
    upstream_calls = list(calls)
    calls.clear()
    vggt_turbo.apply_optimizations(model, only("sdpa"))
    aggregate(model, images)
    assert len(calls) == 2 * DEPTH and calls == upstream_calls
    assert all(c["contiguous"] == (True, True, False) for c in calls)


def test_sdpa_forced_backend_is_the_only_one_enabled_during_the_call(model, images, monkeypatch) -> None:
    defaults = {name: enabled() for name, enabled in BACKEND_FLAGS.items()}
    calls = counting(monkeypatch, F, "scaled_dot_product_attention", sdpa_call)
    vggt_turbo.apply_optimizations(model, only("sdpa", sdpa_backend="math"))
    aggregate(model, images)
    only_math = {name: name == "math" for name in BACKEND_FLAGS}
    assert calls and all(c["backends"] == only_math for c in calls)
    assert {name: enabled() for name, enabled in BACKEND_FLAGS.items()} == defaults


def test_sdpa_auto_keeps_torchs_choice_on_the_cpu(model, images, monkeypatch) -> None:
    defaults = {name: enabled() for name, enabled in BACKEND_FLAGS.items()}
    calls = counting(monkeypatch, F, "scaled_dot_product_attention", sdpa_call)
    vggt_turbo.apply_optimizations(model, only("sdpa"))
    aggregate(model, images)
    assert calls and all(c["backends"] == defaults for c in calls)


@pytest.mark.parametrize("backend", ["cudnn", "efficient"])
def test_sdpa_forced_backend_that_cannot_run_says_so(model, images, backend: str) -> None:
    """Neither kernel exists for CPU tensors: a clear error instead of a silent fallback."""
    vggt_turbo.apply_optimizations(model, only("sdpa", sdpa_backend=backend))
    with pytest.raises(RuntimeError, match=f"sdpa_backend='{backend}' cannot run attention.*use sdpa_backend='auto'"):
        aggregate(model, images)


def test_sdpa_training_mode_runs_upstreams_forward(model, images, monkeypatch) -> None:
    calls = counting(monkeypatch, F, "scaled_dot_product_attention", sdpa_call)
    vggt_turbo.apply_optimizations(model, only("sdpa"))
    model.train()
    aggregate(model, images)
    assert len(calls) == 2 * DEPTH and all(c["contiguous"][2] is False for c in calls)


# --- fused_frame_batching -------------------------------------------------------------------------------------


def test_fused_frame_batching_runs_every_frame_step(model, images, monkeypatch) -> None:
    calls = counting(monkeypatch, fused_frame_batching, "run_blocks")
    vggt_turbo.apply_optimizations(model, only("fused_frame_batching"))
    aggregate(model, images)
    assert len(calls) == DEPTH
    model.train()  # training: upstream's method, with its checkpointing
    aggregate(model, images)
    assert len(calls) == DEPTH


# --- global_to_frame_layers -----------------------------------------------------------------------------------


def test_global_to_frame_layers_run_listed_blocks_on_the_frame_layout(model, images, monkeypatch) -> None:
    B, S = images.shape[:2]
    seen: dict[int, tuple[int, ...]] = {}
    for i, block in enumerate(model.aggregator.global_blocks):
        block.register_forward_pre_hook(lambda module, args, i=i: seen.__setitem__(i, tuple(args[0].shape)))
    steps = counting(monkeypatch, global_to_frame, "run_blocks")
    vggt_turbo.apply_optimizations(model, NO_FLAGS.replace(global_to_frame_layers=(0, 5, 23)))
    aggregate(model, images)
    P, C = seen[0][1], seen[0][2]
    assert {i for i, shape in seen.items() if shape == (B * S, P, C)} == {0, 5, 23}
    assert {i for i, shape in seen.items() if shape == (B, S * P, C)} == set(range(DEPTH)) - {0, 5, 23}
    assert len(steps) == 3, "the steps without a listed layer run upstream's method"


def test_global_to_frame_layers_refuse_layers_past_the_depth(model) -> None:
    with pytest.raises(ValueError, match=r"\[24\] out of range: this model has 24 global blocks"):
        vggt_turbo.apply_optimizations(model, "fast", global_to_frame_layers=(3, 24))


# --- nvtx -----------------------------------------------------------------------------------------------------


def test_nvtx_ranges_cover_patch_embed_blocks_and_heads(model, images, query_points, monkeypatch) -> None:
    ranges: list[tuple[str, str]] = []

    @contextlib.contextmanager
    def annotate(name: str, domain: str) -> Iterator[None]:
        ranges.append((name, domain))
        yield

    monkeypatch.setattr(nvtx, "annotate", annotate)
    vggt_turbo.apply_optimizations(model, only("nvtx"))
    with torch.no_grad():
        model(images, query_points=query_points)
    blocks = [name for i in range(DEPTH) for name in (f"frame_block[{i}]", f"global_block[{i}]")]
    heads = ["camera_head", "depth_head", "point_head", "track_head"]
    assert [name for name, _ in ranges] == ["patch_embed", *blocks, *heads]
    assert {domain for _, domain in ranges} == {"vggt_turbo"}


def test_nvtx_skips_disabled_heads(model) -> None:
    model.track_head = None
    vggt_turbo.apply_optimizations(model, only("nvtx"))
    targets = vggt_turbo.describe(model).targets["nvtx"]
    assert "camera_head.forward" in targets and not any(t.startswith("track_head") for t in targets)
    assert len(targets) == 1 + 2 * DEPTH + 3


# --- cached_positions -----------------------------------------------------------------------------------------


def test_cached_positions_builds_positions_once_per_shape(model, images, monkeypatch) -> None:
    aggregator = model.aggregator
    upstream_pos: list[torch.Tensor] = []
    aggregator.frame_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: upstream_pos.append(kwargs["pos"]), with_kwargs=True
    )
    expected = aggregate(model, images)
    built = counting(monkeypatch, aggregator, "position_getter")
    vggt_turbo.apply_optimizations(model, only("cached_positions"))
    first, second = aggregate(model, images), aggregate(model, images)
    assert len(built) == 1, "positions rebuilt in every forward"
    assert torch.equal(upstream_pos[1], upstream_pos[0]) and torch.equal(upstream_pos[2], upstream_pos[0])
    for out in (first, second):
        assert [o is None for o in out] == [e is None for e in expected]
        assert_close(layer_outputs(out), layer_outputs(expected))
