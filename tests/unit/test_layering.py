"""The package structure holds: imports point down the layers, no cycles, no private names across
packages, and the batch commands never load the web stack."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "towerann"

# Lower layers never import higher ones (docs/architecture.md draws the same picture).
LAYERS = {
    "__init__": 0, "errors": 0, "artifacts": 0, "config": 0, "storeurl": 0,
    "data": 1, "client": 1,
    "model": 2,
    "embed": 3, "index": 3, "features": 3,
    "serving": 4, "cluster": 4,
    "freshness": 5,
    "service": 6,
    "bench": 7, "demo": 7,
    "cli": 8,
}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> list[tuple[str, str, str, list[str]]]:
    """(file, importing package, imported module, imported names) for every towerann import, lazy ones too."""
    out = []
    for f in sorted(SRC.rglob("*.py")):
        rel = f.relative_to(SRC.parent).with_suffix("")
        me = _package(".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts))
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("towerann"):
                out.append((str(rel), me, node.module, [a.name for a in node.names]))
            elif isinstance(node, ast.Import):
                out += [(str(rel), me, a.name, []) for a in node.names if a.name.startswith("towerann")]
    return out


def test_every_package_has_a_layer() -> None:
    packages = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
                if (p.is_dir() and (p / "__init__.py").exists()) or p.suffix == ".py"}
    assert packages == set(LAYERS), "add the new package to LAYERS (and to docs/architecture.md)"


def test_imports_point_down_and_make_no_cycle() -> None:
    edges: dict[str, set[str]] = {}
    upward = []
    for file, me, module, _ in imports():
        other = _package(module)
        if other == me or module == "towerann" and other == "__init__":
            continue
        edges.setdefault(me, set()).add(other)
        if LAYERS[other] > LAYERS[me]:
            upward.append(f"{file} ({me}, layer {LAYERS[me]}) imports {module} (layer {LAYERS[other]})")
    assert not upward, "\n".join(upward)

    def reaches(a: str, b: str, seen: frozenset[str] = frozenset()) -> bool:
        return any(x == b or (x not in seen and reaches(x, b, seen | {x})) for x in edges.get(a, ()))

    cycles = sorted({f"{a} <-> {b}" for a in edges for b in edges[a] if a < b and reaches(b, a)})
    assert not cycles, cycles


def test_no_private_name_is_imported_across_packages() -> None:
    bad = [f"{file}: from {module} import {name}" for file, me, module, names in imports()
           for name in names if name.startswith("_") and not name.startswith("__") and _package(module) != me]
    assert not bad, bad


def test_the_checker_sees_a_cycle_and_a_private_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The walk itself can fail: a fake tree with serving -> freshness -> serving and a private import."""
    fake = tmp_path / "towerann"
    for pkg, text in {"serving": "from towerann.freshness.live import _secret\n",
                      "freshness": "from towerann.serving.bundle import RetrievalBundle\n"}.items():
        (fake / pkg).mkdir(parents=True)
        (fake / pkg / "__init__.py").write_text(text)
    monkeypatch.setattr(sys.modules[__name__], "SRC", fake)
    with pytest.raises(AssertionError, match="imports towerann.freshness"):
        test_imports_point_down_and_make_no_cycle()
    with pytest.raises(AssertionError, match="_secret"):
        test_no_private_name_is_imported_across_packages()


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from towerann.bench.serve import prepare

    # same place and sizes as tests/integration/conftest.py, so one session builds it once
    return prepare(tmp_path_factory.getbasetemp() / "serving-bundle", items=2000, users=1000, dim=32, epochs=2,
                   kind="exact")


def test_index_build_and_refresh_do_not_load_the_web_stack(paths: dict[str, Path], tmp_path: Path) -> None:
    """`towerann index build` and `towerann refresh` run for real, in a fresh interpreter, without
    importing fastapi, starlette or uvicorn (a batch job must not need the server's dependencies)."""
    script = f"""
import json, sys
from towerann.cli import main
rc_build = main(["index", "build", "--vectors", {str(paths["vectors"])!r}, "--kind", "hnsw",
                 "--out", {str(tmp_path / "snapshots")!r}])
rc_refresh = main(["refresh", "--data", {str(paths["data"])!r}, "--model", {str(paths["model"])!r},
                   "--index", {str(tmp_path / "bundles" / "indexes")!r}, "--kind", "exact"])
web = sorted(m for m in ("fastapi", "starlette", "uvicorn") if m in sys.modules)
print(json.dumps({{"rc": [rc_build, rc_refresh], "web": web}}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"rc": [0, 0], "web": []}, result
    assert (tmp_path / "snapshots" / "CURRENT").is_file() and (tmp_path / "bundles" / "indexes" / "CURRENT").is_file()
    # the check itself can fail: the server's module does load them
    probe = subprocess.run([sys.executable, "-c", "import sys, towerann.service.server; "
                            "print('uvicorn' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "True"
