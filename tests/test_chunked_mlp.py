"""``chunked_mlp``: the MLP residual added slice by slice gives upstream's outputs; the slices really happen."""

from __future__ import annotations

import pytest
import torch

from helpers import assert_close, only, run

import vggt_turbo
from vggt_turbo.patches import _token_slices


@pytest.fixture
def small_chunks(monkeypatch):
    """7 tokens per slice: the small model's sequences (2 frames x 21 tokens) are sliced unevenly."""
    monkeypatch.setattr(_token_slices, "CHUNK_TOKENS", 7)


def test_sliced_mlp_gives_upstream_outputs(model, images, query_points, reference, small_chunks) -> None:
    calls = []
    model.aggregator.global_blocks[0].mlp.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    vggt_turbo.apply_optimizations(model, only("chunked_mlp"))
    assert_close(run(model, images, query_points), reference)
    assert calls == [7] * 6  # 42 tokens in 6 slices of 7


def test_with_the_exact_preset_and_bf16_autocast(model, pristine, images, query_points, small_chunks) -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        unsliced = run(model, images, query_points)
        vggt_turbo.apply_optimizations(model, "exact", chunked_mlp=False)
        expected = run(model, images, query_points)
        vggt_turbo.apply_optimizations(model, "exact")
        sliced = run(model, images, query_points)
    assert_close(sliced, expected, tol=1e-2)  # bf16: slices may round their matmuls differently
    assert unsliced.keys() == sliced.keys()


def test_short_sequences_and_autograd_run_upstream(model, images, small_chunks, monkeypatch) -> None:
    monkeypatch.setattr(_token_slices, "CHUNK_TOKENS", 1000)
    calls = []
    model.aggregator.frame_blocks[0].mlp.register_forward_hook(lambda m, a, o: calls.append(a[0].shape))
    vggt_turbo.apply_optimizations(model, only("chunked_mlp"))
    run(model, images)
    monkeypatch.setattr(_token_slices, "CHUNK_TOKENS", 7)
    model(images)  # autograd on
    assert calls == [torch.Size([2, 21, 64])] * 2
