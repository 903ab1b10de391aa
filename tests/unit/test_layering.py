"""The package structure holds: imports point down the layers, `index` sits just above `data`, no
circle anywhere (between packages or between the modules of one package), no private name or
attribute crosses a module boundary, no two modules share a name, and each package says what it is for."""

from __future__ import annotations

import ast
import sys
from collections import Counter
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "towerann"

# Lower layers never import higher ones (docs/architecture.md draws the same picture).
LAYERS = {
    "__init__": 0,
    "errors": 0,
    "artifacts": 0,
    "config": 0,
    "storeurl": 0,
    "lazy": 0,
    "data": 1,
    "index": 2,
    "embed": 3,
    "features": 3,
    "model": 3,
    "client": 3,
    "serving": 4,
    "cluster": 4,
    "freshness": 5,
    "server": 6,
    "bench": 7,
    "demo": 7,
    "cli": 8,
}
# What the index package may import: it is the lowest layer that does work, above only the catalog's formats.
INDEX_MAY_IMPORT = {"index", "data", "artifacts", "errors", "config", "lazy"}
# Every package has a commands.py (its CLI subcommands): the one module name allowed twice.
SHARED_MODULE_NAMES = {"__init__", "commands"}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(f: Path) -> str:
    rel = f.relative_to(SRC.parent).with_suffix("")
    return ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)


def imports() -> list[tuple[str, str, str, list[str]]]:
    """(file, importing module, imported module, imported names) for every towerann import, lazy ones too.
    `from towerann.index import filter_plan` counts as importing the module towerann.index.filter_plan."""
    modules = {_module_name(f) for f in SRC.rglob("*.py")}
    out = []
    for f in sorted(SRC.rglob("*.py")):
        me = _module_name(f)
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("towerann"):
                module = node.module or ""
                out.append((str(f.relative_to(SRC.parent)), me, module, [a.name for a in node.names]))
                out += [
                    (str(f.relative_to(SRC.parent)), me, f"{module}.{a.name}", [])
                    for a in node.names
                    if f"{module}.{a.name}" in modules
                ]
            elif isinstance(node, ast.Import):
                out += [
                    (str(f.relative_to(SRC.parent)), me, a.name, [])
                    for a in node.names
                    if a.name.startswith("towerann")
                ]
    return out


def _cycles(edges: dict[str, set[str]]) -> list[str]:
    def reaches(a: str, b: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(x == b or (x not in seen and reaches(x, b, seen | {x})) for x in edges.get(a, ()))

    return sorted({f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and reaches(b, a)})


def test_every_package_has_a_layer() -> None:
    packages = {
        p.stem if p.is_file() else p.name
        for p in SRC.iterdir()
        if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"
    }
    assert packages == set(LAYERS), "add the new package to LAYERS (and to docs/architecture.md)"


def test_imports_point_down_and_make_no_cycle() -> None:
    edges: dict[str, set[str]] = {}
    upward = []
    for file, me, module, _ in imports():
        mine, other = _package(me), _package(module)
        if other == mine or module == "towerann" and other == "__init__":
            continue
        edges.setdefault(mine, set()).add(other)
        if LAYERS[other] > LAYERS[mine]:
            upward.append(f"{file} ({mine}, layer {LAYERS[mine]}) imports {module} (layer {LAYERS[other]})")
    assert not upward, "\n".join(upward)
    cycles = _cycles(edges)
    assert not cycles, cycles


def test_index_imports_only_data_and_the_base() -> None:
    bad = sorted(
        {
            f"{file} imports {module}"
            for file, me, module, _ in imports()
            if _package(me) == "index" and _package(module) not in INDEX_MAY_IMPORT
        }
    )
    assert not bad, "\n".join(bad)


def test_no_circle_between_the_modules_of_a_package() -> None:
    """Lazy imports count: a circle closed inside a function is still a circle to read."""
    edges: dict[str, set[str]] = {}
    for _, me, module, _ in imports():
        if module != me and module.startswith("towerann.") and _package(module) == _package(me):
            edges.setdefault(me, set()).add(module)
    # a package's __init__ re-exporting its modules is not a circle; a module importing its own package's
    # __init__ is an import of that package's public names
    edges = {a: {b for b in bs if b != f"towerann.{_package(a)}"} for a, bs in edges.items() if a.count(".") > 1}
    cycles = _cycles(edges)
    assert not cycles, "\n".join(cycles)


def test_no_private_name_is_imported_across_modules() -> None:
    bad = [
        f"{file}: from {module} import {name}"
        for file, me, module, names in imports()
        for name in names
        if name.startswith("_") and not name.startswith("__") and module != me
    ]
    assert not bad, "\n".join(bad)


def _defined_here(tree: ast.AST) -> set[str]:
    """Private names this module owns: its functions, classes and globals, and attributes it assigns."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def private_attribute_reads(root: Path) -> list[str]:
    """`x._name` where `_name` is not defined in the module that reads it: another module's private state.
    Attributes of modules imported from outside towerann (`os._exit`, `argparse._SubParsersAction`) are
    those libraries' business."""
    bad = []
    for f in sorted(root.rglob("*.py")):
        tree = ast.parse(f.read_text())
        mine = _defined_here(tree)
        foreign = {
            a.asname or a.name.split(".")[0]
            for node in ast.walk(tree)
            if isinstance(node, ast.Import)
            for a in node.names
            if not a.name.startswith("towerann")
        }
        foreign |= {
            a.asname or a.name
            for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and not (node.module or "").startswith("towerann")
            for a in node.names
        }
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and node.attr not in mine
                and not (isinstance(node.value, ast.Name) and node.value.id in foreign)
            ):
                bad.append(f"{f.relative_to(root.parent)}:{node.lineno}: .{node.attr}")
    return bad


def test_no_private_attribute_is_read_across_modules() -> None:
    bad = private_attribute_reads(SRC)
    assert not bad, f"{len(bad)} reads of another module's private attributes:\n" + "\n".join(bad)


def test_no_two_modules_share_a_name() -> None:
    names = Counter(f.stem for f in SRC.rglob("*.py") if f.stem not in SHARED_MODULE_NAMES)
    twice = sorted(n for n, c in names.items() if c > 1)
    assert not twice, twice


def test_every_package_says_what_it_is_for() -> None:
    """Each package's __init__.py has a docstring and lists its public names (__all__)."""
    bare = []
    for init in sorted(SRC.glob("*/__init__.py")):
        tree = ast.parse(init.read_text())
        has_all = any(
            isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in n.targets) for n in tree.body
        )
        if not ast.get_docstring(tree) or not has_all:
            bare.append(init.parent.name)
    assert not bare, bare


def test_the_checker_sees_circles_and_private_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walks themselves can fail: a fake tree with serving -> freshness -> serving, a private import,
    a circle between two modules of one package, and another module's private attribute read."""
    fake = tmp_path / "towerann"
    files = {
        "serving/__init__.py": "from towerann.freshness.live import _secret\n",
        "freshness/__init__.py": "from towerann.serving.bundle import RetrievalBundle\n",
        "index/__init__.py": "",
        "index/a.py": "from towerann.index import b\n",
        "index/b.py": "def f(x):\n    from towerann.index.a import g\n    return x._rows\n",
    }
    for name, text in files.items():
        (fake / name).parent.mkdir(parents=True, exist_ok=True)
        (fake / name).write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    with pytest.raises(AssertionError, match="imports towerann.freshness"):
        test_imports_point_down_and_make_no_cycle()
    with pytest.raises(AssertionError, match="_secret"):
        test_no_private_name_is_imported_across_modules()
    with pytest.raises(AssertionError, match=r"towerann.index.a <-> towerann.index.b"):
        test_no_circle_between_the_modules_of_a_package()
    assert private_attribute_reads(fake) == ["towerann/index/b.py:3: ._rows"]
