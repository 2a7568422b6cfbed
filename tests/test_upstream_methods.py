"""``upstream.Method``: one declaration per upstream method whose arguments a patch reads gives both the requirement
checked before patching and the binder the patch's wrapper names its arguments with. Every declaration is checked
against the installed upstream, parameter names and defaults."""

from __future__ import annotations

import inspect

import pytest
import torch
from torch import nn

from vggt_turbo import IncompatibleUpstreamError, upstream
from vggt_turbo.upstream import CAMERA_HEAD_FORWARD, DPT_FORWARD_IMPL, Method

DECLARED = {name: value for name, value in vars(upstream).items() if isinstance(value, Method)}


class CameraHeadRenamed(nn.Module):
    """A camera head whose upstream renamed ``num_iterations``."""

    def forward(self, aggregated_tokens_list: list, iterations: int = 4) -> list:
        return aggregated_tokens_list


class CameraHeadRedefaulted(nn.Module):
    """A camera head whose upstream changed ``num_iterations``' default."""

    def forward(self, aggregated_tokens_list: list, num_iterations: int = 8) -> list:
        return aggregated_tokens_list


def test_binder_maps_positional_keyword_and_defaulted_arguments() -> None:
    tokens = [torch.zeros(1)]
    assert CAMERA_HEAD_FORWARD.bind(tokens, 2) == (tokens, 2)
    assert CAMERA_HEAD_FORWARD.bind(num_iterations=3, aggregated_tokens_list=tokens) == (tokens, 3)
    assert CAMERA_HEAD_FORWARD.bind(tokens) == (tokens, 4)
    assert DPT_FORWARD_IMPL.bind(tokens, "images", 5, frames_end_idx=8) == (tokens, "images", 5, None, 8)
    assert upstream.AGGREGATOR_FORWARD.bind(images="images") == ("images",)


def test_binder_refuses_a_call_upstream_would_refuse() -> None:
    with pytest.raises(TypeError, match=r"CameraHead\.forward\(\) got an unexpected keyword argument 'iterations'"):
        CAMERA_HEAD_FORWARD.bind([], iterations=2)
    with pytest.raises(TypeError, match=r"Aggregator\.forward\(\) missing 1 required positional argument: 'images'"):
        upstream.AGGREGATOR_FORWARD.bind()


def test_a_default_for_no_parameter_is_refused() -> None:
    with pytest.raises(ValueError, match=r"Block\.forward has no parameters \['pos'\] to default"):
        Method("Block", "forward", upstream.first_block, ("x",), {"pos": None})


@pytest.fixture(scope="module")
def dino_aggregator() -> nn.Module:
    """A small Aggregator with a DINOv2 patch embed (the small VGGT's is a convolution)."""
    from vggt.models.aggregator import Aggregator

    torch.manual_seed(0)
    return Aggregator(img_size=28, patch_size=14, embed_dim=384, depth=2, num_heads=6, patch_embed="dinov2_vits14_reg")


def test_every_declaration_matches_the_installed_upstream(pristine, dino_aggregator) -> None:
    """Every declaration passes ``check`` on the installed upstream (names and defaults)."""
    found = set()
    for root in (pristine, dino_aggregator):
        for name, method in DECLARED.items():
            target = method.locate(root)
            if target is None:
                continue
            method.requirement.check(root, name)
            parameters = inspect.signature(getattr(target, method.name)).parameters
            upstream_defaults = {p: v.default for p, v in parameters.items() if v.default is not inspect.Parameter.empty}
            assert upstream_defaults == dict(method.defaults), name  # what check compared, read independently
            found.add(name)
    assert DECLARED and found == set(DECLARED)


@pytest.mark.parametrize("head, differs", [
    (CameraHeadRenamed, "takes (aggregated_tokens_list, iterations)"),
    (CameraHeadRedefaulted, "has {'num_iterations': 8}"),
])
def test_requirement_refuses_a_renamed_parameter_or_a_changed_default(head: type, differs: str) -> None:
    """A rename breaks the binder's names; a changed default would have the binder hand the patch another value
    than upstream's own call gets: both are refused, naming what differs."""
    requirement = CAMERA_HEAD_FORWARD.requirement_at(lambda root: root)
    with pytest.raises(IncompatibleUpstreamError) as raised:
        requirement.check(head(), "some_patch")
    expected = ("patch 'some_patch' needs upstream CameraHead.forward(aggregated_tokens_list, num_iterations)"
                + (" with defaults {'num_iterations': 4}" if head is CameraHeadRedefaulted else "")
                + f", but the installed {__name__}.{head.__name__}.forward {differs}")
    assert str(raised.value) == expected
