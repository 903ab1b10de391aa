"""serving, freshness and server list their public names in __init__ (__all__) and load each one from its
module on first use: importing one module of such a package loads none of its siblings (the CLI imports
every package's commands.py; a tool that reads the delta log need not load pandas and the bundle code)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

PACKAGES = ("towerann.serving", "towerann.freshness", "towerann.server")


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves_to_the_object_its_module_defines(package: str) -> None:
    pkg = importlib.import_module(package)
    for name in pkg.__all__:
        value = getattr(pkg, name)
        assert value.__module__.startswith(package + "."), (name, value.__module__)
        assert getattr(sys.modules[value.__module__], name) is value
    with pytest.raises(AttributeError, match="no_such_name"):
        pkg.no_such_name  # noqa: B018


def test_importing_one_module_loads_none_of_its_siblings() -> None:
    script = (
        "import json, sys\n"
        "import towerann.freshness.deltalog, towerann.serving.query, towerann.server.commands\n"
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({tuple(p + '.' for p in PACKAGES)!r}))))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded == ["towerann.freshness.deltalog", "towerann.server.commands", "towerann.serving.query"]
