"""The exact patches give upstream's outputs; ``global_to_frame_layers`` gives what it says (frame attention in
the listed global layers), checked against an independent reference built from upstream's own blocks.

Tolerance: relative error ‖a − b‖ / ‖b‖ < 1e-5 per output (fp32 on the CPU), on every prediction including the
track head's (the small model gets query points).
"""

from __future__ import annotations

import copy
from typing import Optional

import pytest
import torch
from torch import nn

from helpers import BOOL_FLAGS, NO_FLAGS, assert_close, errors, only, run

import vggt_turbo
from vggt_turbo import TurboConfig
from vggt_turbo.random_model import random_images

EXACT_CONFIGS = {
    **{f"{flag}-alone": only(flag) for flag in BOOL_FLAGS},
    "exact": TurboConfig.preset("exact"),
    "exact+nvtx": TurboConfig.preset("exact").replace(nvtx=True),
    "sdpa-math": only("sdpa", sdpa_backend="math"),
    "sdpa-flash": only("sdpa", sdpa_backend="flash"),  # the CPU has a flash kernel; efficient and cudnn it lacks
}
# The full-size model is slow on the CPU: each patch alone, then all together.
FULL_SIZE_CONFIGS = {k: v for k, v in EXACT_CONFIGS.items() if k.endswith("-alone") or k == "exact+nvtx"}


@pytest.mark.parametrize("config", EXACT_CONFIGS.values(), ids=EXACT_CONFIGS.keys())
def test_exact_config_gives_upstream_outputs(model, images, query_points, reference, config: TurboConfig) -> None:
    vggt_turbo.apply_optimizations(model, config)
    out = run(model, images, query_points)
    assert {"track", "vis", "conf", "depth", "pose_enc"} <= out.keys()
    assert_close(out, reference)


def test_exact_preset_on_a_batch_of_non_square_sequences(model) -> None:
    """B > 1, S = 3, H != W: the frame/global reshapes and the RoPE table see a less regular layout."""
    images = random_images(3, batch=2, seed=1)[..., :42]  # 56 x 42
    query_points = torch.tensor([[[5.0, 7.0], [40.0, 20.0]], [[11.0, 50.0], [30.0, 30.0]]])
    expected = run(model, images, query_points)
    vggt_turbo.apply_optimizations(model)
    assert_close(run(model, images, query_points), expected)


def test_single_frame(model, query_points) -> None:
    images = random_images(1, seed=2)
    expected = run(model, images, query_points)
    vggt_turbo.apply_optimizations(model)
    assert_close(run(model, images, query_points), expected)


@pytest.fixture(scope="module")
def full_reference(full_model, full_images) -> dict[str, torch.Tensor]:
    """Upstream's predictions of the full-size model (no track head) for ``full_images``."""
    return run(full_model, full_images)


@pytest.mark.slow
@pytest.mark.parametrize("config", FULL_SIZE_CONFIGS.values(), ids=FULL_SIZE_CONFIGS.keys())
def test_full_size_model_gives_upstream_outputs(full_model, full_images, full_reference, config: TurboConfig) -> None:
    """Upstream's real architecture (DINOv2 patch embed, 1024-d, 16 heads), patched in place and reverted."""
    try:
        vggt_turbo.apply_optimizations(full_model, config)
        out = run(full_model, full_images)
    finally:
        vggt_turbo.revert_optimizations(full_model)
    assert set(out) == {"depth", "depth_conf", "world_points", "world_points_conf", "pose_enc"}
    assert_close(out, full_reference)


class FrameAttention(nn.Module):
    """Runs an upstream global block as frame attention: (B, S*P, C) tokens and positions are reshaped to
    (B*S, P, C), the block runs unchanged, and its output is reshaped back. Written independently of
    ``vggt_turbo`` so that the swap is checked against upstream code only."""

    def __init__(self, block: nn.Module, frames: int) -> None:
        super().__init__()
        self.block = block
        self.frames = frames

    def forward(self, x: torch.Tensor, pos: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, C = x.shape
        S, P = self.frames, N // self.frames
        pos = pos.reshape(B * S, P, 2) if pos is not None else None
        return self.block(x.reshape(B * S, P, C), pos=pos).reshape(B, N, C)


def frame_attention_reference(pristine: nn.Module, layers: tuple[int, ...], frames: int) -> nn.Module:
    """A copy of the upstream model whose global blocks ``layers`` are wrapped in ``FrameAttention``."""
    ref = copy.deepcopy(pristine)
    for i in layers:
        ref.aggregator.global_blocks[i] = FrameAttention(ref.aggregator.global_blocks[i], frames)
    return ref


LAYER_CONFIGS = {
    "fast-layers": TurboConfig.preset("fast").replace(kv_subsample=1),  # fast's K/V subsampling: test_kv_subsample
    "scattered-alone": NO_FLAGS.replace(global_to_frame_layers=(1, 7, 23)),
}


@pytest.mark.parametrize("config", LAYER_CONFIGS.values(), ids=LAYER_CONFIGS.keys())
def test_global_to_frame_layers_equal_frame_attention_reference(
    pristine, model, images, query_points, reference, config: TurboConfig
) -> None:
    frames = images.shape[1]
    expected = run(frame_attention_reference(pristine, config.global_to_frame_layers, frames), images, query_points)
    vggt_turbo.apply_optimizations(model, config)
    out = run(model, images, query_points)
    assert_close(out, expected)
    from_upstream = errors(out, reference)  # small on outputs fed mostly by the images (track: ~1e-5)
    assert from_upstream["pose_enc"] > 1e-4 and max(from_upstream.values()) > 1e-3, from_upstream


def test_global_to_frame_layers_exact_for_one_frame(model, query_points) -> None:
    """With S = 1 a global layer already attends within the one frame: the swap changes nothing."""
    images = random_images(1, seed=3)
    expected = run(model, images, query_points)
    vggt_turbo.apply_optimizations(model, "fast", kv_subsample=1)
    assert_close(run(model, images, query_points), expected)
