"""Smoke test of benchmarks/reconstruct_bench.py: the small model on the CPU, both pipelines, one frame count."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("reconstruct_bench", ROOT / "benchmarks" / "reconstruct_bench.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_small_run_times_both_pipelines_per_phase(tmp_path: Path) -> None:
    results = _bench().main(["--size", "small", "--frames", "3", "--runs", "1", "--device", "cpu",
                             "--checkpoint", str(tmp_path / "small.safetensors"), "--out", str(tmp_path / "results")])
    assert (tmp_path / "small.safetensors").stat().st_size == results["checkpoint_bytes"] > 0
    (row,) = results["rows"]
    assert row["frames"] == 3 and len(row["turbo"]) == 1
    for pipeline in (row["turbo"][0], row["upstream"]):
        phases = pipeline["phases_s"]
        assert {"load", "model", "inference", "export"} <= phases.keys()
        assert 0 < sum(phases[k] for k in ("load", "model", "inference", "export")) < pipeline["wall_s"]
    assert row["turbo"][0]["kernel_cache"]["state"] == "cpu"
    assert row["goal_s"] > results["checkpoint_read_s"] >= 0
    written = json.loads((tmp_path / "results" / "cpu-small.json").read_text())
    assert written["rows"][0]["frames"] == 3
    assert {"gpu", "torch", "upstream_commit", "vggt_turbo_commit", "date", "python_bytecode"} <= written["meta"].keys()


def test_compare_src_runs_the_other_tree_after_each_run(tmp_path: Path) -> None:
    """``--compare-src``: the command also runs from another tree's src/ (here a copy whose version says so)."""
    other = tmp_path / "other" / "src"
    shutil.copytree(ROOT / "src", other, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    init = other / "vggt_turbo" / "__init__.py"
    init.write_text(init.read_text().replace('__version__ = "', '__version__ = "compared-'))
    results = _bench().main(["--size", "small", "--frames", "2", "--runs", "1", "--device", "cpu", "--skip-upstream",
                             "--checkpoint", str(tmp_path / "small.safetensors"), "--out", str(tmp_path / "results"),
                             "--compare-src", str(other)])
    (row,) = results["rows"]
    assert [r["vggt_turbo"].startswith("compared-") for r in row["turbo"] + row["compare"]] == [False, True]
    assert all(r["wall_s"] > 0 for r in row["compare"]) and "upstream" not in row
    assert results["compare_src"] == str(other)


def test_meta_resolves_the_default_device() -> None:
    """``--device auto`` (the default) names the machine it ran on, as an explicit device does."""
    import torch

    meta = _bench().run_meta("auto")
    assert meta["gpu"] == (torch.cuda.get_device_name() if torch.cuda.is_available() else _bench().run_meta("cpu")["gpu"])
