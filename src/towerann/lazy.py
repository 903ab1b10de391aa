"""Package names loaded on first use: a package's __init__ lists its public names and the module of each,
and importing the package imports none of them (nor their dependencies: torch, faiss, pandas, ray)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, module_of: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level `__getattr__` for `package`: name -> getattr(package.module_of[name], name), cached."""

    def __getattr__(name: str) -> Any:
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module_of[name]}"), name)
        setattr(sys.modules[package], name, value)  # the next lookup finds it without this function
        return value

    return __getattr__
