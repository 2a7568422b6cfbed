"""Build the upstream VGGT that ``reconstruct`` runs: pretrained (Hugging Face or a local checkpoint) or random.

``--weights`` is read as a local path when one exists there (a ``.pt``/``.pth`` state_dict, a ``.safetensors``
file, or a folder written by upstream's ``save_pretrained``), otherwise as a Hugging Face id loaded by upstream's
own ``VGGT.from_pretrained``. ``--random-weights`` needs no download; its results are meaningless and are labelled
so everywhere (see ``reconstruct``).

``size="small"`` is the test-only toy model of ``random_model`` (56x56 images); it accepts random weights or a
state_dict file saved from that model, never a Hugging Face id (that model is full-size).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from .errors import UserError
from .random_model import Size, build_vggt

log = logging.getLogger(__name__)

DEFAULT_WEIGHTS = "facebook/VGGT-1B"
STATE_DICT_SUFFIXES = (".pt", ".pth", ".safetensors")
RANDOM_FOV_BIAS = 0.25  # radians of field of view per camera-head iteration (see _finite_random_cameras_)


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    source: str  # what the weights are, in words, for the summary and report.json


def load_model(weights: str | None, random_weights: bool, size: Size) -> LoadedModel:
    """The upstream VGGT in eval mode on the CPU, with the requested weights."""
    if random_weights:
        # No track head: reconstruct never queries tracks, and it would cost ~0.1 B random parameters.
        model = build_vggt(size, enable_track=False)
        _finite_random_cameras_(model)
        return LoadedModel(model, f"RANDOM WEIGHTS ({size} model)")
    weights = weights or DEFAULT_WEIGHTS
    path = Path(weights).expanduser()
    if path.is_file():
        return LoadedModel(_from_state_dict(path, size), str(path))
    if size != "full":
        kinds = "/".join(STATE_DICT_SUFFIXES)
        raise UserError(f"--model-size {size} takes --random-weights or a {kinds} file, not {weights!r}")
    if path.is_dir():
        return LoadedModel(_from_pretrained(str(path), f"folder {path}"), str(path))
    if path.suffix in STATE_DICT_SUFFIXES or weights.startswith((".", "~", os.sep)):
        raise UserError(f"weights file not found: {weights}")
    return LoadedModel(_from_pretrained(weights, f"Hugging Face id {weights!r}"), weights)


@torch.no_grad()
def _finite_random_cameras_(model: nn.Module) -> None:
    """Give every random camera the same plausible field of view, so that its focal length is finite.

    The camera head's last two outputs are the fields of view, passed through a ReLU after summing the head's
    refinement iterations. With random weights they are often negative, i.e. a field of view of 0 and an
    infinite focal length, which COLMAP (rightly) refuses. With those two output rows' weights zeroed and their
    bias set, every random camera sees ``RANDOM_FOV_BIAS`` per iteration (about 1 rad after upstream's four), and
    the export is exercised as with real weights.
    """
    fc2 = model.camera_head.pose_branch.fc2
    fc2.weight[-2:] = 0.0
    fc2.bias[-2:] = RANDOM_FOV_BIAS


def _from_pretrained(source: str, described: str) -> nn.Module:
    from vggt.models.vggt import VGGT

    log.info("loading VGGT.from_pretrained(%r)", source)
    try:
        return VGGT.from_pretrained(source).eval()
    except Exception as exc:  # huggingface_hub raises its own errors, OSError and HTTP errors for the same cause
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(
            f"could not load weights from {described} ({type(exc).__name__}: {first}); if the network is not "
            f"available, pass --weights PATH to a downloaded checkpoint (e.g. {DEFAULT_WEIGHTS}'s model.pt), "
            "or --random-weights to try the pipeline"
        ) from exc


def _from_state_dict(path: Path, size: Size) -> nn.Module:
    try:
        state = _read_state_dict(path)
    except Exception as exc:  # torch.load / safetensors raise many types for a corrupt or foreign file
        raise UserError(f"cannot read weights file {path}: {exc}") from exc
    # A checkpoint without the track head is fine: reconstruct does not use it.
    has_track = any(k.startswith("track_head.") for k in state)
    model = build_vggt(size, enable_track=has_track, randomize=False)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(
            f"{path} does not hold upstream VGGT weights ({size} model): {len(missing)} missing keys "
            f"(e.g. {missing[:2]}), {len(unexpected)} unexpected keys (e.g. {unexpected[:2]})"
        )
    return model


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    # Upstream's training saves {"model": state_dict, "optimizer": ...}; its released model.pt is the bare dict.
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"expected a state_dict, found {type(state).__name__}")
    return state
