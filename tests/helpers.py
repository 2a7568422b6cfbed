"""Helpers shared by the tests: running a model, comparing its outputs, snapshotting instance state.

Kept out of conftest.py so that test modules can import them by name (``from helpers import ...``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import pytest
import torch
from torch import nn

from vggt_turbo import TurboConfig
from vggt_turbo.config import AUTO_FLAGS
from vggt_turbo.patches import flag_requirements
from vggt_turbo.kernels import triton_installed

# Kernel tests: in Triton's interpreter (on the CPU), or on CUDA.
needs_interpreter = pytest.mark.skipif(
    not (triton_installed() and os.environ.get("TRITON_INTERPRET") == "1"),
    reason="needs triton importable and TRITON_INTERPRET=1",
)
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_cuda_triton = pytest.mark.skipif(not (torch.cuda.is_available() and triton_installed()), reason="needs CUDA and triton")

# The predictions an equivalence test compares (``images`` is the input echoed back; ``pose_enc_list`` ends in
# ``pose_enc``). ``track``, ``vis`` and ``conf`` exist only when the model has a track head and gets query points.
OUTPUT_KEYS = ("depth", "depth_conf", "world_points", "world_points_conf", "pose_enc", "track", "vis", "conf")
# The switches: boolean fields and those that also take "auto" (AUTO_FLAGS; True/False here, "auto" tested apart)
BOOL_FLAGS = tuple(f.name for f in dataclasses.fields(TurboConfig) if f.type in ("bool", bool) or f.name in AUTO_FLAGS)
NO_FLAGS = TurboConfig(**{name: False for name in BOOL_FLAGS})  # every boolean flag off, no approximation


def only(flag: str, **extra: Any) -> TurboConfig:
    """A config with every boolean flag False except ``flag`` (and the flags it cannot work without, if any):
    that patch alone."""
    return NO_FLAGS.replace(**{flag: True}, **{need: True for need in flag_requirements().get(flag, ())}, **extra)


def count_calls(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[int]:
    """Replace ``owner.name`` by a wrapper that counts its calls (``calls[0]``) and calls the original."""
    calls = [0]
    real = getattr(owner, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return calls


def run(model: nn.Module, images: torch.Tensor, query_points: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
    """The model's predictions (those in ``OUTPUT_KEYS``), computed without autograd."""
    with torch.no_grad():
        out = model(images, query_points=query_points)
    return {k: out[k] for k in OUTPUT_KEYS if k in out}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖ in float64 (0 when both are zero)."""
    a, b = a.double(), b.double()
    denom = b.norm().item()
    return (a - b).norm().item() / denom if denom else (a - b).norm().item()


def errors(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per-output relative error of ``out`` against ``ref``; both must hold the same outputs."""
    assert out.keys() == ref.keys(), f"outputs differ: {sorted(out)} vs {sorted(ref)}"
    return {k: rel_err(out[k], ref[k]) for k in ref}


def assert_close(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], tol: float = 1e-5) -> None:
    """Every output within relative error ``tol`` of the reference (and finite, so NaN cannot pass)."""
    errs = errors(out, ref)
    assert all(torch.isfinite(v).all() for v in out.values()), "non-finite outputs"
    assert max(errs.values()) < tol, f"relative errors above {tol}: {errs}"


def assert_equal(out: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> None:
    """Bit-identical outputs."""
    assert out.keys() == ref.keys()
    differing = [k for k in ref if not torch.equal(out[k], ref[k])]
    assert not differing, f"outputs not bit-identical: {differing}"


Snapshot = dict[str, dict[str, Any]]


def layer_outputs(outputs: list[Optional[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """An aggregator's output list as ``{layer index: tokens}``, without the layers it does not keep (None)."""
    return {str(i): tokens for i, tokens in enumerate(outputs) if tokens is not None}


def snapshot(model: nn.Module) -> Snapshot:
    """Every submodule's instance attributes (a shallow copy of ``vars``), to detect any attribute set or removed."""
    return {name: dict(vars(module)) for name, module in model.named_modules()}


def assert_unchanged(model: nn.Module, before: Snapshot) -> None:
    """Same attribute names on every submodule, each bound to the very same object as in ``before``."""
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, attrs in before.items():
        added_or_removed = set(after[name]) ^ set(attrs)
        assert not added_or_removed, f"{name or '<root>'}: attributes {added_or_removed} added or removed"
        changed = [k for k, v in attrs.items() if after[name][k] is not v]
        assert not changed, f"{name or '<root>'}: attributes {changed} rebound"


def class_dicts(model: nn.Module) -> dict[type, dict[str, Any]]:
    """A copy of the ``__dict__`` of every class in the MRO of every submodule's type."""
    return {cls: dict(vars(cls)) for module in model.modules() for cls in type(module).__mro__}


def patched_methods(model: nn.Module) -> dict[str, Any]:
    """Instance attributes that shadow a method of their module's class (what a per-instance patch installs),
    by path, e.g. ``{"aggregator._process_frame_attention": <wrapper>}``."""
    return {
        f"{name}.{attr}" if name else attr: value
        for name, module in model.named_modules()
        for attr, value in vars(module).items()
        if callable(getattr(type(module), attr, None))
    }


def assert_same_objects(now: dict[str, Any], before: dict[str, Any]) -> None:
    """The same paths bound to the very same objects (e.g. the wrappers a no-op apply must leave in place)."""
    assert now.keys() == before.keys()
    assert all(now[k] is v for k, v in before.items())
