"""patch_embed_matmul: the patch projection as one matrix product over the image's patches gives upstream's tokens
within the dtype's rounding (the small model's "conv" patch embed and the full model's DINOv2 one), without running
the convolution, on CUDA; the CPU, and calls it does not cover, run upstream's forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_equal, count_calls, needs_cuda, only, run

import vggt_turbo
from vggt_turbo.patches.patch_embed import patch_embed_matmul as patch


def test_product_equals_the_convolution_within_fp32_rounding() -> None:
    """Rows are patches in raster order, values in the weight's (channel, row, column) order; a non-square image;
    a non-flattened embedding keeps upstream's (B, h, w, C) shape."""
    for flatten in (True, False):
        embed = _embed(flatten)
        x = torch.randn(2, 3, 28, 42)
        with torch.no_grad():
            expected = embed(x)
            got = patch.project(embed, x)
        assert got.shape == expected.shape == ((2, 6, 8) if flatten else (2, 2, 3, 8))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_dino_tokens_within_fp32_rounding(dino_model) -> None:
    """A DINOv2 patch embed (``dino_model``: ViT-S, or the full model's ViT-L; its PatchEmbed sits inside the ViT)
    with the product in place of the convolution, on a batch of two images, through the ViT's own forward."""
    embed = dino_model.aggregator.patch_embed
    images = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        expected = embed(images)
        inner = embed.patch_embed
        inner.forward = lambda x: patch.project(inner, x)
        try:
            got = embed(images)
        finally:
            del inner.forward
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-5)


def test_targets_the_patch_embed_of_either_kind(model, dino_model) -> None:
    vggt_turbo.apply_optimizations(model, only("patch_embed_matmul"))
    assert vggt_turbo.describe(model).targets["patch_embed_matmul"] == ["aggregator.patch_embed.forward"]
    vggt_turbo.apply_optimizations(dino_model, only("patch_embed_matmul"))
    try:
        assert vggt_turbo.describe(dino_model).targets["patch_embed_matmul"] == ["aggregator.patch_embed.patch_embed.forward"]
    finally:
        vggt_turbo.revert_optimizations(dino_model)


def test_cpu_keeps_upstreams_convolution_bit_for_bit(model, images, query_points, monkeypatch) -> None:
    expected = run(model, images, query_points)
    vggt_turbo.apply_optimizations(model, only("patch_embed_matmul"))
    convs = count_calls(monkeypatch, F, "conv2d")
    with torch.no_grad():
        model.aggregator.patch_embed(images[0])
    assert convs[0] == 1
    assert_equal(run(model, images, query_points), expected)


def test_upstream_runs_where_not_covered() -> None:
    embed = _embed()
    x = torch.randn(1, 3, 28, 28)
    called = []

    def wrapped(*args, **kwargs):
        called.append(args)
        return embed.forward(*args, **kwargs)

    assert patch._covered(embed.proj, x)
    patch.patch_embed_forward(wrapped, embed, (x,), {})  # autograd on (and the CPU)
    with torch.no_grad():
        with pytest.raises(AssertionError, match="multiple of patch"):
            patch.patch_embed_forward(wrapped, embed, (torch.randn(1, 3, 30, 28),), {})  # upstream's own refusal
    assert len(called) == 2
    overlapping = _embed()
    overlapping.proj.stride = (7, 7)
    assert not patch._covered(overlapping.proj, x)
    assert not patch._covered(embed.proj, torch.randn(1, 4, 28, 28))


@needs_cuda
def test_gpu_model_within_bf16_rounding_without_the_convolution(model, images, query_points, monkeypatch) -> None:
    """Under bf16 autocast, as upstream runs; in fp32 (cuDNN's convolution in TF32) upstream's forward runs."""
    model, images, query_points = model.cuda(), images.cuda(), query_points.cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = run(model, images, query_points)
    fp32 = run(model, images, query_points)
    vggt_turbo.apply_optimizations(model, only("patch_embed_matmul"))
    convs = count_calls(monkeypatch, F, "conv2d")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        model.aggregator.patch_embed(images[0])
    assert convs[0] == 0
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert_close(run(model, images, query_points), expected, tol=2e-2)
    assert_equal(run(model, images, query_points), fp32)


@needs_cuda
def test_gpu_bf16_within_rounding(model, images) -> None:
    """In bf16 (the ``exact`` preset's aggregator) the products' fp32 sums run in another order than cuDNN's."""
    embed = model.aggregator.patch_embed.cuda().to(torch.bfloat16)
    x = images[0].cuda().to(torch.bfloat16)
    with torch.no_grad():
        expected = embed(x)
        got = patch.project(embed, x)
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-7, atol=1e-2)


def _embed(flatten: bool = True):
    from vggt.layers.patch_embed import PatchEmbed

    torch.manual_seed(0)
    return PatchEmbed(img_size=28, patch_size=14, in_chans=3, embed_dim=8, flatten_embedding=flatten).eval()
