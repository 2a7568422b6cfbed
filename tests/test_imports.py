"""``import vggt_turbo`` loads the library and nothing of the application (issue #19): a user who patches their own
model pays for torch, wrapt and the patches, not for image decoding, exporters, plotting or the bench."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import vggt_turbo

PACKAGE = Path(vggt_turbo.__file__).parent
CORE = ("autocast", "config", "distributed", "kernels", "patches", "patching", "planner", "process_group", "upstream")
# Packages the library must not load: the application's (images, plots, downloads), upstream's model, NVTX (loaded
# by its flag only).
NOT_LOADED = ("PIL", "matplotlib", "huggingface_hub", "safetensors", "nvtx", "vggt", "vggt_turbo.app",
              "vggt_turbo.bench")


def modules_of(package: str) -> set[str]:
    """The modules of ``vggt_turbo.<package>`` that importing it loads: all but the Triton kernels, which are
    imported when they first run (they need triton)."""
    root = PACKAGE / package
    names = set()
    for path in root.rglob("*.py"):
        if path.stem.endswith("_triton") or (path.stem == "__init__" and path.parent == root):
            continue
        parts = path.relative_to(root).with_suffix("").parts
        names.add(".".join(("vggt_turbo", package) + (parts[:-1] if path.stem == "__init__" else parts)))
    return names


def test_using_the_library_loads_the_core_only() -> None:
    loaded = modules_after(f"import vggt_turbo; vggt_turbo.apply_optimizations, vggt_turbo.plan; {PRINT_MODULES}")
    expected = {"vggt_turbo", *(f"vggt_turbo.{m}" for m in CORE), *modules_of("patches"), *modules_of("kernels")}
    assert {m for m in loaded if m.startswith("vggt_turbo")} == expected
    assert not loaded & set(NOT_LOADED)
    assert {"torch", "wrapt"} <= loaded


def test_import_alone_loads_nothing_until_a_name_is_used() -> None:
    """The public names are imported on first use (PEP 562), so a torch-free part of the package (the preview's
    worker process) can be imported without torch; each name is then the one its module defines."""
    loaded = modules_after(f"import vggt_turbo; {PRINT_MODULES}")
    assert not {m for m in loaded if m == "torch" or m.startswith("vggt_turbo.")}
    from vggt_turbo import patching, planner, upstream

    assert vggt_turbo.apply_optimizations is patching.apply_optimizations
    assert vggt_turbo.plan is planner.plan
    assert vggt_turbo.IncompatibleUpstreamError is upstream.IncompatibleUpstreamError
    assert set(vggt_turbo.__all__) <= set(dir(vggt_turbo))
    namespace: dict[str, object] = {}
    exec("from vggt_turbo import *", namespace)
    assert set(vggt_turbo.__all__) <= set(namespace)
    assert vggt_turbo.kernels.__name__ == "vggt_turbo.kernels"  # a submodule, as an attribute
    for missing in ("no_such_name", "__wrapped__"):
        with pytest.raises(AttributeError, match=missing):
            getattr(vggt_turbo, missing)


def imported_names(path: Path) -> set[str]:
    """The vggt_turbo names ``path`` imports anywhere (also inside functions), made absolute:
    ``from ..config import PRESETS`` in ``bench/`` gives ``vggt_turbo.config.PRESETS``."""
    package = ".".join(("vggt_turbo", *path.relative_to(PACKAGE).parent.parts))
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            names |= {".".join(filter(None, (base, node.module, alias.name))) for alias in node.names}
        elif isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
    return {name for name in names if name.startswith("vggt_turbo")}


def test_the_library_never_imports_the_application_or_the_bench() -> None:
    """Not even inside a function: the application depends on the library, not the other way round."""
    core = [p for p in PACKAGE.rglob("*.py") if p.relative_to(PACKAGE).parts[0] not in ("app", "bench", "cli.py")]
    for path in core:
        assert not {n for n in imported_names(path) if n.startswith(("vggt_turbo.app", "vggt_turbo.bench"))}, path


def test_the_configuration_does_not_import_the_collectives() -> None:
    """``config`` recognises a process group through ``process_group``; ``distributed`` is the patches' business."""
    assert not {n for n in imported_names(PACKAGE / "config.py") if n.startswith("vggt_turbo.distributed")}


PRINT_MODULES = "import json, sys; print(json.dumps(sorted(sys.modules)))"


def modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter has loaded after ``code``, which prints them as JSON."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout))


def test_reconstruct_before_inference_does_not_load_torchs_compiler() -> None:
    """What reconstruct does before the first forward (its checks, the meta-device skeleton that a checkpoint is
    assigned to) must not import ``torch._dynamo`` (seconds, through torchvision's ops or torch's Python references
    of ``normal_`` on meta tensors): a one-shot command would pay it for nothing."""
    code = ("import json, sys\n"
            "from vggt_turbo.app import reconstruct, weights\n"
            "reconstruct._check_upstream()\n"
            "skeleton = weights.plan(None, True, 'small').skeleton\n"
            "assert all(p.is_meta for p in skeleton.parameters())\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = modules_after(code)
    assert "vggt.models.vggt" in loaded  # the checks did import upstream's model
    assert not loaded & {"torch._dynamo", "torchvision", "vggt.utils.load_fn"}


def test_the_resize_kernels_layout_does_not_load_torchs_compiler() -> None:
    """The fused DPT resize derives its output's strides for the heads' layouts without PyTorch's meta kernel (a
    Python decomposition that imports ``torch._dynamo``: seconds of a one-shot command's first forward)."""
    code = ("import json, sys, torch\n"
            "from vggt_turbo.kernels import bilinear\n"
            "x = torch.empty(8, 256, 37, 28).contiguous(memory_format=torch.channels_last)\n"
            "for add in (False, True):\n"
            "    bilinear._out_strides(tuple(x.shape), tuple(x.stride()), (74, 56), add)\n"
            "print(json.dumps(sorted(sys.modules)))")
    loaded = modules_after(code)
    assert "vggt_turbo.kernels.bilinear" in loaded and "torch._dynamo" not in loaded
