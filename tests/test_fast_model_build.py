"""The model is ready in the time it takes to read the weights (issue #20 item 2).

A checkpoint is assigned to the meta-device skeleton (no random initialisation first) from a memory map of the
file; random weights are initialised by upstream's constructor on the target device. These tests hold both to
what the slow path gave: the same tensors, the same random model on the CPU, no parameter left on meta.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vggt_turbo.app import weights
from vggt_turbo.app.errors import UserError
from vggt_turbo.random_model import build_vggt


def test_mapped_safetensors_equal_safetensors_own_reader_for_every_dtype_and_alignment(tmp_path: Path) -> None:
    tensors = {
        "a_odd_bf16": torch.randn(3, dtype=torch.bfloat16),  # 6 bytes: what follows is not 4-byte aligned
        "b_f32": torch.randn(5, 7),
        "c_scalar": torch.tensor(2.5, dtype=torch.float64),
        "d_empty": torch.zeros(0, 4),
        "e_int": torch.arange(9, dtype=torch.int64).reshape(3, 3),
        "f_u8": torch.arange(5, dtype=torch.uint8),
        "g_half": torch.randn(2, 3, dtype=torch.float16),
    }
    save_file(tensors, str(tmp_path / "t.safetensors"), metadata={"format": "pt"})
    mapped = weights._map_safetensors(tmp_path / "t.safetensors")
    reference = load_file(str(tmp_path / "t.safetensors"))
    assert mapped.keys() == reference.keys()
    for name, tensor in reference.items():
        assert mapped[name].dtype == tensor.dtype and torch.equal(mapped[name], tensor), name
    mapped["b_f32"].add_(1.0)  # a private map: writing to a tensor never reaches the file
    assert torch.equal(load_file(str(tmp_path / "t.safetensors"))["b_f32"], tensors["b_f32"])


def test_truncated_safetensors_is_one_line(tmp_path: Path) -> None:
    save_file({"w": torch.randn(100)}, str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-40])
    with pytest.raises(UserError, match="cannot read weights file .*cut.safetensors"):
        weights.plan(str(tmp_path / "cut.safetensors"), False, "small")


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_checkpoint_is_assigned_to_the_skeleton_not_copied_into_an_initialised_model(
        tmp_path: Path, suffix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_vggt("small", seed=7, enable_track=False)
    path = tmp_path / f"small{suffix}"
    if suffix == ".pt":
        torch.save(model.state_dict(), path)
    else:
        save_file(model.state_dict(), str(path))
    plan = weights.plan(str(path), False, "small")

    def no_random_init(*_: object, **__: object) -> None:
        raise AssertionError("the model was built with random initialisation before loading the checkpoint")

    monkeypatch.setattr(weights, "build_vggt", no_random_init)
    loaded = plan.build("cpu").model
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    assert not loaded.training
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    for (name, a), b in zip(model.named_buffers(), loaded.buffers()):  # upstream's constants (ImageNet mean/std)
        assert torch.equal(a, b), name
    with torch.no_grad():
        images = torch.rand(1, 2, 3, 56, 56)
        assert torch.equal(model(images)["depth"], loaded(images)["depth"])
    assert loaded is plan.skeleton  # the weights were assigned to the skeleton: no copy of the module tree
    with pytest.raises(RuntimeError, match="builds once"):
        plan.build("cpu")


def test_a_half_precision_checkpoint_becomes_the_models_fp32(tmp_path: Path) -> None:
    model = build_vggt("small", seed=2, enable_track=False)
    save_file({k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}, str(tmp_path / "bf16.safetensors"))
    loaded = weights.load_model(str(tmp_path / "bf16.safetensors"), False, "small").model
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}  # as load_state_dict's copy used to make it


def test_random_weights_on_the_cpu_are_the_same_as_before() -> None:
    built = weights.plan(None, True, "small").build("cpu").model
    reference = build_vggt("small", enable_track=False)
    weights._finite_random_cameras_(reference)
    for (name, a), b in zip(reference.state_dict().items(), built.state_dict().values()):
        assert torch.equal(a, b), name
