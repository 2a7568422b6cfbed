"""Fixtures: upstream VGGT models with random weights (see ``vggt_turbo.random_model``) and small inputs.

Models are built once per session and every test gets a deep copy of the small one, so that a test patching or
breaking its model cannot leak into another; a copy costs milliseconds, a build most of a second.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))  # make helpers.py importable whatever pytest's import mode

from helpers import run  # noqa: E402

from vggt_turbo.random_model import build_vggt, random_images, randomize_  # noqa: E402

FRAMES = 2  # the smallest count where global attention differs from frame attention


def pytest_configure(config: pytest.Config) -> None:
    # Upstream's VGGT.forward uses the deprecated torch.cuda.amp.autocast in every call: not ours to fix.
    config.addinivalue_line("filterwarnings", "ignore:`torch.cuda.amp.autocast:FutureWarning")


@pytest.fixture(scope="session")
def pristine() -> nn.Module:
    """The small upstream VGGT (track head included), never patched: copy it, don't modify it."""
    return build_vggt("small")


@pytest.fixture
def model(pristine: nn.Module) -> nn.Module:
    """A private copy of the small model, free to patch. Upstream's ``PositionGetter`` caches positions per grid
    size but not per device, and ``.cuda()`` does not move that cache: the copy starts with an empty one, so that
    a GPU test gets GPU positions even after ``pristine`` ran on the CPU."""
    copied = copy.deepcopy(pristine)
    for module in copied.modules():  # PositionGetter is a plain object held by the aggregator, not a module
        getter = getattr(module, "position_getter", None)
        if isinstance(getattr(getter, "position_cache", None), dict):
            getter.position_cache.clear()
    return copied


@pytest.fixture(scope="session")
def images() -> torch.Tensor:
    """(1, FRAMES, 3, 56, 56) images for the small model (4 x 4 patches per frame)."""
    return random_images(FRAMES)


@pytest.fixture(scope="session")
def query_points() -> torch.Tensor:
    """(1, 3, 2) pixel coordinates, so that the track head runs and its outputs are compared too."""
    return torch.tensor([[[8.0, 12.0], [30.0, 41.0], [50.0, 5.0]]])


@pytest.fixture(scope="session")
def reference(pristine: nn.Module, images: torch.Tensor, query_points: torch.Tensor) -> dict[str, torch.Tensor]:
    """Upstream's predictions for ``images`` and ``query_points``: what the exact patches must reproduce."""
    return run(pristine, images, query_points)


@pytest.fixture(scope="session")
def full_model() -> nn.Module:
    """Upstream's full-size VGGT (1.2 B parameters, DINOv2 ViT-L patch embed), random weights, no track head.

    Too slow for more than one forward per config, so it is only used on tiny images (``full_images``).
    """
    return build_vggt("full", enable_track=False)


@pytest.fixture(scope="session")
def full_images() -> torch.Tensor:
    """(1, FRAMES, 3, 28, 28) images: 2 x 2 patches per frame keep the full-size model fast on the CPU."""
    return random_images(FRAMES, size=28)


@pytest.fixture(scope="session", params=["small", pytest.param("full", marks=pytest.mark.slow)])
def dino_model(request: pytest.FixtureRequest) -> nn.Module:
    """A VGGT whose patch embed is upstream's DINOv2 (``model.aggregator.patch_embed``), for the patches that reach
    into it; the small VGGT's own patch embed is a convolution. ``"small"`` (the default suite): the small VGGT with
    a 2-block ViT-S DINOv2 aggregator (the full model's block classes; only the patch embed runs, the heads do not
    fit it); ``"full"`` (marked slow): ``full_model``, upstream's ViT-L. Patch it and revert."""
    if request.param == "full":
        return request.getfixturevalue("full_model")
    from vggt.models.aggregator import Aggregator

    model = build_vggt("small", enable_track=False)
    torch.manual_seed(0)
    model.aggregator = Aggregator(img_size=28, patch_size=14, embed_dim=384, depth=2, num_heads=6,
                                  patch_embed="dinov2_vits14_reg")
    return randomize_(model).eval()
