"""The data formats every other package reads, and where datasets come from: a dataset directory (items,
users, interactions as Parquet; dataset.py), a vectors directory (what `towerann embed` writes and
`towerann index build` reads; vectors_dir.py), vectors made elsewhere imported into one
(external_vectors.py), items' filter attributes (attributes.py), and synthetic or MovieLens datasets
(synth.py, synth_vectors.py, movielens.py; `towerann data ...`).

The names below are loaded from their modules on first use: importing the package imports neither
pandas nor pyarrow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from towerann.lazy import lazy_names

if TYPE_CHECKING:
    from towerann.data.attributes import read_vector_attributes
    from towerann.data.dataset import read_interactions, read_items, read_users, validate_dataset, write_dataset
    from towerann.data.external_vectors import import_vectors
    from towerann.data.movielens import convert
    from towerann.data.synth import generate
    from towerann.data.synth_vectors import far_off_catalog
    from towerann.data.vectors_dir import VectorSet, read_vectors, vectors_model_version, write_vectors

__all__ = [
    "VectorSet",
    "convert",
    "far_off_catalog",
    "generate",
    "import_vectors",
    "read_interactions",
    "read_items",
    "read_users",
    "read_vector_attributes",
    "read_vectors",
    "validate_dataset",
    "vectors_model_version",
    "write_dataset",
    "write_vectors",
]

_MODULE_OF = {
    "read_vector_attributes": "attributes",
    "read_interactions": "dataset",
    "read_items": "dataset",
    "read_users": "dataset",
    "validate_dataset": "dataset",
    "write_dataset": "dataset",
    "import_vectors": "external_vectors",
    "convert": "movielens",
    "generate": "synth",
    "far_off_catalog": "synth_vectors",
    "VectorSet": "vectors_dir",
    "read_vectors": "vectors_dir",
    "vectors_model_version": "vectors_dir",
    "write_vectors": "vectors_dir",
}

if not TYPE_CHECKING:  # the type checker reads the imports above instead
    __getattr__ = lazy_names(__name__, _MODULE_OF)
