"""Batch embedding: a model's item tower over a whole catalog (Parquet in, a vectors directory out), in
parts that a rerun resumes (runner.py, `towerann embed`); on a Ray cluster with `embed --ray`
(towerann.cluster.ray_embed).

The names below are loaded from their modules on first use: importing the package imports neither
torch nor pyarrow.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from towerann.embed.runner import embed_catalog, embed_rows

__all__ = [
    "embed_catalog",
    "embed_rows",
]

_MODULE_OF = {
    "embed_catalog": "runner",
    "embed_rows": "runner",
}

if not TYPE_CHECKING:  # the type checker reads the imports above instead

    def __getattr__(name: str) -> Any:
        if name not in _MODULE_OF:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
        globals()[name] = value
        return value
