"""benchmarks/ab_tree.py: another commit's package loads beside this one, under its own name, and patches a model
with its own code (the timing itself needs CUDA and runs on the GPU machine)."""

from __future__ import annotations

import copy
import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import torch

import vggt_turbo
from vggt_turbo.random_model import build_vggt, random_images

ROOT = Path(__file__).resolve().parents[1]


def _ab_tree() -> ModuleType:
    sys.path.insert(0, str(ROOT / "benchmarks"))  # ab_tree imports its sibling ab_flag
    try:
        spec = importlib.util.spec_from_file_location("ab_tree", ROOT / "benchmarks" / "ab_tree.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_other_tree_patches_with_its_own_modules(tmp_path: Path) -> None:
    other_src = tmp_path / "vggt_turbo"
    shutil.copytree(Path(vggt_turbo.__file__).parent, other_src, ignore=shutil.ignore_patterns("__pycache__"))
    marker = "OTHER_TREE_MARKER = True\n"
    (other_src / "patching.py").write_text((other_src / "patching.py").read_text() + marker)
    ab_tree = _ab_tree()
    try:
        other = ab_tree.load_other(other_src)
        base = build_vggt("small", seed=0, enable_track=False).eval()
        ours, theirs, plain = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
        vggt_turbo.apply_optimizations(ours, "exact")
        other.apply_optimizations(theirs, "exact")
        # The other package's code is its own copy: its modules live under its name, with its edits.
        patching = sys.modules[f"{ab_tree.OTHER}.patching"]
        assert patching.__file__ == str(other_src / "patching.py") and patching.OTHER_TREE_MARKER
        assert not hasattr(sys.modules["vggt_turbo.patching"], "OTHER_TREE_MARKER")
        assert other.describe(theirs).config is not None and vggt_turbo.describe(theirs).config is None  # its own only
        images = random_images(2, 56, seed=0)
        with torch.no_grad():
            a, b, ref = ours(images), theirs(images), plain(images)
        for key in ab_tree.OUTPUTS:
            assert ab_tree._rel(b[key], ref[key]) == ab_tree._rel(a[key], ref[key]) < 1e-5
    finally:
        for name in [n for n in sys.modules if n == ab_tree.OTHER or n.startswith(ab_tree.OTHER + ".")]:
            del sys.modules[name]
