"""Per-value partitions: one small sub-index per value of a declared attribute (category first).

A filter on one or a few values of the partition attribute is answered by searching only their
partitions (each a whole sub-index of the host's backend, so an unfiltered walk over a graph that
holds just those items: no recall lost to a clustered mask) and merging the per-partition top-k by
score (`merge.merge_topk`). Values with fewer than `min_items` live items have no partition: their
items are scored by brute force over the host's own vectors, as the planner's exact path would.

Bookkeeping, all over the host's slots: `home[slot]` is the partition that indexes the slot under
its current value (-1: none). A sub-index's ids *are* host slots. Availability needs no change here
(the host's mask already drops hidden slots); an upsert adds the new slot to its value's partition;
an attribute change moves the slot (out of the old value's partition, into the new one's); a
removal or replacement takes the dead slot out of its partition too. Partitions start at build and
on any write of at least `min_items` items (a bulk add, attributes set over the catalog) for each
value that then has `min_items` unpartitioned items: counting a value means a pass over the
catalog, which a one-item live write does not pay; a value that grew one item at a time is
partitioned by the next build (its items are scanned until then, as any small value's are).

Memory: every partitioned item is stored once more (its vector and graph links in the sub-index,
plus the sub-index's slot tables); `memory()` reports it.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from towerann.artifacts import load_npy, save_npy
from towerann.errors import ArtifactError, ConfigError
from towerann.index.base import Growable, Mask, SlotIndex
from towerann.index.merge import merge_topk

log = logging.getLogger(__name__)

DEFAULT_MIN_ITEMS = 10_000
# A mask is "aligned" with the partitions when the partitions it touches hold at most this many
# times the qualifying items they cover; a filter on another attribute (touching every partition
# at a low share) is not, and the host answers it by brute force instead of walking every partition.
ALIGN_FACTOR = 4
DIR = "partitions"
# A graph walk at beam ef costs about as much as a scan of this many rows per unit of ef (20k x
# 128-d, M=32, one thread: ef=100 0.82 ms, a 20k-row scan 0.74 ms); a touched partition with fewer
# qualifying items than that is scanned with the rest instead of walked. It is the default of the
# search param partition_walk_cost, which calibration measures on the index (filter_plan.partition_walk_cost).
WALK_ROWS_PER_EF = 16


@dataclass
class Route:
    """Where one mask's qualifying slots live: partitions to walk (with their local masks) and the
    slots no walked partition covers (brute force)."""

    walk: list[tuple[int, Mask | None]]  # (partition, mask over its sub-index slots; None: every one qualifies)
    rest: Mask | None  # host slots scored by brute force (no partition, or too few in theirs)
    aligned: bool


class Partitions:
    """The partitions of one host index (a `SlotIndex` whose backend also builds the sub-indexes)."""

    def __init__(self, host: SlotIndex, by: str, min_items: int, sub_params: dict[str, Any]):
        if not isinstance(by, str) or not by:
            raise ConfigError(f"partition_by must be 'category' or a filter attribute name, got {by!r}")
        if int(min_items) < 1:
            raise ConfigError(f"partition_min must be >= 1, got {min_items}")
        self._host = weakref.ref(host)  # the host owns this object: no reference cycle
        self.backend = type(host)  # sub-indexes are of the host's backend
        self.by = by
        self.min_items = int(min_items)
        self.sub_params = dict(sub_params)
        self.values: list[int] = []  # partition -> attribute code
        self.subs: list[SlotIndex] = []
        self._pid = np.full(0, -1, np.int32)  # attribute code -> partition (-1: none)
        self.home = Growable(np.empty(0, np.int32))  # host slot -> partition indexing it (-1: none)
        self._routes: dict[tuple[int, int], tuple[Any, int, Route]] = {}
        self._version = 0

    @property
    def host(self) -> SlotIndex:
        host = self._host()
        assert host is not None, "partitions outlived their index"
        return host

    # ---- what the host tells us --------------------------------------------------------------
    def _codes(self) -> np.ndarray:
        """The partition attribute's code per host slot (-1: no value)."""
        h = self.host
        if self.by == "category":
            return h.slot_categories
        table = h.slot_attributes.get(self.by)
        return np.full(h.n_slots, -1, np.int32) if table is None else table

    def sync(self, slots: np.ndarray) -> None:
        """After the host added `slots` or changed their partition attribute: index each live one in
        its value's partition; a write of at least min_items slots also starts partitions for the
        values that now reach min_items."""
        h = self.host
        n = h.n_slots
        if self.home.n < n:
            self.home.extend(np.full(n - self.home.n, -1, np.int32))
        slots = np.asarray(slots, np.int64)
        slots = slots[h.slot_alive[slots]]
        if not len(slots):
            return
        codes = self._codes()
        want = self._partition_of(codes[slots])
        home = self.home.data
        moved = want != home[slots]
        self.forget(slots[moved])
        for pid in np.unique(want[moved]):
            if pid >= 0:
                self._add_to(int(pid), slots[moved & (want == pid)])
        if len(slots) >= self.min_items:
            self._start_partitions(codes, np.unique(codes[slots[want < 0]]))
        self._version += 1

    def forget(self, slots: np.ndarray) -> None:
        """Host slots that died or left their value: out of their partitions (so that a partition
        whose items all qualify is walked without a mask)."""
        slots = np.asarray(slots, np.int64)
        slots = slots[slots < self.home.n]
        home = self.home.data
        for pid in np.unique(home[slots]):
            if pid >= 0:
                self.subs[pid].remove(slots[home[slots] == pid])
        home[slots] = -1
        self._version += 1

    def _partition_of(self, codes: np.ndarray) -> np.ndarray:
        out = np.full(len(codes), -1, np.int32)
        known = (codes >= 0) & (codes < len(self._pid))
        out[known] = self._pid[codes[known]]
        return out

    def _start_partitions(self, codes: np.ndarray, candidates: np.ndarray) -> None:
        """A partition for each candidate value with at least min_items live, unpartitioned slots."""
        candidates = candidates[candidates >= 0]
        if not len(candidates):
            return
        h = self.host
        free = h.slot_alive & (self.home.data < 0) & (codes >= 0)
        counts = np.bincount(codes[free], minlength=int(candidates.max()) + 1)
        grow = [int(c) for c in candidates if counts[c] >= self.min_items]
        if not grow:
            return
        idx = np.flatnonzero(free & np.isin(codes, grow))
        order = np.argsort(codes[idx], kind="stable")
        idx = idx[order]
        bounds = np.searchsorted(codes[idx], grow + [int(codes[idx[-1]]) + 1])
        for value, lo, hi in zip(grow, bounds[:-1], bounds[1:]):
            members = idx[lo:hi]
            sub = self.backend(h.dim, h.metric, **self.sub_params)
            sub.build(h.vectors_of_slots(members), members)
            self._register(value, sub)
            self.home.data[members] = len(self.subs) - 1
            log.info("partition %s=%d: %d items", self.by, value, len(members))

    def _register(self, value: int, sub: SlotIndex) -> None:
        if value >= len(self._pid):
            grown = np.full(max(value + 1, 2 * len(self._pid)), -1, np.int32)
            grown[: len(self._pid)] = self._pid
            self._pid = grown
        self._pid[value] = len(self.subs)
        self.values.append(value)
        self.subs.append(sub)

    def _add_to(self, pid: int, slots: np.ndarray) -> None:
        self.subs[pid].add(self.host.vectors_of_slots(slots), slots)
        self.home.data[slots] = pid

    # ---- search ------------------------------------------------------------------------------
    @staticmethod
    def beam(k: int, params: dict[str, Any]) -> int:
        """A partition's ef: the index's, scaled (partition_ef_scale), never below k."""
        return max(k, int(round(int(params.get("ef", k)) * float(params.get("partition_ef_scale", 1.0)))))

    def route(self, mask: Mask, k: int, params: dict[str, Any]) -> Route:
        """The partitions (and brute-force rest) that cover a mask's qualifying slots; cached per
        (mask, k, beam). A partition is walked only when more of its items qualify than a walk costs."""
        per_ef = float(params.get("partition_walk_cost") or WALK_ROWS_PER_EF)
        min_walk = max(2 * k, int(per_ef * self.beam(k, params)))  # 2k: fewer, and a walk could miss some
        key = (id(mask), min_walk)
        hit = self._routes.get(key)
        if hit is not None and hit[0]() is mask and hit[1] == self._version:
            return hit[2]
        if len(self._routes) > 64:
            self._routes.clear()
        idx = mask.idx
        where = self.home.data[idx]
        counts = np.bincount(where + 1, minlength=len(self.subs) + 1)[1:]
        walk: list[tuple[int, Mask | None]] = []
        rest = [idx[where < 0]]
        covered = touched = 0
        for pid in np.flatnonzero(counts):
            members = self.subs[pid].slot_ids  # host slots, in the sub-index's slot order
            mine = (self.home.data[members] == pid) & self.subs[pid].slot_alive
            if counts[pid] <= min_walk:
                rest.append(members[mask.bits[members] & mine])
                continue
            if counts[pid] == len(members):  # every entry qualifies (nothing moved out, nothing hidden)
                walk.append((int(pid), None))
            else:
                bits = mask.bits[members] & mine
                walk.append((int(pid), Mask(bits=bits, count=int(counts[pid]))))
            covered += int(counts[pid])
            touched += len(members)
        rest_idx = np.sort(np.concatenate(rest))
        rest_mask = None
        if len(rest_idx):
            rest_mask = Mask.from_slots(rest_idx, len(mask.bits))
        route = Route(walk=walk, rest=rest_mask, aligned=touched <= ALIGN_FACTOR * covered)
        self._routes[key] = (weakref.ref(mask), self._version, route)
        return route

    def search(self, q: np.ndarray, k: int, params: dict[str, Any], mask: Mask) -> tuple[np.ndarray, np.ndarray]:
        """Top-k host slots: each touched partition searched on its own (its share of the mask
        decides, inside the sub-index, between its plain walk, post-filter and bitmap walk), the
        rest by brute force, merged by score."""
        r = self.route(mask, k, params)
        if not r.walk:  # every qualifying item is scanned: the exact path itself, no merge
            return self.host.exact_search_slots(q, k, mask)
        p = {**params, "filter_path": "auto", "filter_plan": [], "exact_below": 0, "ef": self.beam(k, params)}
        ids, scores = [], []
        for pid, local in r.walk:
            sub = self.subs[pid]
            slots, sc = sub.library_search_slots(q, k, p, local)
            ids.append(sub.ids_of_slots(slots))  # row by row: no copy of the sub's whole id table
            scores.append(sc)
        if r.rest is not None:
            s, sc = self.host.exact_search_slots(q, k, r.rest)
            ids.append(s)
            scores.append(sc)
        return merge_topk(ids, scores, k)

    # ---- accounting and persistence ------------------------------------------------------------
    def memory(self) -> dict[str, Any]:
        """Bytes the partitions add: their stored vectors and graphs (backend buffers), their slot
        tables, and the host's home table; per host item and per partitioned item."""
        items = sum(len(sub) for sub in self.subs)
        total = self.home.data.nbytes + self._pid.nbytes
        for sub in self.subs:
            bufs = sub.buffers() if hasattr(sub, "buffers") else []
            total += sum(b.nbytes for b in bufs)
            total += sub.slot_table_bytes()  # a sub-index holds no filter attributes
        n = max(len(self.host), 1)
        return {
            "partitions": len(self.subs),
            "items": items,
            "bytes": int(total),
            "bytes_per_item": round(total / n, 1),
            "bytes_per_partitioned_item": round(total / max(items, 1), 1),
        }

    def describe(self) -> dict[str, Any]:
        return {
            "by": self.by,
            "min_items": self.min_items,
            "values": list(self.values),
            "sizes": [len(sub) for sub in self.subs],
        }

    def save(self, directory: Path) -> dict[str, Any]:
        root = Path(directory) / DIR
        root.mkdir(exist_ok=True)
        save_npy(root / "home.npy", self.home.data)
        subs = []
        for pid, sub in enumerate(self.subs):
            d = root / str(pid)
            d.mkdir(exist_ok=True)
            subs.append({"value": self.values[pid], "manifest": sub.save(d)})
        return {"by": self.by, "min_items": self.min_items, "dir": DIR, "subs": subs}

    def load(self, directory: Path, state: dict[str, Any] | None) -> None:
        """Restore `save`'s partitions; a snapshot written without them (or for another attribute) is refused."""
        root = Path(directory) / DIR
        if (
            not isinstance(state, dict)
            or state.get("by") != self.by
            or int(state.get("min_items", -1)) != self.min_items
        ):
            raise ArtifactError(
                f"{directory}: the manifest's partitions {state and {k: state.get(k) for k in ('by', 'min_items')}} "
                f"do not match the build params (partition_by={self.by!r}, partition_min={self.min_items})"
            )
        home = load_npy(root / "home.npy").astype(np.int32)
        n = self.host.n_slots
        if home.shape != (n,) or (len(home) and (home.min() < -1 or home.max() >= len(state["subs"]))):
            raise ArtifactError(
                f"{root / 'home.npy'}: {home.shape}, values outside -1..{len(state['subs']) - 1}; "
                f"expected one partition per slot of {n}"
            )
        self.home = Growable(home)
        for pid, entry in enumerate(state["subs"]):
            sub = self.backend.load(root / str(pid), entry["manifest"])
            members = sub.slot_ids
            if len(members) and (members.min() < 0 or members.max() >= n):
                raise ArtifactError(f"{root / str(pid)}: partition holds slots outside 0..{n - 1}")
            self._register(int(entry["value"]), sub)
        self._version += 1
