"""``app.hub`` and the pretrained path of ``weights.Plan.build``: ``from_pretrained``'s checkpoint found and loaded
like a local file where it is upstream's default model; ``from_pretrained`` itself otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vggt_turbo.app import hub, weights
from vggt_turbo.random_model import build_vggt


def _folder(tmp_path: Path, config: object = None, with_weights: bool = True) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    if with_weights:
        model = build_vggt("small", seed=3, enable_track=True)  # a track head, as the released weights have
        save_file(model.state_dict(), str(folder / hub.WEIGHTS_FILE))
    if config is not None:
        (folder / hub.CONFIG_FILE).write_text(json.dumps(config))
    return folder


def test_default_config_is_vggts_own_defaults() -> None:
    assert hub.is_default_config({})
    assert hub.is_default_config({"img_size": 518, "patch_size": 14, "embed_dim": 1024, "enable_track": True})
    assert not hub.is_default_config({"embed_dim": 512})
    assert not hub.is_default_config({"img_size": 518, "unknown": 1})
    assert not hub.is_default_config([518])


@pytest.mark.parametrize("config, found", [(None, True), ({"img_size": 518}, True), ({"enable_depth": False}, False)])
def test_a_folders_checkpoint_is_found_only_for_the_default_model(tmp_path: Path, config: object, found: bool) -> None:
    folder = _folder(tmp_path, config)
    assert hub.pretrained_checkpoint(str(folder)) == (folder / hub.WEIGHTS_FILE if found else None)


def test_a_folder_without_safetensors_is_left_to_from_pretrained(tmp_path: Path) -> None:
    assert hub.pretrained_checkpoint(str(_folder(tmp_path, {}, with_weights=False))) is None


def test_a_hub_id_takes_the_cached_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    folder = _folder(tmp_path)
    asked: list[tuple[str, str]] = []
    files = {hub.WEIGHTS_FILE: folder / hub.WEIGHTS_FILE}  # no config.json in this repository

    def download(repo: str, filename: str) -> str:
        asked.append((repo, filename))
        if filename not in files:
            raise EntryNotFoundError(f"{filename} not in {repo}")
        return str(files[filename])

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    assert hub.pretrained_checkpoint("org/model") == folder / hub.WEIGHTS_FILE
    assert asked == [("org/model", hub.WEIGHTS_FILE), ("org/model", hub.CONFIG_FILE)]
    files.clear()  # a repository without model.safetensors: from_pretrained's other formats
    assert hub.pretrained_checkpoint("org/model") is None

    def offline(repo: str, filename: str) -> str:
        raise LocalEntryNotFoundError("not cached, and the Hub cannot be reached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(LocalEntryNotFoundError):  # an error for the caller, not "no such file"
        hub.pretrained_checkpoint("org/model")


def test_the_pretrained_checkpoint_is_assigned_to_the_skeleton_without_the_track_head(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vggt.models.vggt import VGGT

    folder = _folder(tmp_path)

    def never(*_: object, **__: object) -> None:
        raise AssertionError("from_pretrained built the model (random initialisation on the CPU first)")

    monkeypatch.setattr(VGGT, "from_pretrained", never)
    skeleton = weights._skeleton("small", enable_track=False)
    model = weights._pretrained(skeleton, "small", str(folder), f"folder {folder}", torch.device("cpu"))
    assert model is skeleton and model.track_head is None and not model.training
    saved = build_vggt("small", seed=3, enable_track=True).state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == {k for k in saved if not k.startswith("track_head.")}
    assert all(torch.equal(loaded[k], saved[k]) for k in loaded)


@pytest.mark.parametrize("case", ["another config", "other names"])
def test_otherwise_from_pretrained_itself_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    from vggt.models.vggt import VGGT

    if case == "another config":
        folder = _folder(tmp_path, {"enable_depth": False})
    else:  # names the strict check refuses, which from_pretrained (strict=False) would load
        folder = _folder(tmp_path, {})
        state = build_vggt("small", seed=3, enable_track=False).state_dict()
        save_file({**state, "extra.weight": torch.zeros(2)}, str(folder / hub.WEIGHTS_FILE))
    built = build_vggt("small", seed=1, enable_track=False).train()
    calls: list[str] = []

    def from_pretrained(source: str) -> torch.nn.Module:
        calls.append(source)
        return built

    monkeypatch.setattr(VGGT, "from_pretrained", from_pretrained)
    model = weights._pretrained(weights._skeleton("small", False), "small", str(folder), "folder", torch.device("cpu"))
    assert model is built and not model.training and calls == [str(folder)]


def test_an_unreadable_pretrained_file_is_one_line_of_ours(tmp_path: Path) -> None:
    from vggt_turbo.app.errors import UserError

    folder = _folder(tmp_path, {}, with_weights=False)
    (folder / hub.WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(UserError) as caught:
        weights._pretrained(weights._skeleton("small", False), "small", str(folder), "folder", torch.device("cpu"))
    assert str(caught.value).startswith(f"cannot read weights file {folder / hub.WEIGHTS_FILE}: the file is empty")
