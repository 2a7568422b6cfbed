"""``chunked_patch_embed``: the patch embed run over slices of frames gives upstream's outputs (the conv patch
embed's tensor and DINOv2's dict alike); the slices really happen; training and autograd run upstream's call."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close, assert_unchanged, layer_outputs, only, patched_methods, run, snapshot

import vggt_turbo
from vggt_turbo import patching
from vggt_turbo.patches import ALL_PATCHES
from vggt_turbo.patches.patch_embed import chunked_patch_embed
from vggt_turbo.random_model import random_images

FRAMES = 5  # above the chunk: slices of 2, 2 and 1 frames


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(chunked_patch_embed, "CHUNK_FRAMES", 2)


@pytest.fixture(scope="module")
def long_images() -> torch.Tensor:
    return random_images(FRAMES, seed=5)


def _slices(model) -> list:
    """Batch sizes (and dtypes) the conv patch embed's projection sees, call by call."""
    seen: list = []
    model.aggregator.patch_embed.proj.register_forward_hook(lambda m, a, o: seen.append((a[0].shape[0], a[0].dtype)))
    return seen


def test_sliced_patch_embed_gives_upstream_outputs(model, pristine, long_images, query_points, small_chunks) -> None:
    expected = run(pristine, long_images, query_points)
    seen = _slices(model)
    vggt_turbo.apply_optimizations(model, only("chunked_patch_embed"))
    assert_close(run(model, long_images, query_points), expected)
    assert seen == [(2, torch.float32), (2, torch.float32), (1, torch.float32)]


def test_with_the_exact_preset(model, pristine, long_images, small_chunks) -> None:
    expected = run(pristine, long_images)
    vggt_turbo.apply_optimizations(model, "exact")
    assert_close(run(model, long_images), expected)


def test_short_sequences_training_and_autograd_run_upstream(model, images, long_images, small_chunks) -> None:
    seen = _slices(model)
    vggt_turbo.apply_optimizations(model, only("chunked_patch_embed"))
    run(model, images)  # 2 frames: not above the chunk
    model.aggregator(long_images)  # autograd on
    model.train()
    with torch.no_grad():
        model.aggregator(long_images)
    assert [n for n, _ in seen] == [2, FRAMES, FRAMES]


def test_revert_restores_upstream(model, long_images, small_chunks) -> None:
    before = snapshot(model)
    with torch.no_grad():
        expected = layer_outputs(model.aggregator(long_images)[0])
    vggt_turbo.apply_optimizations(model, only("chunked_patch_embed"))
    assert "aggregator.patch_embed.forward" in patched_methods(model)
    vggt_turbo.revert_optimizations(model)
    assert_unchanged(model, before)
    seen = _slices(model)
    with torch.no_grad():
        out = layer_outputs(model.aggregator(long_images)[0])
    assert seen == [(FRAMES, torch.float32)]
    assert out.keys() == expected.keys() and all(torch.equal(out[k], expected[k]) for k in out)


@pytest.mark.parametrize("chunk_outermost", [True, False], ids=["chunk-outside-bf16", "bf16-outside-chunk"])
def test_composes_with_bf16_weights_in_either_order(
    model, long_images, small_chunks, monkeypatch, chunk_outermost: bool
) -> None:
    """bf16_weights casts the patch embed's input: the slices are bf16 whichever wrapper is outside."""
    config = only("bf16_weights", chunked_patch_embed=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        vggt_turbo.apply_optimizations(model, config, chunked_patch_embed=False)
        expected = run(model, long_images)
        vggt_turbo.revert_optimizations(model)
        order = list(ALL_PATCHES)
        if not chunk_outermost:
            i, j = order.index(chunked_patch_embed.PATCH), [p.name for p in order].index("bf16_weights")
            order[i], order[j] = order[j], order[i]
        monkeypatch.setattr(patching, "ALL_PATCHES", tuple(order))
        seen = _slices(model)
        vggt_turbo.apply_optimizations(model, config)
        out = run(model, long_images)
    assert seen == [(2, torch.bfloat16), (2, torch.bfloat16), (1, torch.bfloat16)]
    assert_close(out, expected, tol=1e-2)  # bf16: slices may round their convolutions differently


def test_dinov2_dict_keeps_its_keys_and_values(small_chunks) -> None:
    """Upstream's full model embeds with DINOv2, which returns a dict: a small DINOv2 aggregator, sliced."""
    from vggt.models.aggregator import Aggregator

    torch.manual_seed(0)
    agg = Aggregator(img_size=28, patch_size=14, embed_dim=384, depth=2, num_heads=6,
                     patch_embed="dinov2_vits14_reg", cached_layer_indices=(0,)).eval()
    images = random_images(FRAMES, size=28, seed=6)
    x = images.view(FRAMES, 3, 28, 28)
    with torch.no_grad():
        embedded = agg.patch_embed(x)
        expected = layer_outputs(agg(images)[0])
    vggt_turbo.apply_optimizations(agg, only("chunked_patch_embed"))
    calls = []
    agg.patch_embed.patch_embed.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    with torch.no_grad():
        sliced = agg.patch_embed(x)
        out = layer_outputs(agg(images)[0])
    assert calls == [2, 2, 1] * 2
    assert sliced.keys() == embedded.keys() and sliced["masks"] is None and embedded["masks"] is None
    for key, value in embedded.items():
        if value is not None:
            assert sliced[key].shape == value.shape and sliced[key].dtype == value.dtype
            assert_close({key: sliced[key]}, {key: value})
    assert_close(out, expected)


def test_outputs_not_laid_out_by_frame_run_whole() -> None:
    """An output the wrapper cannot assemble (here a tuple) is recomputed by one upstream call over all frames."""
    calls = []

    def wrapped(x):
        calls.append(x.shape[0])
        return (x.sum(),)

    x = torch.zeros(40, 3, 2, 2)
    embed = torch.nn.Identity().eval()
    with torch.no_grad():
        out = chunked_patch_embed.patch_embed_forward(wrapped, embed, (x,), {})
    assert calls == [chunked_patch_embed.CHUNK_FRAMES, 40] and isinstance(out, tuple)
