"""A resumable, part-by-part ivfpq build from a vectors directory (`index build --kind ivfpq --resume-dir`).

A build of a big catalog runs for hours; killed (an out-of-memory kill, a reboot, a spot machine
taken back), it should go on from where it stopped, not start again. Here every step writes its
outputs into a work directory under a temp name, then a rename, and progress.json lists the steps
done:

  train     the rows IVFPQIndex.training_rows picks, read from their parts -> trained.faiss
  encode i  the vectors directory's part i -> its rows' inverted lists and PQ codes
            (part-NNNNN.lists.npy, part-NNNNN.codes.npy)
  assemble  every row placed in inverted-list order and written as the files of an ivfpq snapshot
            (IVFPQIndex.save's layout) into work/assembled, then loaded from there (mapped)

Run again with the same work directory, a build skips the steps done; with other inputs (another
catalog, other build params) it is refused with the difference named. The index is the one an
in-memory build over the same vectors gives: the same training sample, codes and list order.
What it holds in RAM at once: one part's vectors, the training sample, and the slot tables (ids,
category codes, availability: 13 bytes an item), never the whole catalog's vectors.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import faiss
import numpy as np
from tqdm import tqdm

from towerann.artifacts import atomic_dir, load_npy, read_manifest, save_npy, write_json_atomic
from towerann.data.vectors_dir import FORMAT_VERSION as VECTORS_FORMAT
from towerann.data.vectors_dir import KIND as VECTORS_KIND
from towerann.errors import ArtifactError, ConfigError
from towerann.index.base import LOOKUP_FILES, narrowed_codes
from towerann.index.ivfpq import LAYOUT, LISTS, MIN_TRAIN, STARTS, IVFPQIndex, lists_layout, skeleton
from towerann.index.vecfile import encode, row_format

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
TRAINED = "trained.faiss"
ASSEMBLED = "assembled"
ENCODE_ROWS = 1 << 16  # rows assigned and encoded per faiss call (the quantizer's scores: 64k x nlist floats)
BUCKET_BYTES = 1 << 29  # rows of one slot range spilled together, then sorted in RAM and written as one run


def _part_files(i: int) -> tuple[str, str]:
    return f"part-{i:05d}.lists.npy", f"part-{i:05d}.codes.npy"


class PartSource(Protocol):
    """Where a resumable build reads the catalog, a part at a time (each part is read up to three times:
    for the training sample, to encode it, to place it): a vectors directory, or a seeded generator
    (data.synth_vectors.FarOffParts: no vectors file on disk at all)."""

    dim: int
    metric: str

    def part_counts(self) -> list[int]: ...

    def part(self, i: int, verify: bool) -> tuple[np.ndarray, np.ndarray]:
        """Part i's (float32 vectors [c, dim], int64 item ids [c]); verify: check it against its checksum."""
        ...

    def attributes(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(category code int32, available bool) of items `ids`."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the catalog (JSON): a work directory of another one is refused."""
        ...


class VectorsDirSource:
    """A vectors directory (`towerann embed`, or imported) as a PartSource: its parts, mapped."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.manifest = read_manifest(self.directory, VECTORS_KIND, VECTORS_FORMAT)
        self.dim, self.metric = int(self.manifest["dim"]), str(self.manifest["metric"])
        self._attrs: dict[str, np.ndarray] = {}

    def part_counts(self) -> list[int]:
        return [int(p["count"]) for p in self.manifest["parts"]]

    def part(self, i: int, verify: bool) -> tuple[np.ndarray, np.ndarray]:
        p = self.manifest["parts"][i]
        v = load_npy(self.directory / p["vectors"], p["sha256"] if verify else None, mmap=True)
        ids = load_npy(self.directory / p["ids"], p["ids_sha256"] if verify else None, mmap=True)
        if v.shape != (int(p["count"]), self.dim) or ids.shape != (int(p["count"]),):
            raise ArtifactError(f"{self.directory / p['vectors']}: shape {v.shape} does not match the manifest")
        return v, ids

    def attributes(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self._attrs:  # one int32 and one bool per item: small beside the vectors
            self._attrs = {name: load_npy(self.directory / f"{name}.npy") for name in ("categories", "available")}
        return self._attrs["categories"][ids], self._attrs["available"][ids]

    def fingerprint(self) -> dict[str, Any]:
        return {
            "vectors_dir": str(self.directory.resolve()),
            "parts_sha256": [p["sha256"] for p in self.manifest["parts"]],
            "attrs_sha256": self.manifest["attrs_sha256"],
        }


class ResumableBuild:
    """One build's work directory: its inputs, the steps done, and the steps themselves."""

    def __init__(self, source: PartSource | Path, work: Path, params: dict[str, Any]):
        self.source: PartSource = VectorsDirSource(source) if isinstance(source, Path) else source
        self.work = Path(work)
        self.counts = self.source.part_counts()
        self.n, self.dim = sum(self.counts), self.source.dim
        self.template = IVFPQIndex(self.dim, self.source.metric, **params)  # checks the params
        if self.n < MIN_TRAIN:
            raise ConfigError(
                f"{self.n} items are too few for a part-by-part ivfpq build (it trains IVF-PQ, which needs >= "
                f"{MIN_TRAIN}); build without --resume-dir"
            )
        self.inputs = {**self.source.fingerprint(), "build_params": self.template.build_params}
        self.state = self._open()

    def _open(self) -> dict[str, Any]:
        """The work directory's progress: new, or one of these same inputs (else a one-line error)."""
        path = self.work / PROGRESS
        if not path.exists():
            self.work.mkdir(parents=True, exist_ok=True)
            state: dict[str, Any] = {"inputs": self.inputs, "trained": False, "encoded": [], "assembled": None}
            write_json_atomic(path, state)
            return state
        try:
            state = json.loads(path.read_text())
            theirs = state["inputs"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(f"{path}: not a build's progress file ({e}); use an empty --resume-dir") from e
        differ = [key for key in self.inputs if theirs.get(key) != json.loads(json.dumps(self.inputs[key]))]
        if differ or set(theirs) != set(self.inputs):
            differ = differ or sorted(set(theirs) ^ set(self.inputs))
            raise ConfigError(
                f"{self.work} holds a build of other inputs (they differ in {', '.join(differ)}); "
                "use another --resume-dir, or remove that one to start over"
            )
        return state

    def _forget_missing(self) -> None:
        """Steps recorded done whose files are gone (removed by hand) are done again. Once assembled, the
        parts' files are no longer needed (they may be removed to free the disk); without the trained
        quantizer, the parts' codes (made with it) go too."""
        if self.state["assembled"] and (self.work / ASSEMBLED).exists():
            return
        self._done(assembled=None)
        if self.state["trained"] and not (self.work / TRAINED).exists():
            log.warning("ivfpq build: %s is gone; training and encoding again", self.work / TRAINED)
            self._done(trained=False, encoded=[])
        kept = [i for i in self.state["encoded"] if all((self.work / f).exists() for f in _part_files(i))]
        if kept != self.state["encoded"]:
            self._done(encoded=kept)

    def _done(self, **changes: Any) -> None:
        self.state.update(changes)
        write_json_atomic(self.work / PROGRESS, self.state)

    def _part(self, i: int, verify: bool) -> tuple[np.ndarray, np.ndarray]:
        v, ids = self.source.part(i, verify)
        if v.shape != (self.counts[i], self.dim) or ids.shape != (self.counts[i],):
            raise ArtifactError(f"part {i}: vectors {v.shape} and ids {ids.shape}, not {self.counts[i]} x {self.dim}")
        return v, ids

    def run(self, on_step: Callable[[str], None] | None = None, progress: bool | None = None) -> IVFPQIndex:
        """Every step not done yet, then the assembled index loaded (mapped) from the work directory.
        `on_step(name)` is called after each step is recorded done ("train", "encode 3", "assemble")."""
        self._forget_missing()
        done = len(self.state["encoded"])
        if self.state["trained"] or done:
            log.warning(
                "ivfpq build: resuming in %s (trained: %s, %d of %d parts encoded%s)",
                self.work,
                "yes" if self.state["trained"] else "no",
                done,
                len(self.counts),
                ", assembled" if self.state["assembled"] else "",
            )
        if self.state["assembled"]:
            return IVFPQIndex.load(self.work / ASSEMBLED, self.state["assembled"])
        # each step is logged (INFO, `towerann -v`): under nohup the progress bars stay silent, for hours at 100M
        t, was_trained = time.perf_counter(), bool(self.state["trained"])
        trained = self._train(on_step)
        took = "read back" if was_trained else f"{time.perf_counter() - t:.0f} s"
        log.info("ivfpq build: trained, %d lists (%s)", trained.nlist, took)
        todo = [i for i in range(len(self.counts)) if i not in self.state["encoded"]]
        off = None if progress is None else not progress
        for i in tqdm(todo, desc="ivfpq encode parts", disable=off):
            t = time.perf_counter()
            self._encode(i, trained)
            self._done(encoded=sorted([*self.state["encoded"], i]))
            log.info(
                "ivfpq build: part %d encoded, %d of %d (%.1f s)",
                i,
                len(self.state["encoded"]),
                len(self.counts),
                time.perf_counter() - t,
            )
            if on_step:
                on_step(f"encode {i}")
        t = time.perf_counter()
        self._done(assembled=self._assemble(trained, off))
        log.info("ivfpq build: assembled %d rows (%.0f s)", self.n, time.perf_counter() - t)
        if on_step:
            on_step("assemble")
        return IVFPQIndex.load(self.work / ASSEMBLED, self.state["assembled"])

    # ---- steps -------------------------------------------------------------------------------------
    def _train(self, on_step: Callable[[str], None] | None) -> faiss.IndexIVFPQ:
        path = self.work / TRAINED
        if self.state["trained"]:
            return cast(faiss.IndexIVFPQ, faiss.read_index(str(path)))
        rows = self.template.training_rows(self.n)
        blocks, at = [], 0
        for i, count in enumerate(self.counts):
            end = at + count
            mine = None if rows is None else rows[(rows >= at) & (rows < end)] - at
            if mine is None or len(mine):  # a generated part is made only when the sample needs it
                v, _ = self._part(i, verify=False)
                blocks.append(np.array(v if mine is None else v[mine], np.float32))
            at = end
        trained = self.template.trained(np.concatenate(blocks), self.n)
        tmp = path.with_name(f".{path.name}.tmp")
        faiss.write_index(skeleton(trained), str(tmp))
        os.replace(tmp, path)
        self._done(trained=True)
        if on_step:
            on_step("train")
        return trained

    def _encode(self, i: int, trained: faiss.IndexIVFPQ) -> None:
        """Part i's inverted list and PQ code per row, as faiss' add would place and encode them."""
        v, _ = self._part(i, verify=True)  # each part's checksum is read once, here
        lists = np.empty(len(v), np.int64)
        codes = np.empty((len(v), int(trained.code_size)), np.uint8)
        for at in range(0, len(v), ENCODE_ROWS):
            x = np.ascontiguousarray(v[at : at + ENCODE_ROWS], np.float32)
            _, assigned = trained.quantizer.search(x, 1)
            lists[at : at + len(x)] = assigned[:, 0]
            block = codes[at : at + len(x)]
            trained.encode_vectors(len(x), faiss.swig_ptr(x), faiss.swig_ptr(assigned), faiss.swig_ptr(block))
        outputs: tuple[np.ndarray, np.ndarray] = (lists.astype(np.int32), codes)
        for name, part in zip(_part_files(i), outputs):
            tmp = self.work / f".{name}.tmp.npy"
            save_npy(tmp, part)
            os.replace(tmp, self.work / name)

    def _assemble(self, trained: faiss.IndexIVFPQ, progress_off: bool | None) -> dict[str, Any]:
        """Every row at its slot in inverted-list order (rows of one list in catalog order, as faiss
        appends them), written as an ivfpq snapshot's files; returns the manifest a load reads."""
        nlist, cs, n, dim = int(trained.nlist), int(trained.code_size), self.n, self.dim
        part_lists = [self.work / _part_files(i)[0] for i in range(len(self.counts))]
        sizes = np.zeros(nlist, np.int64)
        for path in part_lists:
            sizes += np.bincount(load_npy(path, mmap=True), minlength=nlist)
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        codes_at, ids_at, total = lists_layout(sizes, cs)
        dtype, keep = self.template.build_params["rerank_dtype"], self.template.build_params["keep_float32"]
        slot_ids = np.empty(n, np.int64)
        slot_cats = np.empty(n, np.int32)
        slot_avail = np.empty(n, bool)
        out = self.work / ASSEMBLED
        for stale in self.work.glob(f".{ASSEMBLED}.tmp-*"):  # a kill while assembling: done again, whole
            shutil.rmtree(stale, ignore_errors=True)
        with atomic_dir(out, overwrite=True) as tmp:
            lists_file = np.memmap(tmp / LISTS, dtype=np.uint8, mode="w+", shape=(total,))
            codes_region = lists_file[: n * cs].reshape(n, cs)
            spill = tmp / ".spill"
            vectors = _SpilledRows(tmp / "vectors.npy", n, np.dtype(np.float32), dim, spill) if keep else None
            rerank = None
            if dtype != "float32":
                kind, cols = row_format(dtype, dim)
                rerank = _SpilledRows(tmp / "rerank.npy", n, kind, cols, spill)
            cursor = starts[:-1].copy()
            for i in tqdm(range(len(self.counts)), desc="ivfpq assemble parts", disable=progress_off):
                v, ids = self._part(i, verify=False)
                lists = load_npy(self.work / _part_files(i)[0])
                slots = _place(lists, cursor)
                codes_region[slots] = load_npy(self.work / _part_files(i)[1])
                for at in range(0, len(v), ENCODE_ROWS):
                    rows, to = np.asarray(v[at : at + ENCODE_ROWS], np.float32), slots[at : at + ENCODE_ROWS]
                    if vectors is not None:
                        vectors.add(to, rows)
                    if rerank is not None:
                        rerank.add(to, encode(rows, dtype))
                slot_ids[slots] = ids
                slot_cats[slots], slot_avail[slots] = self.source.attributes(ids)
            for list_no in range(nlist):  # each list's slot ids: its range of the slot order
                at, size = int(ids_at[list_no]), int(sizes[list_no])
                lists_file[at : at + 8 * size] = np.arange(starts[list_no], starts[list_no] + size).view(np.uint8)
            lists_file.flush()
            del lists_file, codes_region
            for spilled in (vectors, rerank):
                if spilled is not None:
                    spilled.write()
            if spill.exists():
                spill.rmdir()
            for name, table in (
                ("ids", slot_ids),
                ("categories", narrowed_codes(slot_cats)),
                ("alive", np.ones(n, bool)),
                ("available", slot_avail),
            ):
                save_npy(tmp / f"slot_{name}.npy", table)
            by_id = np.argsort(slot_ids, kind="stable")
            save_npy(tmp / LOOKUP_FILES[0], slot_ids[by_id])
            save_npy(tmp / LOOKUP_FILES[1], by_id.astype(np.int64))
            save_npy(tmp / STARTS, starts)
            faiss.write_index(skeleton(trained), str(tmp / "ivfpq.faiss"))
        t = self.template
        return {
            "backend": t.kind,
            "build_params": t.build_params,
            "dim": dim,
            "metric": t.metric,
            "count": n,
            "slots": n,
            "slot_lookup": list(LOOKUP_FILES),
            "search_defaults": t.search_defaults,
            "attributes": [],
            "backend_state": {
                "layout": LAYOUT,
                "vectors": "vectors.npy" if keep else None,
                "rerank": "rerank.npy" if dtype != "float32" else None,
                "file": "ivfpq.faiss",
                "lists": LISTS,
                "list_starts": STARTS,
            },
        }


class _SpilledRows:
    """The rows of a [n, cols] .npy in slot order, given in any order: each batch is appended to the spill
    files of its slot ranges (buckets of BUCKET_BYTES), then each bucket is put in order in RAM and
    written as one run, and its spill files removed. A file bigger than the page cache (100M float16
    rows: 25.6 GB) is then written front to back, never a page at a time at random; the spill files hold
    at most one copy of the rows beside the part of the file written so far."""

    def __init__(self, path: Path, n: int, dtype: np.dtype, cols: int, spill: Path):
        self.path, self.n, self.dtype, self.cols = path, n, np.dtype(dtype), cols
        self.bucket_rows = max(1, BUCKET_BYTES // (self.dtype.itemsize * cols + 8))
        self.spill = spill / path.stem
        self.spill.mkdir(parents=True, exist_ok=True)

    def _files(self, bucket: int) -> tuple[Path, Path]:
        return self.spill / f"{bucket:06d}.slots", self.spill / f"{bucket:06d}.rows"

    def add(self, slots: np.ndarray, rows: np.ndarray) -> None:
        buckets = slots // self.bucket_rows
        order = np.argsort(buckets, kind="stable")
        cuts = np.flatnonzero(np.diff(buckets[order])) + 1
        for group in np.split(order, cuts):
            slots_file, rows_file = self._files(int(buckets[group[0]]))
            with open(slots_file, "ab") as f:
                f.write(np.ascontiguousarray(slots[group], np.int64).tobytes())
            with open(rows_file, "ab") as f:
                f.write(np.ascontiguousarray(rows[group], self.dtype).tobytes())

    def write(self) -> None:
        # Plain writes, front to back, not a writable mapping: the file's pages then stay in the page cache,
        # outside this process's RSS (mapped, 25.6 GB of dirty pages counted as the builder's own at 100M).
        header = {
            "descr": np.lib.format.dtype_to_descr(self.dtype),
            "fortran_order": False,
            "shape": (self.n, self.cols),
        }
        with open(self.path, "wb") as out:
            np.lib.format.write_array_header_1_0(out, header)
            for lo in range(0, self.n, self.bucket_rows):
                slots_file, rows_file = self._files(lo // self.bucket_rows)
                slots = np.fromfile(slots_file, np.int64) if slots_file.exists() else np.empty(0, np.int64)
                block = np.empty((min(self.bucket_rows, self.n - lo), self.cols), self.dtype)
                if len(slots) != len(block) or len(np.unique(slots)) != len(block):
                    raise ArtifactError(f"{self.path}: slots {lo}.. got {len(slots)} rows for {len(block)} slots")
                block[slots - lo] = np.fromfile(rows_file, self.dtype).reshape(-1, self.cols)
                block.tofile(out)
                slots_file.unlink()
                rows_file.unlink()
        self.spill.rmdir()


def _place(lists: np.ndarray, cursor: np.ndarray) -> np.ndarray:
    """The slot of each row of a part, given each list's next free slot (`cursor`, advanced here): a
    list's rows go in the order they come, after those of the parts before."""
    order = np.argsort(lists, kind="stable")
    counts = np.bincount(lists, minlength=len(cursor))
    first = np.concatenate([[0], np.cumsum(counts)[:-1]])  # where each list's rows begin in `order`
    ranked = lists[order]
    slots = np.empty(len(lists), np.int64)
    slots[order] = cursor[ranked] + np.arange(len(lists)) - first[ranked]
    cursor += counts
    return slots
