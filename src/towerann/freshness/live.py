"""Item writes on the live bundle: new items searchable at once, availability and deletes at once.

Every write is checked, then appended to the delta log (durable), then applied to the bundle being
served; only then is it acknowledged. `replay` applies the log's entries after a bundle's cut-off to
a bundle - at startup, and to a freshly loaded bundle before it is swapped in - so an acknowledged
write survives restarts and rebuilds. Upserts are re-embedded with the bundle's own item tower; on a
vectors-only bundle (no towers) an upsert carries the item's vector, logged and replayed as it is.

Writes and swaps are serialised by `ItemWriter.lock`. Searches take no lock: the HTTP handlers run
on one event loop, and every change to the served index runs there too (`apply_on`), so a search never
overlaps an index write; a write whose log lives on the network runs in a thread and hands only its
final, IO-free step to the loop, so searches never wait on the log. Python callers that search from
other threads must hold the lock around their own writes.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pandas as pd

from towerann.data.attributes import attribute_key
from towerann.data.dataset import ITEM_RESERVED
from towerann.errors import BadRequest, NotFound, TowerannError
from towerann.freshness.deltalog import OPS, DeltaEntry, DeltaLog
from towerann.serving.bundle import RetrievalBundle
from towerann.serving.holder import BundleHolder
from towerann.serving.query import check_vector

log = logging.getLogger(__name__)

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

# Runs one change of the served bundle (no IO, fast) where searches cannot overlap it; drops its result.
ApplyOn = Callable[[Callable[[], object]], None]


def apply_here(change: Callable[[], object]) -> None:
    change()


# An upsert reaches the served index a slice of rows at a time, each one change of its own (apply_on),
# sized so that one holds the loop about this long: searches run between two slices. Applied whole, 50
# items added to a 1M-item HNSW graph held it ~30 ms (0.5 ms an item), and the drift benchmark's live
# ingest (1,000 items/s) put its per-second p99 at a median 66 ms.
SLICE_S = 0.002
FIRST_SLICE = 4  # rows in the first slice; the next ones are sized from the time it took


# An item row's vector on a vectors-only bundle (the item is its vector: there is no item tower).
VECTOR = "vector"


def check_rows(bundle: RetrievalBundle, rows: Any) -> list[dict[str, Any]]:
    """Validate item rows for an upsert; return them normalised (available defaults to true).

    On a model bundle a row carries the item tower's features; on a vectors-only bundle it carries
    `vector` instead (the bundle's dim, finite, not of near-zero norm; taken as it is, as the bundle's
    file was). A vector on a model bundle is refused: its item tower makes the vectors there."""
    if not isinstance(rows, list) or not rows:
        raise BadRequest("items must be a non-empty list of item objects")
    if bundle.vectors_only:
        numeric: list[str] = []
        categorical: list[str] = []
        inputs = f"{VECTOR} ({bundle.index.dim} numbers)"
    else:
        numeric, categorical = bundle.model.schema.item_feature_names()
        inputs = "the item features"
    attributes = [a for a in bundle.attribute_values if a not in {*ITEM_RESERVED, *numeric, *categorical}]
    known = {*ITEM_RESERVED, *numeric, *categorical, *attributes, *([VECTOR] if bundle.vectors_only else [])}
    int_ids = bundle.external_ids.dtype.kind in "iu"
    out, seen = [], set()
    for i, row in enumerate(rows):
        where = f"items[{i}]"
        if not isinstance(row, Mapping):
            raise BadRequest(f"{where}: expected an object with item_id, category and {inputs}")
        if VECTOR in row and VECTOR not in known:
            raise BadRequest(
                f"{where}.{VECTOR}: this bundle's item tower (model {bundle.model_version}) makes its vectors; "
                "send the item's features instead (vectors are written to vectors-only bundles)"
            )
        extra = set(row) - known
        if extra:
            takes = "a vectors-only bundle takes" if bundle.vectors_only else "the item tower takes"
            raise BadRequest(f"{where}: unknown fields {sorted(extra)}; {takes} {sorted(known)}")
        item_id = row.get("item_id")
        if not isinstance(item_id, str) or not item_id:
            raise BadRequest(f"{where}.item_id: a non-empty string is required")
        if int_ids and not (item_id.isascii() and item_id.lstrip("-").isdigit()):
            raise BadRequest(f"{where}.item_id: this catalog's item ids are integers, got {item_id!r}")
        if int_ids:
            if not INT64_MIN <= int(item_id) <= INT64_MAX:
                raise BadRequest(f"{where}.item_id: this catalog's item ids are 64-bit integers, got {item_id!r}")
            item_id = str(int(item_id))  # one spelling per id: "007" is item 7
        if item_id in seen:
            raise BadRequest(f"{where}.item_id: {item_id!r} appears twice in one request")
        seen.add(item_id)
        if not isinstance(row.get("category"), str) or not row["category"]:
            raise BadRequest(f"{where}.category: a non-empty string is required")
        available = row.get("available", True)
        if not isinstance(available, bool):
            raise BadRequest(f"{where}.available: true or false")
        clean: dict[str, Any] = {"item_id": item_id, "category": row["category"], "available": available}
        for name in numeric:
            v = row.get(name)
            try:  # float() first: a JSON integer may be too big for numpy (and for a float)
                number = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
            except OverflowError:
                number = math.nan
            if not math.isfinite(number):
                raise BadRequest(f"{where}.{name}: a finite number is required")
            clean[name] = number
        for name in categorical:
            v = row.get(name)
            if not isinstance(v, str):
                raise BadRequest(f"{where}.{name}: a string is required")
            clean[name] = v
        for name in attributes:  # filter attributes: optional (left out: the item keeps its value)
            if name in row:
                if row[name] is not None:  # null clears it
                    attribute_key(row[name], f"{where}.{name}")  # a string or a boolean, else 400
                clean[name] = row[name]
        if bundle.vectors_only:
            if VECTOR not in row:
                raise BadRequest(
                    f"{where}.{VECTOR}: required: this bundle has no item tower (vectors made elsewhere), so a "
                    f"new or changed item is its vector ({bundle.index.dim} numbers); PATCH /v1/items/{{id}} "
                    "changes availability alone"
                )
            # float32 values as Python floats: the log's JSON gives back exactly the vector indexed now
            clean[VECTOR] = [float(x) for x in item_vector(bundle, row[VECTOR], f"{where}.{VECTOR}")]
        out.append(clean)
    return out


def item_vector(bundle: RetrievalBundle, value: Any, where: str) -> np.ndarray:
    """An item's vector for a vectors-only bundle: float32 [dim], finite, not of near-zero norm; else 400."""
    v = check_vector(value, bundle.index.dim, where)
    if not usable(v[None, :])[0]:
        raise BadRequest(f"{where}: a vector of (near) zero norm has no direction (it scores ~0 for every query)")
    return v


# The towers give unit vectors. A norm under this is no direction at all (features far outside training
# drive every unit of the tower to 0): it scores ~0 for every user, above each item a user dislikes.
MIN_NORM = 1e-6
FAR_Z = 100.0  # standard deviations from the training mean: a feature value "far outside" what the model saw


def usable(vectors: np.ndarray) -> np.ndarray:
    """Per row: may the index hold this vector (finite, and not of near-zero norm)?"""
    with np.errstate(over="ignore", invalid="ignore"):
        ok: np.ndarray = np.isfinite(vectors).all(axis=1) & (np.linalg.norm(vectors, axis=1) >= MIN_NORM)
    return ok


def row_vectors(bundle: RetrievalBundle, rows: list[dict[str, Any]]) -> np.ndarray:
    """The vectors of checked rows (or logged upserts): their own on a vectors-only bundle, the item
    tower's otherwise. A row that gives no usable vector here is refused (BadRequest, naming it)."""
    if not bundle.vectors_only:
        for i, row in enumerate(rows):
            if VECTOR in row:  # logged while a vectors-only bundle was served: another space than this tower's
                raise BadRequest(
                    f"items[{i}] ({row.get('item_id')!r}): a vector written to a vectors-only bundle; this "
                    f"bundle's item tower (model {bundle.model_version}) makes its vectors from features"
                )
        return embed_rows(bundle, rows)
    out = np.empty((len(rows), bundle.index.dim), np.float32)
    for i, row in enumerate(rows):
        if VECTOR not in row:  # logged while a model bundle was served: no tower here to embed it
            raise BadRequest(f"items[{i}] ({row.get('item_id')!r}): no vector, and this bundle has no item tower")
        out[i] = item_vector(bundle, row[VECTOR], f"items[{i}].{VECTOR}")
    return out


def embed_rows(bundle: RetrievalBundle, rows: list[dict[str, Any]]) -> np.ndarray:
    """The bundle's item tower over checked rows; a row it cannot turn into a usable vector is refused."""
    frame = pd.DataFrame(rows)
    if bundle.external_ids.dtype.kind in "iu":
        frame["item_id"] = frame["item_id"].astype(np.int64)  # the item vocabulary holds the catalog's ints
    vectors = bundle.model.encode_items(frame)
    bad = ~usable(vectors)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        what = "a non-finite vector" if not np.isfinite(vectors[i]).all() else "a vector of (near) zero norm"
        raise BadRequest(
            f"items[{i}] ({rows[i]['item_id']!r}): the item tower gives {what} for these features "
            f"({far_features(bundle, rows[i])}); nothing was written"
        )
    return vectors


def far_features(bundle: RetrievalBundle, row: Mapping[str, Any]) -> str:
    """The row's numeric features far outside the training data, by the statistics in the model's schema."""
    far = []
    for c in bundle.model.schema.item_numeric:
        if (c.mean, c.std) == (0.0, 1.0):  # an imported model's inputs pass as they are: no statistics known
            continue
        v = row.get(c.name)
        if isinstance(v, float) and abs(v - c.mean) > FAR_Z * c.std:
            far.append(f"{c.name}={v:.3g}: trained on mean {c.mean:.3g}, std {c.std:.3g}")
    return "far outside the training data: " + "; ".join(far) if far else "a value far outside the catalog's range?"


def replay(bundle: RetrievalBundle, delta: DeltaLog, after: int | None = None) -> int:
    """Apply the log's entries with seq > `after` (default: the bundle's cut-off); return the last seq."""
    last = bundle.delta_seq if after is None else after
    return apply_entries(bundle, delta.since(last), last)


def apply_entries(bundle: RetrievalBundle, entries: Iterable[DeltaEntry], last: int | None = None) -> int:
    """Apply delta-log entries (in log order) to a bundle; return the last seq, now the bundle's delta_seq.

    An entry the bundle cannot apply (an upsert the item tower refuses) is skipped and logged, never
    fatal: one bad entry must not stop a server from starting or a new bundle from swapping in."""
    last = bundle.delta_seq if last is None else last
    pending: dict[str, dict[str, Any]] = {}  # consecutive upserts, embedded as one batch

    def flush() -> None:
        if pending:
            rows = list(pending.values())
            try:
                bundle.upsert(rows, row_vectors(bundle, rows))
            except TowerannError:  # one bad row spoils the batch: apply them one by one, skip the bad ones
                for row in rows:
                    try:
                        bundle.upsert([row], row_vectors(bundle, [row]))
                    except TowerannError as e:
                        log.error(
                            "delta log: skipped the upsert of item %r on bundle %s: %s",
                            row.get("item_id"),
                            bundle.version,
                            e,
                        )
            pending.clear()

    n = 0
    for entry in entries:
        if entry.op == "upsert":
            pending.pop(entry.item_id, None)
            pending[entry.item_id] = entry.payload
        elif entry.op in ("available", "delete"):
            flush()
            if entry.op == "available":
                bundle.set_available(entry.item_id, bool(entry.payload.get("available")))
            else:
                bundle.remove(entry.item_id)
        else:  # a newer version's op or a hand-edited log: guessing (it was once taken as a delete) loses items
            log.warning(
                "delta log: skipped entry %d (item %r) on bundle %s: unknown op %r; this version applies %s",
                entry.seq,
                entry.item_id,
                bundle.version,
                entry.op,
                ", ".join(OPS),
            )
        last, n = entry.seq, n + 1
    flush()
    bundle.delta_seq = last
    if n:
        log.info("applied %d delta-log entries onto bundle %s (up to seq %d)", n, bundle.version, last)
    return last


class ItemWriter:
    """Item writes through the delta log onto the holder's current bundle (serving.app.ItemWrites).

    A write is checked and embedded first, logged second, applied third: the log only ever holds
    what the bundle would accept. `apply_on` runs the third step (default: right here).

    `shared`: other processes (the other workers of `towerann serve --workers N`) write to the same
    log. Then a write first applies the entries they logged since this bundle's delta_seq (so its
    checks see their items), and applies its own entries after every entry logged before them, in
    log order: two workers' writes to one item end the same way on every worker. `catch_up` applies
    the others' writes between two of ours (server.workers calls it every [freshness] tail_ms and
    before a search that is behind another worker's acknowledged write)."""

    def __init__(self, holder: BundleHolder, delta: DeltaLog, shared: bool = False):
        self.holder, self.delta, self.shared = holder, delta, shared
        self.lock = threading.Lock()
        # called with the last seq of each write once it is applied, before it is acknowledged
        self.on_written: Callable[[int], None] | None = None

    def upsert(self, rows: Any, apply_on: ApplyOn = apply_here) -> dict[str, Any]:
        with self.lock:
            b = self._caught_up(apply_on)
            clean = check_rows(b, rows)
            vectors = row_vectors(b, clean)  # before logging: a row the tower cannot take is refused, not logged
            entries = self.delta.append_many([("upsert", r["item_id"], r) for r in clean])
            last = entries[-1].seq
            self._apply_own(b, entries[0].seq, last, self._upsert_slices(b, clean, vectors, entries), apply_on)
        return {"upserted": len(clean), "seq": last, "index_version": b.version}

    @staticmethod
    def _upsert_slices(
        b: RetrievalBundle, rows: list[dict[str, Any]], vectors: np.ndarray, entries: list[DeltaEntry]
    ) -> Iterator[Callable[[], object]]:
        """The upsert of `rows` as changes of a slice of rows each (SLICE_S), in order; each advances the
        bundle's delta_seq to its last row's entry."""
        start, size = 0, FIRST_SLICE
        while start < len(rows):
            end = min(len(rows), start + size)
            took = [0.0]

            def change(s: int = start, e: int = end, took: list[float] = took) -> None:
                t0 = time.perf_counter()
                b.upsert(rows[s:e], vectors[s:e], entries[e - 1].seq)
                took[0] = time.perf_counter() - t0

            yield change
            size = max(1, min(4 * size, round(size * SLICE_S / max(took[0], 1e-6))))
            start = end

    def set_available(self, item_id: str, available: bool, apply_on: ApplyOn = apply_here) -> dict[str, Any]:
        if not isinstance(available, bool):
            raise BadRequest("available must be true or false")
        with self.lock:
            b = self._known(item_id, apply_on)
            seq = self.delta.append("available", item_id, {"available": available}).seq
            self._apply_own(b, seq, seq, [lambda: b.set_available(item_id, available, seq)], apply_on)
        return {"item_id": item_id, "available": available, "seq": seq}

    def delete(self, item_id: str, apply_on: ApplyOn = apply_here) -> dict[str, Any]:
        with self.lock:
            b = self._known(item_id, apply_on)
            seq = self.delta.append("delete", item_id, {}).seq
            self._apply_own(b, seq, seq, [lambda: b.remove(item_id, seq)], apply_on)
        return {"item_id": item_id, "deleted": True, "seq": seq}

    def catch_up(self, apply_on: ApplyOn = apply_here) -> int:
        """Apply the entries other processes logged since the served bundle's delta_seq; return how many."""
        with self.lock:
            if not self.holder.ready:
                return 0
            return self._apply_since(self.holder.current(), apply_on)

    def _apply_since(self, b: RetrievalBundle, apply_on: ApplyOn) -> int:
        entries = list(self.delta.since(b.delta_seq))
        if entries:
            apply_on(lambda: apply_entries(b, entries))
        return len(entries)

    def _caught_up(self, apply_on: ApplyOn) -> RetrievalBundle:
        """The served bundle, with the other processes' writes applied first (under self.lock)."""
        b = self.holder.current()
        if self.shared:
            self._apply_since(b, apply_on)
        return b

    def _apply_own(
        self, b: RetrievalBundle, first: int, last: int, own: Iterable[Callable[[], object]], apply_on: ApplyOn
    ) -> None:
        """Apply our logged entries (seqs first..last; `own`: their changes, one apply_on each) after
        those the other processes logged before them, then say so (on_written), all before the write is
        acknowledged."""
        before = [e for e in self.delta.since(b.delta_seq) if e.seq < first] if self.shared else []
        if before:
            apply_on(lambda: apply_entries(b, before))
        for change in own:
            apply_on(change)
        if self.on_written is not None:
            self.on_written(last)

    def _known(self, item_id: str, apply_on: ApplyOn) -> RetrievalBundle:
        b = self._caught_up(apply_on)
        if not b.holds(item_id):
            raise NotFound(f"item {item_id!r} is not in the served catalog (bundle {b.version}), or was deleted")
        return b


def fold_catalog(items: pd.DataFrame, entries: Iterable[Any]) -> pd.DataFrame:
    """The catalog with delta-log entries applied: what a rebuild embeds."""
    frame = items.copy()
    key = frame["item_id"].astype(str)
    pos = dict(zip(key, range(len(frame))))
    added: dict[str, dict[str, Any]] = {}
    dropped: set[str] = set()
    for e in entries:
        if e.op == "upsert":
            row = dict(e.payload)
            dropped.discard(e.item_id)
            if e.item_id in pos:
                for col, v in row.items():
                    if col != "item_id" and col in frame.columns:
                        frame.iat[pos[e.item_id], frame.columns.get_loc(col)] = v
            else:
                added[e.item_id] = row
        elif e.op == "available":
            if e.item_id in pos:
                frame.iat[pos[e.item_id], frame.columns.get_loc("available")] = bool(e.payload.get("available"))
            elif e.item_id in added:
                added[e.item_id]["available"] = bool(e.payload.get("available"))
        elif e.op == "delete":
            added.pop(e.item_id, None)
            if e.item_id in pos:
                dropped.add(e.item_id)
        else:  # as apply_entries: skipped, never guessed
            log.warning(
                "delta log: skipped entry %d (item %r) in the rebuild: unknown op %r; this version applies %s",
                e.seq,
                e.item_id,
                e.op,
                ", ".join(OPS),
            )
    if added:
        new = pd.DataFrame(list(added.values()))
        if frame["item_id"].dtype.kind in "iu":
            new["item_id"] = new["item_id"].astype(np.int64)
        frame = pd.concat([frame, new[frame.columns.intersection(new.columns)]], ignore_index=True)
    if dropped:
        frame = frame[~frame["item_id"].astype(str).isin(dropped)].reset_index(drop=True)
    return frame
