"""single_key_attention: with one frame the camera head's trunk attends over a single key, whose softmax weight is
exactly 1, so the attention output is the value. The patch computes only that: no q, k or attention kernel;
outputs stay within fp32 rounding of upstream's; longer sequences, training and autograd run upstream."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import assert_close, assert_equal, count_calls, only, run

import vggt_turbo
from vggt_turbo.random_model import random_images


def _count_qkv_calls(model) -> list[int]:
    """Calls of the trunk blocks' qkv projections (the patch reads the value rows of their weight instead)."""
    calls = [0]
    for block in model.camera_head.trunk:
        block.attn.qkv.register_forward_hook(lambda m, a, o: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))])
def test_premise_attention_over_one_key_is_the_value(dtype, device) -> None:
    """torch's kernels return v for a single key: bit for bit on the CPU; on CUDA within the last bits in fp32
    (measured on an H100: its fp32 kernel does not compute exp(s - s) as exactly 1), bit for bit in bf16 and fp64."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 4, 1, 16, dtype=dtype, device=device) * 10 for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v)
    if device == "cuda" and dtype == torch.float32:
        torch.testing.assert_close(out, v, rtol=1e-6, atol=0)
    else:
        assert torch.equal(out, v)


def test_one_frame_within_fp32_rounding_without_queries_keys_or_kernel(model, monkeypatch) -> None:
    images = random_images(1)
    sdpa = count_calls(monkeypatch, F, "scaled_dot_product_attention")
    expected = run(model, images)
    upstream_sdpa = sdpa[0]
    vggt_turbo.apply_optimizations(model, only("single_key_attention"))
    qkv = _count_qkv_calls(model)
    sdpa[0] = 0
    got = run(model, images)
    assert_close(got, expected, tol=1e-6)
    assert qkv[0] == 0  # no block computed q and k
    assert upstream_sdpa - sdpa[0] == 4 * len(model.camera_head.trunk)  # 4 iterations: no trunk attention kernel


def test_two_frames_unchanged_bit_for_bit(model, images) -> None:
    expected = run(model, images)
    vggt_turbo.apply_optimizations(model, only("single_key_attention"))
    qkv = _count_qkv_calls(model)
    assert_equal(run(model, images), expected)
    assert qkv[0] == 4 * len(model.camera_head.trunk)  # upstream's path: attention over two keys


def test_training_and_autograd_run_upstream(model) -> None:
    vggt_turbo.apply_optimizations(model, only("single_key_attention"))
    qkv = _count_qkv_calls(model)
    attn = model.camera_head.trunk[0].attn
    x = torch.randn(2, 1, attn.qkv.in_features)
    attn(x)  # autograd on
    with torch.no_grad():
        attn.train()
        attn(x)
        attn.eval()
        assert qkv[0] == 2
        attn(x)
    assert qkv[0] == 2
