"""dino_attention: the patch embed's (DINOv2) attention on FlashAttention-4 first, or on the backend sdpa forces.
On the CPU FlashAttention-4 refuses, so torch's default kernel runs on upstream's q, k, v and the embedding is
upstream's bit for bit; a forced backend agrees to fp32 rounding; training, the nested-tensor arguments and the
explicit-softmax path run upstream; on CUDA with the package, FlashAttention-4 runs within bf16 rounding."""

from __future__ import annotations

import pytest
import torch

from helpers import NO_FLAGS, assert_close, only

import vggt_turbo
from vggt_turbo.kernels import flash_attention_4 as fa4
from vggt_turbo.kernels.attention import AttentionPolicy
from vggt_turbo.patches.patch_embed import dino_attention as patch
from vggt_turbo.random_model import random_images

SIZE = 28


@pytest.fixture
def agg():
    """A small Aggregator with a DINOv2 patch embed (ViT-S, the full model's block classes)."""
    from vggt.models.aggregator import Aggregator

    torch.manual_seed(0)
    return Aggregator(img_size=SIZE, patch_size=14, embed_dim=384, depth=2, num_heads=6,
                      patch_embed="dinov2_vits14_reg").eval()


def _embed(agg, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return agg.patch_embed(x)["x_norm_patchtokens"]


def _counting(monkeypatch) -> list[tuple[str, ...]]:
    """The candidates of the policy of each attention call."""
    names: list[tuple[str, ...]] = []
    real = AttentionPolicy.attend

    def counted(policy, q, k, v):
        names.append(policy.names)
        return real(policy, q, k, v)

    monkeypatch.setattr(AttentionPolicy, "attend", counted)
    return names


def _targets(agg, config) -> list[str]:
    vggt_turbo.apply_optimizations(agg, config)
    try:
        return vggt_turbo.describe(agg).targets.get("dino_attention", [])
    finally:
        vggt_turbo.revert_optimizations(agg)


def test_targets_every_dino_block_and_picks_the_kernel(agg) -> None:
    blocks = len(agg.patch_embed.blocks)
    assert _targets(agg, only("dino_attention")) == [f"patch_embed.blocks.{i}.attn.forward" for i in range(blocks)]
    assert _targets(agg, NO_FLAGS) == []
    fa4_first = ("fa4", "auto")
    assert patch.policy(only("dino_attention")).names == fa4_first  # whether flash_attention_4 is on or not
    assert patch.policy(only("dino_attention", sdpa=True)).names == fa4_first  # sdpa on "auto"
    forced = patch.policy(only("dino_attention", sdpa=True, sdpa_backend="math"))  # a forced backend
    assert forced.names == ("math",) and forced.forced


def test_cpu_embedding_equals_upstream_bit_for_bit(agg, monkeypatch) -> None:
    x = random_images(2, size=SIZE, seed=3)[0]
    expected = _embed(agg, x)
    names = _counting(monkeypatch)
    vggt_turbo.apply_optimizations(agg, only("dino_attention"))
    got = _embed(agg, x)
    assert names == [("fa4", "auto")] * len(agg.patch_embed.blocks)  # every block took the patched path
    assert torch.equal(got, expected)


def test_forced_backend_within_fp32_rounding(agg, monkeypatch) -> None:
    x = random_images(2, size=SIZE, seed=4)[0]
    expected = _embed(agg, x)
    names = _counting(monkeypatch)
    vggt_turbo.apply_optimizations(agg, only("dino_attention", sdpa=True, sdpa_backend="math"))
    got = _embed(agg, x)
    assert names == [("math",)] * len(agg.patch_embed.blocks)
    assert_close({"x": got}, {"x": expected}, tol=1e-5)


def test_training_autograd_and_nested_arguments_run_upstream(agg, monkeypatch) -> None:
    names = _counting(monkeypatch)
    vggt_turbo.apply_optimizations(agg, only("dino_attention"))
    attn = agg.patch_embed.blocks[0].attn
    x = torch.randn(2, 9, 384)
    attn.train()
    attn(x)
    attn.eval()
    assert names == []
    with pytest.raises(AssertionError, match="xFormers"):  # upstream's own refusal of an attention bias
        attn(x, attn_bias=torch.zeros(1))
    attn.fused_attn = False  # upstream's explicit-softmax path: its own arithmetic, not SDPA
    with torch.no_grad():
        got = attn(x)
    assert names == [] and torch.equal(got, type(attn).forward(attn, x))


@pytest.mark.skipif(not (torch.cuda.is_available() and fa4.is_installed()), reason="needs CUDA and flash-attn-4")
def test_cuda_runs_flash_attention_4_within_bf16_rounding(agg, monkeypatch) -> None:
    agg = agg.cuda()
    x = random_images(2, size=SIZE, seed=5)[0].cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        expected = _embed(agg, x).float()
        calls = []
        real = fa4.attention
        monkeypatch.setattr(fa4, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
        vggt_turbo.apply_optimizations(agg, only("dino_attention"))
        got = _embed(agg, x).float()
    assert len(calls) == len(agg.patch_embed.blocks)
    assert_close({"x": got}, {"x": expected}, tol=2e-2)
