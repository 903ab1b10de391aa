"""The retrieval bundle: what is served and swapped as one unit.

user tower + item index + id map (internal int64 <-> external item id) + filter attributes
(category per item, and the [filters] attributes: codes in the index's slot tables, vocabularies
here), one version. A request can never pair a user tower with an index built by
another item tower, because both are loaded from the same directory and checked against each other.

On disk a bundle is an index snapshot directory (the layout `towerann.index.snapshot` reads, with
its CURRENT pointer and checksums over every file) that also holds:
  model/              a copy of the model directory (user_tower.onnx, vocabularies, manifest)
  external_ids.npy    the catalog's item id per internal id (int64 or unicode)
  item_categories.npy category code per internal id (codes index bundle.category_names)
  item_lookup_keys.npy, item_lookup_order.npy   the ids sorted, and each one's internal id (older
                      bundles lack them: the lookup is then sorted at load)
These tables are memory-mapped by a load (serving.item_tables): the server reads only the rows a
request or a write touches, and keeps what live writes add in memory.
and `{"bundle": {...}}` in the snapshot manifest (with "attributes": {name: [value, ...]}, code i =
value i); `towerann.freshness.publish.publish_bundle` writes it with `snapshot.publish`.

A *vectors-only* bundle (vectors made elsewhere, `towerann refresh --vectors FILE`) has no model/:
its manifest says `"bundle": {"model": null, "space_id": S, ...}`, where S names the vector space
(the snapshot's model_version is S too, e.g. "external-<checksum>"), and it holds
`validation_queries.npy` (a sample of query vectors from that space, for the reload's recall check).
It is served as it is: requests send `query_vector`; one with `user_id` is a 400 (no user tower),
and so is an item write that needs the item tower. `vectors_only` is True; `model` and `encoder`
are stand-ins whose every use raises that 400. Given a model explicitly (`serve --model DIR`, which
RetrievalBundle.load takes as `given_model`) whose manifest declares the same space id and dim (a
user tower imported alone, `towerann model import --user-tower U.onnx --space-id S`, or a full import
with --space-id), its user tower is attached: `user_id` requests run it over the user's features and
search, `has_user_tower` is True, and `model` stays the stand-in (there is still no item tower).

Which model may serve which bundle is decided in one place, `check_pairing`, which every load goes
through (start-up and the reload's): a vectors-only bundle pairs by declared space id (and dim), any
other bundle only with the model whose item tower built its index (by version).

The bundle owns its changes (`upsert`, `set_available`, `remove`): the index call comes first and
the id map and categories change only after it succeeded, so a failing write leaves the bundle as
it was. Callers serialise writes (freshness.live.ItemWriter holds a lock); requests read without one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from towerann.artifacts import load_npy, read_manifest, sha256_file
from towerann.data.attributes import attribute_key, read_vector_attributes
from towerann.data.vectors_dir import read_vectors
from towerann.errors import ArtifactError, BackendUnavailable, BadRequest, IndexIncompatible
from towerann.index import Index, load
from towerann.index.snapshot import FORMAT_VERSION, KIND, read_checked_manifest, resolve
from towerann.serving.item_tables import IdLookup, ItemColumn

if TYPE_CHECKING:
    from towerann.model.export import UserEncoder
    from towerann.model.model import TwoTowerModel

BUNDLE_FORMAT = 1
VALIDATION_QUERIES_FILE = "validation_queries.npy"  # a vectors-only bundle's sample queries
NO_USER_TOWER = (
    "this bundle has no user tower (vectors made elsewhere): send query_vector, or serve it with a user tower "
    "of its vector space (`towerann model import --user-tower U.onnx --space-id S`, then `towerann serve --model DIR`)"
)
NO_ITEM_TOWER = (
    "this bundle has no item tower (vectors made elsewhere): write an item with its `vector` (POST "
    "/v1/items) or publish a new file with `towerann refresh --vectors FILE`"
)


class _NoTower:
    """The model or user encoder of a vectors-only bundle: every use is a BadRequest (HTTP 400) that
    says what to send instead, so no path that needs a tower can fail with an AttributeError."""

    def __init__(self, message: str):
        self._message = message

    def __getattr__(self, name: str) -> Any:
        raise BadRequest(self._message)


def space_id_of(path: Path) -> str | None:
    """The vector space of a vectors-only bundle directory (its manifest's bundle.space_id), else None."""
    try:
        return _space_of(read_manifest(path, KIND, FORMAT_VERSION))
    except ArtifactError:
        return None


def _space_of(manifest: Mapping[str, Any]) -> str | None:
    info = manifest.get("bundle")
    if isinstance(info, dict) and "model" in info and info["model"] is None and info.get("space_id"):
        return str(info["space_id"])
    return None


def check_pairing(path: Path, model_dir: str | Path) -> None:
    """The pairing rule: may the model in `model_dir` serve the bundle (or plain snapshot) at `path`?
    Every RetrievalBundle.load that is given a model comes through here, so start-up and reload agree.

    - a vectors-only bundle (space S, dim d): the model must declare space_id S (`model import
      --space-id S`) and its vectors must have dim d; the pair is made by that declared name, never
      by a version that happens to match;
    - any other bundle: its index was built from an item tower, and only the model of that version
      serves it; a user tower imported alone built no index, so it serves none of these.
    Refused with IndexIncompatible: one line naming both values (versions, space ids, dims; no secrets)."""
    from towerann.model.imported import model_facts

    path = Path(path)
    facts = model_facts(model_dir)
    m = read_manifest(path, KIND, FORMAT_VERSION)
    space = _space_of(m)
    if space is not None:
        dim = m.get("dim")
        if facts.space_id is None:
            raise IndexIncompatible(
                f"{path} is a vectors-only bundle of space {space!r}, but model {facts.version!r} at {model_dir} "
                f"declares no space id; import its user tower with `towerann model import ... --space-id {space}`"
            )
        if facts.space_id != space:
            raise IndexIncompatible(
                f"space id mismatch: {path} holds vectors of space {space!r}, model {facts.version!r} at "
                f"{model_dir} declares space {facts.space_id!r}; serve it with a user tower of space {space!r}"
            )
        if facts.dim != dim:
            raise IndexIncompatible(
                f"dim mismatch: {path} holds vectors of dim {dim} (space {space!r}), model {facts.version!r} "
                f"at {model_dir} gives vectors of dim {facts.dim}"
            )
        return
    own = path / "model"
    built_by = str(read_manifest(own, "model", 1)["model_version"]) if own.is_dir() else str(m.get("model_version"))
    if facts.user_only:
        raise IndexIncompatible(
            f"{path} was built from the item tower of model {built_by!r}, but {model_dir} is a user tower "
            f"imported alone (model {facts.version!r}, space {facts.space_id!r}): it serves only a vectors-only "
            f"bundle of its space (`towerann refresh --vectors FILE --space-id {facts.space_id}`)"
        )
    if facts.version != built_by:
        if own.is_dir():
            raise IndexIncompatible(
                f"{path} carries model {built_by!r}, but {model_dir} is {facts.version!r}; drop --model to "
                "serve the bundle's own"
            )
        raise IndexIncompatible(
            f"{path}: index built from item tower {built_by!r}, but the user tower is {facts.version!r}; "
            "rebuild the index from this model's item vectors"
        )


def _check_front_files(path: Path, model_version: str, dim: int) -> None:
    """The pairing and the checksums of the files this process reads itself (model/, the id map):
    not the shards' files, which the processes holding them check."""
    m = read_checked_manifest(path, model_version, dim, verify=False)
    for name, digest in m["checksums"].items():
        if not name.startswith("shard-") and sha256_file(path / name) != digest:
            raise ArtifactError(f"{path / name}: checksum mismatch (file corrupted or replaced); republish the bundle")


@dataclass
class RetrievalBundle:
    """Everything one request needs, from one directory, checked to belong together."""

    path: Path
    version: str  # the snapshot (index) version
    model_version: str
    model: TwoTowerModel
    encoder: UserEncoder
    index: Index
    external_ids: ItemColumn  # external item id per internal id
    category_names: list[str]
    category_code: dict[str, int]  # category name -> filter code
    item_internal: IdLookup  # str(external id) -> internal id
    item_model_cat: ItemColumn  # internal id -> the model's category code (user-tower history input)
    history_len: int
    delta_seq: int = 0  # delta-log entries up to this seq are in the bundle (cut-off, then replays)
    # [filters] attributes: name -> values (code i = value i; the codes live in the index's slot tables)
    attribute_values: dict[str, list[str]] = field(default_factory=dict)
    attribute_code: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> value -> code
    vectors_only: bool = False  # no item tower: `model` is a stand-in (400 on use); `encoder` too, unless paired
    validation_queries: np.ndarray | None = None  # vectors-only: sample queries for the reload's check
    space_id: str | None = None  # vectors-only: the vector space its manifest declares
    has_user_tower: bool = True  # False: a vectors-only bundle served with no model (query_vector requests only)

    @classmethod
    def load(
        cls,
        directory: str | Path,
        model_dir: str | Path | None = None,
        runtime: str = "onnx",
        index_loader: Callable[[Path], Index] | None = None,
        *,
        given_model: str | Path | None = None,
    ) -> RetrievalBundle:
        """Load a bundle directory, or a root's CURRENT bundle; refuse a mismatched pairing.

        A plain index snapshot (from `towerann index build`) is served too when `model_dir` is given:
        the id map and categories then come from the vectors directory its manifest names. A sharded
        index loads its shards into this process, unless `index_loader(version directory)` opens the
        index elsewhere (cluster.ray_shards: shards on Ray actors, which check their own files).
        A vectors-only bundle ignores `model_dir` (a default such as [paths] model does not apply to it).

        `given_model`: the model given for this bundle explicitly (`serve --model DIR`), whatever the
        bundle's kind: `check_pairing` decides whether it may serve it (refused: IndexIncompatible);
        it then serves a plain snapshot, is checked against a bundle's own model, and lends a
        vectors-only bundle of its space its user tower.
        """
        from towerann.model.export import UserEncoder
        from towerann.model.model import TwoTowerModel

        path = resolve(directory)
        own = (path / "model").is_dir()
        if given_model is not None:
            check_pairing(path, given_model)
            if not own:
                model_dir = given_model
        if not own:
            space = space_id_of(path)
            if space is not None:
                return cls._load_vectors_only(path, space, index_loader, given_model, runtime)
        if own:
            if model_dir is not None and Path(model_dir).resolve() != (path / "model").resolve():
                check_pairing(path, model_dir)
            model_dir = path / "model"
        elif model_dir is None:
            raise ArtifactError(
                f"{path}: no model/ directory; this is a plain index snapshot - give the model "
                "directory it was built from (--model), or publish a bundle (publish_bundle)"
            )
        elif given_model is None:
            check_pairing(path, model_dir)
        model_dir = Path(model_dir)
        model = TwoTowerModel.load(model_dir)
        if index_loader is None:
            index = load(path, expected_model_version=model.version, expected_dim=model.dim)
        else:
            _check_front_files(path, model.version, model.dim)
            index = index_loader(path)
            if index.version != path.name:
                raise ArtifactError(f"{path}: the index loader opened version {index.version}, not {path.name}")
        m = index.manifest or {}
        if m.get("metric") != model.metric:
            raise IndexIncompatible(f"{path}: index metric {m.get('metric')!r} != model metric {model.metric!r}")
        info = m.get("bundle")
        if info is not None:
            external_ids, item_cats, names, attr_values = _bundle_tables(path, info, index)
        else:
            vectors_dir = m.get("vectors_dir")
            if not vectors_dir:
                raise ArtifactError(
                    f"{path}/manifest.json: neither 'bundle' nor 'vectors_dir'; publish a bundle instead"
                )
            vs = read_vectors(vectors_dir)
            external_ids, names = vs.external_ids, [str(n) for n in vs.category_names]
            # a plain snapshot filters on the attributes its index was built with
            attr_values = {
                a: vals
                for a, (_, vals) in read_vector_attributes(vectors_dir, verify=False).items()
                if a in index.attribute_names
            }
            item_cats = np.full(len(external_ids), -1, np.int32)
            item_cats[vs.ids] = vs.categories
        if item_cats.shape != external_ids.shape:
            raise ArtifactError(f"{path}: item categories and external ids differ in length; republish")
        return cls(
            path=path,
            version=path.name,
            model_version=model.version,
            model=model,
            encoder=UserEncoder(model, model_dir, runtime=runtime),
            index=index,
            external_ids=ItemColumn(external_ids),
            category_names=names,
            category_code={n: i for i, n in enumerate(names)},
            item_internal=IdLookup.from_directory(path, external_ids),
            item_model_cat=ItemColumn(item_cats, _model_categories(model, names)),
            history_len=model.cfg.history_len,
            delta_seq=int((info or {}).get("delta_seq", 0)),
            attribute_values=attr_values,
            attribute_code={a: {v: i for i, v in enumerate(vals)} for a, vals in attr_values.items()},
        )

    @classmethod
    def _load_vectors_only(
        cls,
        path: Path,
        space: str,
        index_loader: Callable[[Path], Index] | None,
        model_dir: str | Path | None = None,
        runtime: str = "onnx",
    ) -> RetrievalBundle:
        """A bundle with no model: index, id map, categories, attributes and sample queries; with
        `model_dir` (check_pairing allowed it) that model's user tower too."""
        if index_loader is None:
            index = load(path, expected_model_version=space)
        else:
            _check_front_files(path, space, int(read_manifest(path, KIND, FORMAT_VERSION)["dim"]))
            index = index_loader(path)
        info = (index.manifest or {}).get("bundle")
        external_ids, item_cats, names, attr_values = _bundle_tables(path, info, index)
        if item_cats.shape != external_ids.shape:
            raise ArtifactError(f"{path}: item categories and external ids differ in length; republish")
        file = path / VALIDATION_QUERIES_FILE
        queries = load_npy(file) if file.is_file() else None
        if queries is not None and (queries.ndim != 2 or queries.shape[1] != index.dim):
            raise ArtifactError(f"{file}: not [n, {index.dim}] query vectors; republish the bundle")
        assert isinstance(info, dict)  # _bundle_tables checked it
        encoder: Any = _NoTower(NO_USER_TOWER)  # a stand-in: 400 on every use
        model_version, history_len = space, 0
        item_model_cat = np.zeros(len(names) + 1, np.int64)  # no user tower reads it
        if model_dir is not None:
            from towerann.model.export import UserEncoder
            from towerann.model.model import TwoTowerModel

            model = TwoTowerModel.load(model_dir)
            metric = (index.manifest or {}).get("metric")
            if model.dim != index.dim or model.metric != metric:
                raise IndexIncompatible(
                    f"{path}: vectors of dim {index.dim}, metric {metric!r} (space {space!r}); model "
                    f"{model.version!r} at {model_dir} gives dim {model.dim}, metric {model.metric!r}"
                )
            encoder = UserEncoder(model, model_dir, runtime=runtime)
            model_version, history_len = model.version, model.cfg.history_len
            item_model_cat = _model_categories(model, names)
        return cls(
            path=path,
            version=path.name,
            model_version=model_version,
            model=_NoTower(NO_ITEM_TOWER),  # type: ignore[arg-type]  # a stand-in: 400 on every use
            encoder=encoder,
            index=index,
            external_ids=ItemColumn(external_ids),
            category_names=names,
            category_code={n: i for i, n in enumerate(names)},
            item_internal=IdLookup.from_directory(path, external_ids),
            item_model_cat=ItemColumn(item_cats, item_model_cat),
            history_len=history_len,
            delta_seq=int(info.get("delta_seq", 0)),
            attribute_values=attr_values,
            attribute_code={a: {v: i for i, v in enumerate(vals)} for a, vals in attr_values.items()},
            vectors_only=True,
            validation_queries=queries,
            space_id=space,
            has_user_tower=model_dir is not None,
        )

    # ---- changes: each one all-or-nothing, the index first ------------------------------------------
    def _model_category_code(self) -> Callable[[str], int]:
        """An item's category code for the user tower's history input: the model's vocabulary, a paired
        user tower's on a vectors-only bundle, else 0 (no user tower reads it)."""
        if not self.vectors_only:
            return self.model.schema.categories.encode_one
        if self.has_user_tower:
            return self.encoder.schema.categories.encode_one
        return lambda name: 0

    def upsert(self, rows: Sequence[Mapping[str, Any]], vectors: np.ndarray, seq: int | None = None) -> None:
        """Add or replace items: rows of {item_id (the catalog's spelling, as a string), category,
        available} with one vector each. Nothing changes when the index refuses the vectors."""
        int_ids = self.external_ids.dtype.kind in "iu"
        encode_cat = self._model_category_code()
        n = len(rows)
        internal = np.empty(n, np.int64)
        codes = np.empty(n, np.int32)
        new_ids: dict[str, int] = {}  # external id -> new internal id
        new_model_cats: dict[str, int] = {}  # external id -> the model's category code
        new_names: dict[str, int] = {}  # category never seen by this bundle -> its new filter code
        recoded: dict[int, int] = {}  # existing internal id -> its new model category
        for j, row in enumerate(rows):
            item_id, category = row["item_id"], row["category"]
            iid = self.item_internal.get(item_id)
            if iid is None:
                iid = new_ids.setdefault(item_id, len(self.external_ids) + len(new_ids))
                new_model_cats[item_id] = encode_cat(category)
            else:
                recoded[iid] = encode_cat(category)
            internal[j] = iid
            code = self.category_code.get(category)
            if code is None:
                code = new_names.setdefault(category, len(self.category_names) + len(new_names))
            codes[j] = code
        available = np.asarray([bool(r.get("available", True)) for r in rows], bool)
        attrs, new_values = self._attribute_codes(rows, internal)
        self.index.add(vectors, internal, codes, available, attrs)  # may raise: nothing below has run yet
        if new_ids:
            if int_ids:
                ext = np.asarray([int(i) for i in new_ids], np.int64)
            else:  # a longer id may need a wider unicode dtype
                ext = np.asarray(list(new_ids))
                ext = ext.astype(np.result_type(self.external_ids.dtype, ext.dtype))
            model_cats = np.fromiter(new_model_cats.values(), np.int64, len(new_ids))
            self.external_ids.append(ext)
            self.item_model_cat.append(model_cats)
            for item_id, iid in new_ids.items():
                self.item_internal[item_id] = iid
        for iid, cat in recoded.items():
            self.item_model_cat[iid] = cat
        for name, code in new_names.items():
            self.category_names.append(name)
            self.category_code[name] = code
        for attr, values in new_values.items():
            for value, code in values.items():
                self.attribute_values[attr].append(value)
                self.attribute_code[attr][value] = code
        self._advance(seq)

    def _attribute_codes(
        self, rows: Sequence[Mapping[str, Any]], internal: np.ndarray
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, int]]]:
        """Per attribute, the rows' codes: a value given (null: no value, -1), else the item's current
        one (an upsert that leaves an attribute out keeps it, as a rebuild from the folded catalog does).
        Also the values this bundle never saw, with their new codes (appended once the write succeeded)."""
        current = self.index.attribute_codes(internal) if self.attribute_values else {}
        codes: dict[str, np.ndarray] = {}
        new: dict[str, dict[str, int]] = {}
        for attr, vocab in self.attribute_code.items():
            out = current.get(attr, np.full(len(rows), -1, np.int32)).copy()
            added = new.setdefault(attr, {})
            for j, row in enumerate(rows):
                if attr not in row:
                    continue
                value = row[attr]
                if value is None:
                    out[j] = -1
                    continue
                key = attribute_key(value, f"items[{j}].{attr}")
                code = vocab.get(key)
                if code is None:
                    code = added.setdefault(key, len(self.attribute_values[attr]) + len(added))
                out[j] = code
            codes[attr] = out
        return codes, new

    def set_available(self, item_id: str, available: bool, seq: int | None = None) -> bool:
        """Hide or show an item from the next search on; False if the bundle does not hold it (any more)."""
        iid = self._live(item_id)
        if iid is not None:
            self.index.set_available([iid], available)
        self._advance(seq)
        return iid is not None

    def remove(self, item_id: str, seq: int | None = None) -> bool:
        """Delete an item for good; False if the bundle does not hold it (any more)."""
        iid = self._live(item_id)
        if iid is not None:
            self.index.remove([iid])
        self._advance(seq)
        return iid is not None

    def holds(self, item_id: str) -> bool:
        """The item is in the index now (not removed; unavailable items are held)."""
        return self._live(item_id) is not None

    def _live(self, item_id: str) -> int | None:
        iid = self.item_internal.get(item_id)
        return iid if iid is not None and iid in self.index else None

    def _advance(self, seq: int | None) -> None:
        if seq is not None:
            self.delta_seq = max(self.delta_seq, int(seq))

    def describe(self) -> dict[str, Any]:
        """What /readyz and the logs show. `items` is None while shards of a sharded index are missing:
        counting asks every shard, and one that is down (or restarting) cannot answer."""
        missing = getattr(self.index, "missing_shards", lambda: ())()
        try:
            items = None if missing else len(self.index)
        except BackendUnavailable:
            items = None
        out = {
            "path": str(self.path),
            "index_version": self.version,
            "model_version": self.model_version,
            "index": self.index.describe(),
            "items": items,
            "delta_seq": self.delta_seq,
        }
        if self.space_id is not None:  # vectors-only: the space, and whether a user tower serves user_id
            out |= {"space_id": self.space_id, "user_tower": self.has_user_tower}
        return out


def _model_categories(model: TwoTowerModel, names: list[str]) -> np.ndarray:
    """The model's category code per bundle category code (the user tower's history input: the model
    codes categories by its own vocabulary), then 0 for an item with none (code -1 reads it)."""
    return np.array([model.schema.categories.encode_one(n) for n in names] + [0], np.int64)


def _bundle_tables(
    path: Path, info: Any, index: Index
) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, list[str]]]:
    """A bundle's id map, category per internal id, category names and attribute vocabularies."""
    if not isinstance(info, dict) or info.get("format") != BUNDLE_FORMAT or "category_names" not in info:
        raise ArtifactError(f"{path}/manifest.json: field 'bundle' is of another format; republish the bundle")
    # memory-mapped: read only where a request or a write touches them (item_tables)
    external_ids = load_npy(path / "external_ids.npy", mmap=True)
    item_cats = load_npy(path / "item_categories.npy", mmap=True)
    names = [str(n) for n in info["category_names"]]
    attr_values = {str(a): [str(v) for v in vals] for a, vals in (info.get("attributes") or {}).items()}
    if sorted(attr_values) != index.attribute_names:
        raise ArtifactError(
            f"{path}: the bundle lists attributes {sorted(attr_values)}, its index holds "
            f"{index.attribute_names}; republish the bundle"
        )
    return external_ids, item_cats, names, attr_values
