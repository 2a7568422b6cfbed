"""Upstream VGGT built with random weights, for tests, benchmarks and offline demos.

Real weights cannot be assumed (they are a 5 GB download); the exact patches must give upstream's outputs for
*any* weights, and speed does not depend on weight values. Two sizes:

  - ``"full"``: upstream's ``VGGT()`` as published (1.2 B parameters, DINOv2 ViT-L patch embed).
  - ``"small"``: the same upstream classes at toy width (64-d tokens, 4 heads, conv patch embed, all 24 layers so
    the heads read their usual layers 4/11/17/23), a few million parameters: CPU tests run in seconds.

``randomize_`` re-draws the parameters that upstream initialises near zero (layer scales at 0.01, camera and
register tokens at 1e-6): with those, every block is almost the identity and an equivalence test could not
tell a wrong patch from a right one.
"""

from __future__ import annotations

from typing import Literal, Union

import torch
from torch import nn

Size = Literal["full", "small"]
SMALL_IMAGE = 56  # 4 x 4 patches of 14 px


def build_vggt(size: Size = "small", seed: int = 0, enable_track: bool = True, randomize: bool = True) -> nn.Module:
    """A VGGT from upstream's own classes, random weights, in eval mode, on the CPU."""
    from vggt.models.vggt import VGGT

    torch.manual_seed(seed)
    if size == "full":
        model = VGGT(enable_track=enable_track)
    elif size == "small":
        model = _small_vggt(enable_track)
    else:
        raise ValueError(f"size must be 'full' or 'small', got {size!r}")
    if randomize:
        randomize_(model, seed)
    return model.eval()


def _small_vggt(enable_track: bool) -> nn.Module:
    from vggt.heads.camera_head import CameraHead
    from vggt.heads.dpt_head import DPTHead
    from vggt.heads.track_head import TrackHead
    from vggt.models.aggregator import Aggregator
    from vggt.models.vggt import VGGT

    dim = 64
    model = VGGT.__new__(VGGT)
    nn.Module.__init__(model)
    model.aggregator = Aggregator(img_size=SMALL_IMAGE, patch_size=14, embed_dim=dim, num_heads=4, patch_embed="conv")
    model.camera_head = CameraHead(dim_in=2 * dim, trunk_depth=2, num_heads=4)
    small = dict(dim_in=2 * dim, features=32, out_channels=[16, 32, 64, 64])
    model.point_head = DPTHead(output_dim=4, activation="inv_log", conf_activation="expp1", **small)
    model.depth_head = DPTHead(output_dim=2, activation="exp", conf_activation="expp1", **small)
    model.track_head = TrackHead(dim_in=2 * dim, features=32, hidden_size=64, corr_levels=3) if enable_track else None
    return model


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give near-zero-initialised parameters magnitudes that make every layer matter (see module docstring)."""
    generators: dict[torch.device, torch.Generator] = {}  # one per device: a model built on a GPU draws there

    def gen(device: torch.device) -> torch.Generator:
        if device not in generators:
            generators[device] = torch.Generator(device=device).manual_seed(seed)
        return generators[device]

    for name, param in model.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma":  # LayerScale
            fresh = torch.empty(param.shape, device=param.device)
            param.copy_(fresh.uniform_(0.2, 0.6, generator=gen(param.device)))
        elif leaf in ("camera_token", "register_token"):
            param.copy_(torch.randn(param.shape, generator=gen(param.device), device=param.device))
    return model


def random_images(frames: int, size: Union[int, tuple[int, int]] = SMALL_IMAGE, batch: int = 1,
                  seed: int = 0) -> torch.Tensor:
    """(batch, frames, 3, H, W) images in [0, 1]; ``size``: the side of square frames, or (H, W) for others
    (upstream's loader gives 518 wide and a height that keeps the aspect: 518x392 for 4:3 photos)."""
    height, width = (size, size) if isinstance(size, int) else size
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, frames, 3, height, width, generator=gen)
