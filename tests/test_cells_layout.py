"""The layout rules of charlm.cells, checked from the source with ``ast`` so they survive:

- ``equations.py`` (the spec students read) imports torch only and stays short;
- ``equations`` and ``cell`` never import ``fused``;
- nothing in ``fused/`` imports ``layer`` or ``cell``, or anything of charlm outside
  ``charlm.cells``;
- private torch APIs appear only in their backend file: ``torch.ops.mkldnn`` in
  ``fused/onednn.py``, ``torch.ops.mkl`` in ``fused/mkl.py``, storage use counts in
  ``fused/workspace.py``, ``torch._inductor`` and ``make_fx`` in ``fused/inductor.py``;
  and in the rest of the package, torch's private CPU feature probes (``torch.cpu._is_*``)
  in ``charlm/device.py`` only, the cells' backends nowhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "charlm" / "cells"
FILES = sorted(PKG.rglob("*.py"))

# private API -> the one file allowed to use it
PRIVATE = {
    "torch.ops.mkldnn": "fused/onednn.py",
    "torch.ops.mkl": "fused/mkl.py",
    "_storage_Use_Count": "fused/workspace.py",
    "_use_count": "fused/workspace.py",
    "_cdata": "fused/workspace.py",
    "torch._inductor": "fused/inductor.py",
    "make_fx": "fused/inductor.py",
    "torch.fx": "fused/inductor.py",
}


# the rest of the package: a private API -> the one file (relative to charlm/) allowed to use it
PACKAGE = PKG.parent
PACKAGE_FILES = sorted(p for p in PACKAGE.rglob("*.py") if PKG not in p.parents)
PACKAGE_PRIVATE = {
    "torch.cpu._": "device.py",  # any private CPU probe (AMX, AVX512-BF16, ...)
    **{api: None for api in PRIVATE},  # the cells' backends: only inside charlm/cells
}


def rel(path: Path) -> str:
    return path.relative_to(PKG).as_posix()


def module_of(path: Path) -> str:
    parts = ["charlm", "cells", *path.relative_to(PKG).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, relative imports resolved to absolute names."""
    tree = ast.parse(path.read_text())
    package = module_of(path) if path.name == "__init__.py" else module_of(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            found.add(root)
            found.update(f"{root}.{a.name}" for a in node.names)
    return found


def _absolute_imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found.update({node.module, *(f"{node.module}.{a.name}" for a in node.names)})
    return found


def dotted_names(path: Path) -> set[str]:
    """Every attribute chain (``torch.ops.mkldnn._linear_pointwise``) and name in ``path``,
    and every prefix of each chain."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            parts = []
            cur: ast.expr = node
            while isinstance(cur, ast.Attribute):
                parts.append(cur.attr)
                cur = cur.value
            if isinstance(cur, ast.Name):
                parts.append(cur.id)
            chain = list(reversed(parts))
            names.update(".".join(chain[: k + 1]) for k in range(len(chain)))
            names.update(parts)
        elif isinstance(node, ast.Name):
            names.add(node.id)
        elif isinstance(node, ast.ImportFrom):
            names.update(a.name for a in node.names)
    # imports() resolves relative imports inside charlm.cells; elsewhere absolute ones suffice
    modules = imports(path) if PKG in path.parents else _absolute_imports(path)
    for module in modules:
        parts = module.split(".")
        names.update(".".join(parts[: k + 1]) for k in range(len(parts)))
    return names


def test_the_package_has_the_documented_files():
    names = {rel(p) for p in FILES}
    assert {"__init__.py", "equations.py", "cell.py", "layer.py", "fused/__init__.py"} <= names
    assert {"fused/onednn.py", "fused/mkl.py", "fused/workspace.py", "fused/inductor.py"} <= names
    assert not (PKG.parent / "cells.py").exists(), "the old single-file module is back"


def test_equations_import_torch_only_and_stay_short():
    path = PKG / "equations.py"
    outside = {m for m in imports(path) if m.split(".")[0] not in ("torch", "__future__")}
    assert not outside, f"equations.py imports {sorted(outside)}"
    assert len(path.read_text().splitlines()) <= 200


@pytest.mark.parametrize("name", ["equations.py", "cell.py"])
def test_the_readable_files_never_import_fused(name):
    bad = {m for m in imports(PKG / name) if m.startswith("charlm.cells.fused")}
    assert not bad, f"{name} imports {sorted(bad)}"


@pytest.mark.parametrize("path", [p for p in FILES if rel(p).startswith("fused/")], ids=rel)
def test_fused_imports_neither_layers_nor_cells_nor_the_rest_of_charlm(path):
    for module in imports(path):
        if module.startswith("charlm"):
            assert module.startswith(("charlm.cells.fused", "charlm.cells.equations")), (
                f"{rel(path)} imports {module}"
            )


@pytest.mark.parametrize("path", FILES, ids=rel)
def test_private_torch_apis_live_in_their_backend_file(path):
    used = dotted_names(path)
    for api, home in PRIVATE.items():
        if rel(path) != home:
            assert api not in used, f"{rel(path)} uses {api}, which belongs in {home}"


@pytest.mark.parametrize("path", PACKAGE_FILES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_private_torch_apis_outside_the_cells_live_in_device_py(path):
    used = dotted_names(path)
    where = path.relative_to(PACKAGE).as_posix()
    for api, home in PACKAGE_PRIVATE.items():
        if where != home:
            hits = {n for n in used if n.startswith(api)} if api.endswith("_") else (
                {api} & used)
            assert not hits, f"charlm/{where} uses {sorted(hits)}, which belongs in {home}"


def test_the_rules_can_fail():
    """The checkers see a private API and a forbidden import when they are there."""
    bad = PKG / "fused" / "_layout_probe.py"  # inside the package, so imports resolve
    bad.write_text("import torch\nfrom torch.fx.experimental.proxy_tensor import make_fx\n"
                   "y = torch.ops.mkldnn._linear_pointwise\n"
                   "z = torch.cpu._is_amx_tile_supported()\n")
    bad_import = PKG / "fused" / "_layout_probe2.py"
    bad_import.write_text("from ..layer import LSTM\nfrom charlm import config\n")
    try:
        used = dotted_names(bad)
        assert "torch.ops.mkldnn" in used and "make_fx" in used and "torch.fx" in used
        assert "torch.cpu._is_amx_tile_supported" in used
        assert {"charlm.cells.layer", "charlm.config"} <= imports(bad_import)
    finally:
        bad.unlink()
        bad_import.unlink()
