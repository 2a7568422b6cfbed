"""Kernels compiled once per machine (issue #20 item 3): the caches' folders, the first-run note, no autotuning.

No GPU here: these check what the CPU can (the environment, the markers, the sources); the time saved on a GPU's
second run is measured by benchmarks/reconstruct_bench.py.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from vggt_turbo import kernels
from vggt_turbo.app import kernel_cache
from vggt_turbo.patches.aggregator import compile_blocks

KERNELS = Path(kernels.__file__).parent


@pytest.fixture
def clean_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for variable in ("TRITON_CACHE_DIR", "TORCHINDUCTOR_CACHE_DIR", "VGGT_TURBO_CACHE"):
        monkeypatch.delenv(variable, raising=False)  # restored after the test, whatever configure sets
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "vggt-turbo"


def test_cuda_run_points_the_caches_under_the_users_cache_and_is_warm_only_after_a_forward(clean_env: Path) -> None:
    cold = kernel_cache.configure(torch.device("cuda"), "exact", torch.bfloat16)
    assert os.environ["TRITON_CACHE_DIR"] == str(clean_env / "triton")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(clean_env / "inductor")
    assert cold.directory == clean_env / "triton" and cold.directory.is_dir()
    assert cold.state == "first run" and "compiling GPU kernels" in cold.progress_note()
    assert kernel_cache.configure(torch.device("cuda"), "exact", torch.bfloat16).state == "first run"
    cold.mark_warm()
    warm = kernel_cache.configure(torch.device("cuda"), "exact", torch.bfloat16)
    assert warm.state == "warm" and warm.progress_note() == ""
    # Another preset or dtype compiles other kernels: cold again.
    assert kernel_cache.configure(torch.device("cuda"), "fast", torch.bfloat16).state == "first run"
    assert kernel_cache.configure(torch.device("cuda"), "exact", torch.float16).state == "first run"


def test_a_cache_folder_the_user_chose_is_kept(clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    cache = kernel_cache.configure(torch.device("cuda"), "exact", torch.bfloat16)
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine") and cache.directory == tmp_path / "mine"
    monkeypatch.setenv("VGGT_TURBO_CACHE", str(tmp_path / "root"))
    assert kernel_cache.root() == tmp_path / "root"


def test_the_cpu_compiles_nothing_and_touches_no_environment(clean_env: Path) -> None:
    cache = kernel_cache.configure(torch.device("cpu"), "exact", torch.float32)
    assert cache.state == "cpu" and cache.progress_note() == ""
    assert "TRITON_CACHE_DIR" not in os.environ
    cache.mark_warm()  # nothing to mark
    assert not clean_env.exists()


def test_nothing_autotunes_on_the_critical_path() -> None:
    sources = "\n".join(p.read_text() for p in KERNELS.glob("*.py"))
    assert "triton.jit" in sources  # the kernels are where this test looks
    assert not re.search(r"autotune", sources), "a Triton kernel autotunes: its first run would benchmark configs"
    assert "autotune" not in str(compile_blocks.OPTIONS.get("mode", "")) and "options" not in compile_blocks.OPTIONS
