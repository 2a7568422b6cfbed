"""No patch module imports another: what patches share lives in helper modules (``patches/_*.py``), in
``kernels/`` (the attention dispatcher among them) or in ``upstream.py``, so that each patch can be read, changed
or removed on its own."""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import vggt_turbo.patches as patches
from vggt_turbo.patches import ALL_PATCHES

PACKAGE = patches.__name__


def patch_modules() -> dict[str, Path]:
    """Module name -> file of every module whose ``PATCH`` is in ``ALL_PATCHES``."""
    found = {}
    for info in pkgutil.walk_packages(patches.__path__, prefix=f"{PACKAGE}."):
        module = importlib.import_module(info.name)
        if any(getattr(module, "PATCH", None) is p for p in ALL_PATCHES):
            found[module.__name__] = Path(module.__file__)
    return found


def imported_modules(path: Path, module: str) -> set[str]:
    """Every module ``path`` imports, absolute (``from . import x`` counts ``<package>.x`` as well)."""
    package = module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names |= {f"{base}.{alias.name}" for alias in node.names}
    return names


def test_every_patch_module_is_found() -> None:
    assert len(patch_modules()) == len(ALL_PATCHES)


def test_no_patch_imports_another_patch() -> None:
    modules = patch_modules()
    offending = {
        name: sorted(imported & set(modules) - {name})
        for name, path in modules.items()
        if (imported := imported_modules(path, name)) & set(modules) - {name}
    }
    assert offending == {}
