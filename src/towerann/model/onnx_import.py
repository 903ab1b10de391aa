"""`towerann model import`: two ONNX towers + a TOML schema -> an ordinary towerann model directory.

The schema says, for each input of each graph, its name, dtype, per-row shape (the batch axis
excluded) and where its values come from:

    [model]
    dim = 32
    metric = "ip"          # "ip": outputs must be L2-normalised; "cosine": towerann normalises them
    normalized = true

    [ids]                  # vocabularies: the external ids of the towers' item / user rows, in order
    items = "item_ids.txt" # .txt (one id a line) or .npy, relative to the schema file
    users = "user_ids.txt"
    first_index = 1        # the graph's index of the first listed id (default 1)
    unknown_index = 0      # the graph's index of an id not listed (default 0; also pads empty session slots)

    [user_tower]
    output = "user_vec"    # optional when the graph has one output
    [[user_tower.inputs]]
    name = "member"
    dtype = "int64"
    shape = []
    source = "user_id"     # user_id | user_feature (feature/features) | session_items | session_mask

    [item_tower]
    [[item_tower.inputs]]
    name = "dept"
    dtype = "int64"
    shape = []
    source = "item_column" # item_id | item_column (column/columns)
    column = "category"
    values = ["shoes", "hats"]  # a string column: the graph's index of values[i] is first_index + i

A numeric feature or column (float dtype, or int without `values`) is passed as it is. The pair is
checked before anything is written: every graph input is in the schema and the reverse, dtypes and
shapes agree, a sample of the dataset runs through both towers, outputs have the schema's dim and
(for "ip") unit norm, and a user's own history items outscore random items (the two towers write one
space). Every error is one line naming the input that does not match.

A user tower alone (`item_tower=None`, the CLI without --item-tower) is imported for a vectors-only
bundle (item vectors made elsewhere): the schema then has no [item_tower], `space_id` is required
(the vector space the bundle declares, `towerann refresh --vectors FILE --space-id S`), and [ids]
items is needed only when the tower reads session items. The checks are the user side's; whether the
tower's queries fit the item vectors is the declared space id's promise, which `serve --model` checks
by name (serving.bundle.check_pairing).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import tomllib
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from towerann.artifacts import MANIFEST, atomic_dir, save_npy, sha256_file, write_manifest
from towerann.data.dataset import read_items, read_users
from towerann.errors import ConfigError, DataError, TowerannError
from towerann.model.imported import DTYPES, TOWER_KIND, Feed, ImportedModel, TowerFeeds, check_space_id
from towerann.model.schema import CategoricalColumn, FeatureSchema, NumericColumn

log = logging.getLogger(__name__)

METRICS = ("ip", "cosine")
USER_SOURCES = ("user_id", "user_feature", "session_items", "session_mask")
ITEM_SOURCES = ("item_id", "item_column")
INPUT_KEYS = {
    "name",
    "dtype",
    "shape",
    "source",
    "feature",
    "features",
    "column",
    "columns",
    "values",
    "first_index",
    "unknown_index",
}
SECTION_KEYS = {
    "model": {"dim", "metric", "normalized"},
    "ids": {"items", "users", "first_index", "unknown_index"},
    "user_tower": {"inputs", "output"},
    "item_tower": {"inputs", "output"},
}
ONNX_DTYPES = {"FLOAT": "float32", "DOUBLE": "float64", "INT64": "int64", "INT32": "int32", "BOOL": "bool"}
NORM_TOL = 1e-3
SAMPLE_ITEMS = 512
SAMPLE_USERS = 300
RANDOM_PER_USER = 20
MIN_SPACE_AUC = 0.6


def import_model(
    schema_path: str | Path,
    user_tower: str | Path,
    item_tower: str | Path | None,
    data: str | Path,
    out: str | Path,
    name: str | None = None,
    overwrite: bool = False,
    min_space_auc: float = MIN_SPACE_AUC,
    space_id: str | None = None,
) -> dict[str, Any]:
    """Check the towers against the schema and a dataset, write the model directory; return a report.

    `item_tower` None: the user tower alone, which needs `space_id` (see the module's docstring);
    `space_id` with both towers: the space of item vectors they made elsewhere, declared too."""
    if item_tower is None and space_id is None:
        raise ConfigError(
            "a user tower without an item tower needs --space-id S: the space id of the vectors-only bundle "
            "whose item vectors its queries are for (`towerann refresh --vectors FILE --space-id S`); or give "
            "--item-tower"
        )
    if space_id is not None:
        check_space_id(space_id, "--space-id")
    schema_path, out = Path(schema_path), Path(out)
    sides = ("user",) if item_tower is None else ("user", "item")
    spec = _read_toml(schema_path, sides)
    graphs = {"user": Path(user_tower)} | ({} if item_tower is None else {"item": Path(item_tower)})
    items, users = read_items(data), read_users(data)
    plan = _plan(spec, schema_path, items, users, sides)
    for side, path in graphs.items():
        feeds = plan[f"{side}_feeds"]
        plan[f"{side}_feeds"] = replace(feeds, output=_check_graph(path, side, feeds, spec["model"]["dim"]))
    with atomic_dir(out, overwrite=overwrite) as tmp:
        sums = {}
        for side, path in graphs.items():
            shutil.copyfile(path, tmp / f"{side}_tower.onnx")
            sums[f"{side}_tower.onnx"] = sha256_file(tmp / f"{side}_tower.onnx")
        shutil.copyfile(schema_path, tmp / "import.toml")  # what it was imported from, for the record
        sums["item_vocab.npy"] = save_npy(tmp / "item_vocab.npy", plan["item_ids"])
        sums["user_vocab.npy"] = save_npy(tmp / "user_vocab.npy", plan["user_ids"])
        mapping = {
            "user": plan["user_feeds"].to_json(),
            "item": plan["item_feeds"].to_json() if "item" in graphs else None,
            "normalize": spec["model"]["metric"] == "cosine",
        }
        digest = _digest(sums, mapping, space_id)
        manifest = {
            "kind": "model",
            "format_version": 1,
            "tower_kind": TOWER_KIND,
            "model_version": f"{name or out.name}-{digest[:12]}",
            "dim": spec["model"]["dim"],
            "metric": "ip",
            "towers": list(sides),
            **({"space_id": space_id} if space_id is not None else {}),
            "schema": plan["schema"].to_json(),
            "mapping": mapping,
            "checksums": sums,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "info": {
                "imported_from": {"schema": str(schema_path), **{f"{s}_tower": str(p) for s, p in graphs.items()}}
            },
        }
        model = ImportedModel.from_manifest(tmp, manifest)
        checks = _sample_checks(model, data, min_space_auc)
        manifest["info"]["import_checks"] = checks
        write_manifest(tmp / MANIFEST, manifest)
    return {"model_version": manifest["model_version"], "out": str(out), "space_id": space_id, **checks}


def _digest(sums: Mapping[str, str], mapping: Mapping[str, Any], space_id: str | None) -> str:
    import hashlib

    parts: list[Any] = [sums, mapping] if space_id is None else [sums, mapping, space_id]  # old versions stay
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# --- the schema file --------------------------------------------------------------------------


def _read_toml(path: Path, sides: tuple[str, ...] = ("user", "item")) -> dict[str, Any]:
    try:
        spec = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the schema ({e.strerror})") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML ({e})") from e
    sections = ("model", "ids", *(f"{side}_tower" for side in sides))
    if "item" not in sides and "item_tower" in spec:
        raise ConfigError(
            f"{path}: [item_tower] describes an item tower, but none was given (--item-tower); drop the section "
            "to import the user tower alone"
        )
    for section in sections:
        if not isinstance(spec.get(section), dict):
            raise ConfigError(f"{path}: no [{section}] section")
    extra = set(spec) - {"model", "ids", "user_tower", "item_tower"}
    if extra:
        raise ConfigError(f"{path}: unknown section(s) {sorted(extra)}")
    for section in sections:
        allowed = SECTION_KEYS[section]
        extra = set(spec[section]) - allowed
        if extra:
            raise ConfigError(f"{path}: [{section}] has unknown key(s) {sorted(extra)} (it takes {sorted(allowed)})")
    m = spec["model"]
    dim = m.get("dim")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ConfigError(f"{path}: [model] dim must be a positive integer, got {dim!r}")
    if m.get("metric") not in METRICS:
        raise ConfigError(f"{path}: [model] metric must be one of {', '.join(METRICS)}, got {m.get('metric')!r}")
    if m["metric"] == "ip" and m.get("normalized") is not True:
        raise ConfigError(
            f"{path}: [model] metric 'ip' with normalized = {m.get('normalized')!r}: towerann's indexes "
            "rank by the inner product of L2-normalised vectors; normalise in the towers (normalized = "
            'true), or set metric = "cosine" to have towerann normalise the outputs'
        )
    return spec


def _int(d: Mapping[str, Any], key: str, default: int, where: str) -> int:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int):
        raise ConfigError(f"{where}: {key} must be an integer, got {v!r}")
    return v


def _vocab(path: Path, ids: pd.Series, what: str) -> np.ndarray:
    """A vocabulary file's ids, typed like the dataset's ids."""
    try:
        raw = (
            np.load(path, allow_pickle=False)
            if path.suffix == ".npy"
            else np.asarray([line.strip() for line in path.read_text().splitlines() if line.strip()])
        )
    except (OSError, ValueError) as e:
        raise ConfigError(f"[ids] {what} = {str(path)!r}: cannot read it ({e})") from e
    try:
        out = raw.astype(np.int64) if pd.api.types.is_integer_dtype(ids) else raw.astype(str)
    except ValueError as e:
        raise ConfigError(f"[ids] {what}: the dataset's {what[:-1]} ids are integers but {path} holds {e}") from e
    if out.ndim != 1 or len(np.unique(out)) != len(out):
        raise ConfigError(f"[ids] {what}: {path} must list each id once (one id a line, or a 1-d .npy)")
    return out


def _plan(
    spec: dict[str, Any],
    schema_path: Path,
    items: pd.DataFrame,
    users: pd.DataFrame,
    sides: tuple[str, ...] = ("user", "item"),
) -> dict[str, Any]:
    """The schema file -> feeds per tower, a FeatureSchema (towerann's encoding) and the id vocabularies."""
    ids = spec["ids"]
    first, unknown = _int(ids, "first_index", 1, "[ids]"), _int(ids, "unknown_index", 0, "[ids]")
    vocabs = {}
    # a user tower alone needs the item ids only for its session inputs: they index the tower's item table
    inputs = spec["user_tower"].get("inputs")
    reads_items = "item" in sides or (
        isinstance(inputs, list) and any(isinstance(d, dict) and d.get("source") == "session_items" for d in inputs)
    )
    for what, frame, col in (("items", items, "item_id"), ("users", users, "user_id")):
        if what == "items" and not reads_items and "items" not in ids:
            vocabs[what] = np.zeros(0, np.int64 if pd.api.types.is_integer_dtype(frame[col]) else "U1")
            continue
        if not isinstance(ids.get(what), str):
            why = " (the user tower's session_items index it)" if "item" not in sides else ""
            raise ConfigError(f"{schema_path}: [ids] {what} must name a vocabulary file (.txt or .npy){why}")
        vocabs[what] = _vocab(schema_path.parent / ids[what], frame[col], what)
    cols: dict[str, dict[str, Any]] = {
        "user_numeric": {},
        "user_categorical": {},
        "item_numeric": {},
        "item_categorical": {},
    }
    categories: CategoricalColumn | None = None
    history: set[int] = set()
    feeds: dict[str, list[Feed]] = {"user": [], "item": []}
    for side, sources, frame in (("user", USER_SOURCES, users), ("item", ITEM_SOURCES, items)):
        if side not in sides:
            continue
        tower = spec[f"{side}_tower"]
        inputs = tower.get("inputs")
        if not isinstance(inputs, list) or not inputs:
            raise ConfigError(f"{schema_path}: [{side}_tower] has no [[{side}_tower.inputs]]")
        names: set[str] = set()
        for d in inputs:
            where = f"{side} tower input {d.get('name')!r}"
            if not isinstance(d.get("name"), str) or d["name"] in names:
                raise ConfigError(
                    f"{schema_path}: {side} tower: every input needs a unique name, got {d.get('name')!r}"
                )
            names.add(d["name"])
            extra = set(d) - INPUT_KEYS
            if extra:
                raise ConfigError(f"{where}: unknown key(s) {sorted(extra)}")
            if d.get("dtype") not in DTYPES:
                raise ConfigError(f"{where}: dtype must be one of {', '.join(DTYPES)}, got {d.get('dtype')!r}")
            shape = d.get("shape", [])
            if not isinstance(shape, list) or not all(
                isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in shape
            ):
                raise ConfigError(
                    f"{where}: shape must be a list of positive integers (per row, batch axis left out), got {shape!r}"
                )
            source = d.get("source")
            if source not in sources:
                raise ConfigError(f"{where}: source must be one of {', '.join(sources)}, got {source!r}")
            f_first, f_unknown = _int(d, "first_index", first, where), _int(d, "unknown_index", unknown, where)
            base = {
                "name": d["name"],
                "dtype": d["dtype"],
                "shape": tuple(shape),
                "first": f_first,
                "unknown": f_unknown,
            }
            if source in ("user_id", "item_id"):
                _want(shape, ((), (1,)), where, "an id: shape [] or [1]")
                _int_dtype(d, where)
                feeds[side].append(Feed(**base, source=source))
            elif source in ("session_items", "session_mask"):
                if len(shape) != 1:
                    raise ConfigError(f"{where}: {source} has shape [N] (the last N session items), got {shape!r}")
                if source == "session_items":
                    _int_dtype(d, where)
                history.add(shape[0])
                feeds[side].append(Feed(**base, source=source))
            else:
                key = "feature" if side == "user" else "column"
                names_in = d.get(key + "s", [d[key]] if key in d else None)
                if not isinstance(names_in, list) or not names_in or not all(isinstance(c, str) for c in names_in):
                    raise ConfigError(f'{where}: give the {side} {key} it reads ({key} = "..." or {key}s = [...])')
                missing = [c for c in names_in if c not in frame.columns]
                if missing:
                    file = "users.parquet" if side == "user" else "items.parquet"
                    raise ConfigError(
                        f"{where}: the dataset's {file} has no column(s) {missing} (it has "
                        f"{[c for c in frame.columns]})"
                    )
                if side == "item" and {"item_id", "available"} & set(names_in):
                    raise ConfigError(f'{where}: item_id and available are not item columns; use source = "item_id"')
                values = d.get("values")
                if values is None:  # numeric: passed as it is
                    if len(names_in) == 1:
                        _want(shape, ((), (1,)), where, f"one {key}: shape [] or [1]")
                    else:
                        _want(shape, ((len(names_in),),), where, f"{len(names_in)} {key}s: shape [{len(names_in)}]")
                    if any(pd.api.types.is_string_dtype(frame[c]) or frame[c].dtype == object for c in names_in):
                        raise ConfigError(
                            f"{where}: {key} {names_in} holds strings; give values = [...] (the "
                            "graph's index of each value is first_index + its position)"
                        )
                    group = cols[f"{side}_numeric"]
                    for c in names_in:
                        group.setdefault(c, NumericColumn(c, 0.0, 1.0))
                    feeds[side].append(
                        Feed(**base, source=f"{side}_numeric", columns=tuple(list(group).index(c) for c in names_in))
                    )
                else:
                    if (
                        len(names_in) != 1
                        or not isinstance(values, list)
                        or not all(isinstance(v, str) for v in values)
                    ):
                        raise ConfigError(f"{where}: values (a list of strings) go with one {key}")
                    _want(shape, ((), (1,)), where, "a categorical value: shape [] or [1]")
                    _int_dtype(d, where)
                    c = names_in[0]
                    column = CategoricalColumn(c, list(values))
                    if side == "item" and c == "category":
                        if categories is not None and categories.values != column.values:
                            raise ConfigError(f"{where}: two inputs read category with different values")
                        categories = column
                        feeds[side].append(Feed(**base, source="item_category"))
                        continue
                    group = cols[f"{side}_categorical"]
                    if c in group and group[c].values != column.values:
                        raise ConfigError(f"{where}: two inputs read {key} {c!r} with different values")
                    group.setdefault(c, column)
                    feeds[side].append(Feed(**base, source=f"{side}_categorical", columns=(list(group).index(c),)))
    if len(history) > 1:
        raise ConfigError(f"{schema_path}: session inputs disagree on N (shapes {sorted(history)}); one history length")
    schema = FeatureSchema(
        categories=categories or CategoricalColumn.from_frame(items, "category"),
        item_numeric=list(cols["item_numeric"].values()),
        item_categorical=list(cols["item_categorical"].values()),
        user_numeric=list(cols["user_numeric"].values()),
        user_categorical=list(cols["user_categorical"].values()),
        history_len=history.pop() if history else 1,
        item_id_kind="int" if pd.api.types.is_integer_dtype(items["item_id"]) else "str",
        user_id_kind="int" if pd.api.types.is_integer_dtype(users["user_id"]) else "str",
    )
    return {
        "schema": schema,
        "item_ids": vocabs["items"],
        "user_ids": vocabs["users"],
        "user_feeds": TowerFeeds(tuple(feeds["user"]), spec["user_tower"].get("output", "")),
        "item_feeds": TowerFeeds(tuple(feeds["item"]), spec.get("item_tower", {}).get("output", "")),
    }


def _want(shape: list[int], allowed: tuple[tuple[int, ...], ...], where: str, what: str) -> None:
    if tuple(shape) not in allowed:
        raise ConfigError(f"{where}: {what}, got shape {shape!r}")


def _int_dtype(d: Mapping[str, Any], where: str) -> None:
    if d["dtype"] not in ("int64", "int32"):
        raise ConfigError(f"{where}: indexes are integers (dtype int64 or int32), got {d['dtype']!r}")


# --- the graphs -------------------------------------------------------------------------------


def _check_graph(path: Path, side: str, feeds: TowerFeeds, dim: int) -> str:
    """Every graph input in the schema and the reverse; dtypes, shapes and the output's dim agree.
    Returns the output's name (the schema's, or the graph's only output)."""
    import onnx

    try:
        graph = onnx.load(str(path)).graph
    except Exception as e:  # onnx raises DecodeError, OSError...
        raise ConfigError(f"{side} tower {path}: not a readable ONNX file ({type(e).__name__}: {e})") from e
    initializers = {i.name for i in graph.initializer}
    graph_inputs = {i.name: i for i in graph.input if i.name not in initializers}
    declared = {f.name: f for f in feeds.feeds}
    for name in graph_inputs:
        if name not in declared:
            raise ConfigError(
                f"{side} tower input {name!r} (an input of {path.name}) is missing from the schema's "
                f"[[{side}_tower.inputs]]"
            )
    for name, f in declared.items():
        if name not in graph_inputs:
            raise ConfigError(
                f"{side} tower input {name!r} of the schema is not an input of {path.name} "
                f"(its inputs: {sorted(graph_inputs)})"
            )
        t = graph_inputs[name].type.tensor_type
        got = ONNX_DTYPES.get(onnx.TensorProto.DataType.Name(t.elem_type), onnx.TensorProto.DataType.Name(t.elem_type))
        if got != f.dtype:
            raise ConfigError(f"{side} tower input {name!r}: the schema says dtype {f.dtype}, {path.name} takes {got}")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if len(dims) != 1 + len(f.shape) or any(g is not None and g != w for g, w in zip(dims[1:], f.shape)):
            shown = ["n" if g is None else g for g in dims]
            raise ConfigError(
                f"{side} tower input {name!r}: the schema's per-row shape {list(f.shape)} does not fit "
                f"{path.name}'s {shown} (batch axis first)"
            )
        if dims[0] is not None:
            raise ConfigError(
                f"{side} tower input {name!r}: {path.name} fixes the batch axis at {dims[0]}; export "
                "with a dynamic first axis (torch.onnx.export dynamic_axes)"
            )
    outputs = {o.name: o for o in graph.output}
    output = feeds.output
    if not output:
        if len(outputs) != 1:
            raise ConfigError(
                f"{side} tower {path.name} has outputs {sorted(outputs)}; name one in [{side}_tower] output"
            )
        output = next(iter(outputs))
    if output not in outputs:
        raise ConfigError(f"{side} tower output {output!r} is not an output of {path.name} ({sorted(outputs)})")
    odims = [d.dim_value if d.HasField("dim_value") else None for d in outputs[output].type.tensor_type.shape.dim]
    if odims and odims[-1] is not None and odims[-1] != dim:
        raise ConfigError(f"{side} tower output {output!r} has dim {odims[-1]}; the schema says dim = {dim}")
    return output


# --- the sample run ---------------------------------------------------------------------------


def _run(what: str, fn: Any, *args: Any) -> np.ndarray:
    try:
        return fn(*args)
    except TowerannError:
        raise
    except Exception as e:  # onnxruntime's own errors: an index out of range, a shape the graph refuses
        detail = " ".join(str(e).split())[:300]
        raise ConfigError(f"{what} failed on a sample of the dataset ({type(e).__name__}: {detail})") from e


def _check_vectors(v: np.ndarray, side: str, output: str, dim: int, unit: bool) -> None:
    if v.ndim != 2 or v.shape[1] != dim:
        raise ConfigError(
            f"{side} tower output {output!r} gives vectors of shape {list(v.shape[1:])}; the schema says dim = {dim}"
        )
    if not np.isfinite(v).all():
        raise ConfigError(f"{side} tower output {output!r} gives non-finite values on the sample")
    norms = np.linalg.norm(v, axis=1)
    if unit and len(norms) and np.abs(norms - 1).max() > NORM_TOL:
        raise ConfigError(
            f"{side} tower output {output!r} is not L2-normalised (|v| from {norms.min():.4f} to "
            f"{norms.max():.4f}) but the schema says normalized = true for metric 'ip'; normalise in the "
            'tower, or set metric = "cosine" to have towerann normalise'
        )


def _check_largest_indexes(model: ImportedModel) -> None:
    """Both towers on the unknown and the last entry of every vocabulary: an [ids] file or a values list
    longer than the graph's table would otherwise fail only at the request that meets its last ids."""
    sch = model.schema

    def codes(size: int) -> np.ndarray:
        return np.array([0, size - 1], np.int64)  # 0: unknown; size - 1: the vocabulary's last entry

    item_attrs = (
        np.stack([codes(c.size) for c in sch.item_categorical], axis=1)
        if sch.item_categorical
        else np.zeros((2, 0), np.int64)
    )
    item = (
        codes(model.item_vocab.size),
        codes(sch.categories.size),
        np.zeros((2, len(sch.item_numeric)), np.float32),
        item_attrs,
    )
    user_cats = (
        np.stack([codes(c.size) for c in sch.user_categorical], axis=1)
        if sch.user_categorical
        else np.zeros((2, 0), np.int64)
    )
    n = model.cfg.history_len
    hist = np.repeat(codes(model.item_vocab.size)[:, None], n, axis=1)
    user = (
        codes(model.user_vocab.size),
        np.zeros((2, len(sch.user_numeric)), np.float32),
        user_cats,
        hist,
        np.zeros((2, n), np.int64),
        np.ones((2, n), np.float32),
    )
    runs = [("user", model.user_tower(), model.user_feeds.user(*user))]
    if model.item_feeds is not None:  # not a user tower imported alone
        runs.insert(0, ("item", model.item_tower(), model.item_feeds.item(*item)))
    for side, tower, feed in runs:
        try:
            tower.run(feed)
        except TowerannError:
            raise
        except Exception as e:
            detail = " ".join(str(e).split())[:200]
            raise ConfigError(
                f"the {side} tower fails on the last index of a vocabulary ([ids] or values); is a "
                f"list longer than the graph's table, or first_index off? ({type(e).__name__}: "
                f"{detail})"
            ) from e


def _sample_checks(model: ImportedModel, data: str | Path, min_auc: float) -> dict[str, Any]:
    """Both towers on a sample; then: do users' own history items outscore random items (AUC)?"""
    from towerann.model.evaluate import user_queries
    from towerann.model.prepare import TEST, prepare

    p = prepare(data, model.cfg.history_len)
    rng = np.random.default_rng(0)
    n_items = len(p.items)
    sample = np.sort(rng.choice(n_items, min(SAMPLE_ITEMS, n_items), replace=False))
    unit = not model.normalize
    _check_largest_indexes(model)
    catalog_vocab = model.item_vocab.encode(p.items["item_id"].to_numpy())
    catalog_cat = model.schema.categories.encode(p.items["category"].to_numpy())
    if model.item_feeds is None:  # a user tower alone: its queries on a sample; no item tower to score them with
        rows = np.arange(len(p.hist_rows))
        rows = rows[p.split == TEST] if (p.split == TEST).any() else rows
        if len(rows) == 0:
            raise DataError(f"{data}: no interactions; the import runs the user tower on a sample of them")
        rows = np.sort(rng.choice(rows, min(SAMPLE_USERS, len(rows)), replace=False))
        q = _run("the user tower", user_queries, model, p, rows, catalog_vocab, catalog_cat)
        _check_vectors(q, "user", model.user_feeds.output, model.dim, unit)
        return {"sample_users": len(rows)}
    _check_vectors(
        _run("the item tower", model.encode_items, p.items.iloc[sample]),
        "item",
        model.item_feeds.output,
        model.dim,
        unit,
    )
    with_history = np.flatnonzero(p.hist_rows[:, 0] >= 0)
    rows = with_history[p.split[with_history] == TEST] if (p.split[with_history] == TEST).any() else with_history
    if len(rows) == 0:
        raise DataError(
            f"{data}: no interaction with an earlier one of the same user; the import needs histories "
            "to check that the towers share a space"
        )
    rows = np.sort(rng.choice(rows, min(SAMPLE_USERS, len(rows)), replace=False))
    q = _run("the user tower", user_queries, model, p, rows, catalog_vocab, catalog_cat)
    _check_vectors(q, "user", model.user_feeds.output, model.dim, unit)
    own = p.hist_rows[rows]
    rand = rng.integers(0, n_items, (len(rows), RANDOM_PER_USER))
    needed = np.unique(np.r_[own[own >= 0], rand.ravel()])
    vec = np.zeros((n_items, model.dim), np.float32)
    vec[needed] = model.encode_items(p.items.iloc[needed])
    aucs, own_mean, rand_mean = [], [], []
    for i in range(len(rows)):
        mine = own[i][own[i] >= 0]
        s_own, s_rand = vec[mine] @ q[i], vec[rand[i]] @ q[i]
        aucs.append(float((s_own[:, None] > s_rand[None, :]).mean() + 0.5 * (s_own[:, None] == s_rand[None, :]).mean()))
        own_mean.append(float(s_own.mean()))
        rand_mean.append(float(s_rand.mean()))
    auc = float(np.mean(aucs))
    checks = {
        "sample_users": len(rows),
        "sample_items": len(sample),
        "history_auc": round(auc, 4),
        "own_history_score": round(float(np.mean(own_mean)), 4),
        "random_item_score": round(float(np.mean(rand_mean)), 4),
    }
    if auc < min_auc:
        raise ConfigError(
            f"the towers do not seem to share one space: a user's own history items outscore random "
            f"items in {auc:.0%} of pairs (at least {min_auc:.0%} expected; mean score "
            f"{checks['own_history_score']} vs {checks['random_item_score']}); check that the user and "
            "item towers are from one model and the [ids] vocabularies match their tables"
        )
    return checks
