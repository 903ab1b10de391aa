"""Filter attributes besides category ([filters] attributes): per item an int32 code, per attribute a vocabulary.

A value is a string or a boolean; its key in the vocabulary is the string itself, or "true"/"false"
(so a filter may say true or "true"). No value (null, or a row that never gave one) is code -1,
which no filter matches. In a vectors directory (what `towerann embed --attributes` writes):
  attr_<name>.npy   int32 code per internal id, checksummed beside categories.npy (attrs_sha256)
  manifest.json     "attributes": {name: [value, ...]}   code i is value i
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from towerann.artifacts import MANIFEST, load_npy, read_manifest
from towerann.errors import ArtifactError, BadRequest

MAX_VALUE_LENGTH = 256  # characters of one attribute value


def attribute_key(value: Any, where: str = "attribute") -> str:
    """A value's vocabulary key: the string, or "true"/"false" for a boolean."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and 0 < len(value) <= MAX_VALUE_LENGTH:
        return value
    raise BadRequest(
        f"{where}: a string of 1..{MAX_VALUE_LENGTH} characters or true/false is required, got {str(value)[:100]!r}"
    )


def _as_strings(col: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode() if not pa.types.is_string(col.type.value_type) else col
    if pa.types.is_boolean(col.type) or not (pa.types.is_dictionary(col.type) or pa.types.is_string(col.type)):
        col = pc.cast(col, pa.string())  # booleans -> "true"/"false"
    return col


def column_values(pf: pq.ParquetFile, names: Iterable[str]) -> dict[str, list[str]]:
    """Each attribute column's distinct values, sorted: the vocabularies of a fresh catalog."""
    out: dict[str, list[str]] = {}
    for name in names:
        seen: set[str] = set()
        for batch in pf.iter_batches(columns=[name], batch_size=1 << 20):
            col = _as_strings(batch.column(0))
            values = col.dictionary if pa.types.is_dictionary(col.type) else pc.unique(col)
            seen.update(str(v) for v in values.to_pylist() if v is not None)
        out[name] = sorted(seen)
    return out


def encode_column(col: pa.Array | pa.ChunkedArray, values: list[str]) -> np.ndarray:
    """int32 codes of an Arrow column against a vocabulary (-1: null or not in it)."""
    col = _as_strings(col)
    vocab = pa.array(values, pa.string())
    if pa.types.is_dictionary(col.type):  # look up the few distinct values only
        dict_codes = pc.index_in(col.dictionary.cast(pa.string()), value_set=vocab).fill_null(-1)
        idx = col.indices.fill_null(len(dict_codes))
        table = np.append(dict_codes.to_numpy(zero_copy_only=False), -1)
        return table[idx.to_numpy(zero_copy_only=False)].astype(np.int32)
    return pc.index_in(col, value_set=vocab).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int32)


def read_vector_attributes(directory: str | Path, verify: bool = True) -> dict[str, tuple[np.ndarray, list[str]]]:
    """{name: (int32 code per internal id, vocabulary)} of a vectors directory (empty: none stored)."""
    directory = Path(directory)
    from towerann.data.vectors_dir import FORMAT_VERSION, KIND

    m = read_manifest(directory, KIND, FORMAT_VERSION)
    vocab = m.get("attributes") or {}
    sums = m.get("attrs_sha256") or {}
    out = {}
    for name, values in vocab.items():
        key = f"attr_{name}"
        if key not in sums or not isinstance(values, list):
            raise ArtifactError(
                f"{directory / MANIFEST}: attribute {name!r} has no checksummed {key}.npy or no "
                "value list; re-embed the catalog"
            )
        codes = load_npy(directory / f"{key}.npy", sums[key] if verify else None)
        if codes.ndim != 1 or codes.dtype != np.int32 or (len(codes) and int(codes.max()) >= len(values)):
            raise ArtifactError(f"{directory / f'{key}.npy'}: not int32 codes of its {len(values)} values")
        out[str(name)] = (codes, [str(v) for v in values])
    return out
