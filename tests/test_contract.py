"""The contract with upstream: what each patch needs is present in the installed upstream, and an upstream that
lacks it is refused with ``IncompatibleUpstreamError`` naming the symbol, before anything is patched.

Incompatible upstreams are simulated by switching one instance's class to a subclass with a changed signature
or without a method; the upstream classes themselves are never touched.
"""

from __future__ import annotations

from typing import Optional

import pytest
import torch
from torch import nn

from helpers import NO_FLAGS, assert_close, assert_unchanged, run, snapshot

import vggt_turbo
from vggt_turbo import IncompatibleUpstreamError, describe, upstream
from vggt_turbo.patches import ALL_PATCHES


def test_installed_upstream_meets_every_requirement(model) -> None:
    for root in (model, model.aggregator):
        upstream.check(root, {p.name: p.requirements for p in ALL_PATCHES})
    assert all(p.requirements for p in ALL_PATCHES)


def _subclass(instance: nn.Module, name: str, **members) -> None:
    """Give ``instance`` (alone) a subclass of its class overriding ``members``."""
    instance.__class__ = type(name, (type(instance),), members)


def attention_with_attn_bias(module: nn.Module) -> None:
    """upstream's MemEffAttention-style forward: ``(x, attn_bias=None, pos=None)``."""

    def forward(self, x: torch.Tensor, attn_bias: Optional[torch.Tensor] = None, pos: Optional[torch.Tensor] = None):
        return super(type(self), self).forward(x, pos=pos)

    _subclass(module.aggregator.frame_blocks[0].attn, "AttentionWithBias", forward=forward)


def aggregator_with_renamed_step(module: nn.Module) -> None:
    """``_process_frame_attention`` whose index parameter has another name."""

    def _process_frame_attention(self, tokens, B, S, P, C, idx, pos=None):
        return super(type(self), self)._process_frame_attention(tokens, B, S, P, C, idx, pos)

    _subclass(module.aggregator, "AggregatorRenamed", _process_frame_attention=_process_frame_attention)


def rope_without_table(module: nn.Module) -> None:
    """A RoPE computing its tables some other way: no ``_compute_frequency_components``."""

    class RopeWithoutTable(nn.Module):
        def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            return tokens

    module.aggregator.rope.__class__ = RopeWithoutTable


def rope_with_renamed_forward(module: nn.Module) -> None:
    _subclass(module.aggregator.rope, "RopeRenamed", forward=lambda self, x, pos: x)


INCOMPATIBLE = {
    "attention-forward": (attention_with_attn_bias, "sdpa", "Attention.forward(x, pos)"),
    "frame-step": (aggregator_with_renamed_step, "fused_frame_batching", "Aggregator._process_frame_attention("),
    "rope-table": (rope_without_table, "sync_free_rope", "RotaryPositionEmbedding2D._compute_frequency_components("),
    "rope-forward": (
        rope_with_renamed_forward,
        "sync_free_rope",
        "RotaryPositionEmbedding2D.forward(tokens, positions)",
    ),
}


@pytest.mark.parametrize(("break_upstream", "flag", "symbol"), INCOMPATIBLE.values(), ids=INCOMPATIBLE.keys())
def test_incompatible_upstream_refused_and_model_untouched(model, break_upstream, flag: str, symbol: str) -> None:
    break_upstream(model)
    before = snapshot(model)
    for root in (model, model.aggregator):
        with pytest.raises(IncompatibleUpstreamError) as raised:
            vggt_turbo.apply_optimizations(root, NO_FLAGS.replace(**{flag: True}))
        assert symbol in str(raised.value) and repr(flag) in str(raised.value)
        assert_unchanged(model, before)
    assert describe(model).config is None and issubclass(IncompatibleUpstreamError, RuntimeError)


def test_requirements_of_disabled_patches_are_not_checked(model) -> None:
    rope_without_table(model)
    vggt_turbo.apply_optimizations(model, "exact", sync_free_rope=False, cuda_graphs=False, fused_qk_norm_rope=False)
    assert "sync_free_rope" not in describe(model).targets and "cached_positions" in describe(model).targets


def test_older_upstream_layout_keeping_every_intermediate(model, images, query_points) -> None:
    """Upstream before 2025-11 (e.g. 44b3afbd) keeps all 24 intermediates instead of the four the heads read."""
    model.aggregator.cached_layer_indices = set(range(24))
    expected = run(model, images, query_points)
    vggt_turbo.apply_optimizations(model, "exact", nvtx=True)
    assert_close(run(model, images, query_points), expected)
    with torch.no_grad():
        outputs, _ = model.aggregator(images)
    assert all(o is not None for o in outputs) and len(outputs) == 24
