"""Batch item embedding: a catalog (Parquet) -> a vectors directory, streamed and resumable.

The catalog is read in record batches and the features encoded (in a read-ahead thread when the
tower runs on a GPU, inline on CPU where the cores are the tower's); the main thread runs the tower under
`torch.inference_mode()` and fills one part buffer at a time. Finished parts land in a work
directory `<out>.partial/` and are listed in `progress.json` (atomic writes), so an interrupted
run picks up after the last finished part. When every part is done the attribute arrays and the
manifest are written and the work directory is renamed to `<out>`.

Features are encoded by the model's own `FeatureSchema.encode_item_features` (Arrow-based: string
columns arrive dictionary-encoded from the Parquet pages and only the small dictionaries go through
the schema's lookup), the same encoder that training and live item writes use.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from numpy.lib.format import open_memmap
from tqdm import tqdm

from towerann.artifacts import MANIFEST, load_npy, replace_dir, sha256_file, write_json_atomic, write_manifest
from towerann.config import ATTRIBUTE_NAME
from towerann.data.attributes import column_values, encode_column
from towerann.data.dataset import ITEMS
from towerann.data.vectors_dir import UNKNOWN_CATEGORY, manifest_for, part_names, write_part
from towerann.errors import ArtifactError, ConfigError, DataError
from towerann.model.model import TwoTowerModel
from towerann.model.schema import CategoricalColumn

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
PROGRESS_KIND = "embed-progress"
PROGRESS_VERSION = 1
ATTRS = ("external_ids", "categories", "available")
QUEUE_DEPTH = 3  # encoded batches buffered ahead of the tower: enough to hide reader jitter
NORM_SAMPLE = 4096  # rows per part whose norm is checked


def resolve_items_file(items: str | Path) -> Path:
    """A dataset directory or an items .parquet path -> the items Parquet file (DataError if absent)."""
    p = Path(items)
    if p.is_dir():
        p = p / ITEMS
    if not p.is_file():
        raise DataError(f"{p}: items file not found; pass a dataset directory (with {ITEMS}) or an items .parquet file")
    return p


def work_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".partial")


# --- encoding -------------------------------------------------------------------------------


@dataclass
class Encoded:
    """One record batch, encoded for the item tower, with the attributes the manifest keeps."""

    start: int  # catalog row of the first item
    inputs: tuple[torch.Tensor, ...]
    external_ids: np.ndarray
    categories: np.ndarray
    available: np.ndarray
    attributes: dict[str, np.ndarray] | None = None  # [filters] attributes: int32 codes (-1: no value)


def filter_categories(pf: pq.ParquetFile, model: TwoTowerModel) -> CategoricalColumn:
    """The bundle's category vocabulary for filters: the model's categories (codes as its tower has
    them), then every category of the catalog the model never saw, sorted. The tower embeds an unseen
    category as unknown, but a filter on it must still find its items (a refresh after new categories
    arrived through item writes, a catalog that grew since training)."""
    known = set(model.schema.categories.values)
    new: set[str] = set()
    for batch in pf.iter_batches(columns=["category"], batch_size=1 << 20):
        col = batch.column(0)
        values = col.dictionary if pa.types.is_dictionary(col.type) else pc.unique(col)
        new.update(str(v) for v in values.to_pylist() if v is not None)
    return CategoricalColumn("category", list(model.schema.categories.values) + sorted(new - known))


def encode_batch(
    model: TwoTowerModel,
    batch: pa.RecordBatch,
    start: int,
    filter_vocab: CategoricalColumn,
    attr_vocab: dict[str, list[str]] | None = None,
) -> Encoded:
    ids = batch.column("item_id")
    if pa.types.is_integer(ids.type):
        external = ids.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    else:  # string ids are kept as numpy unicode (no object arrays: they could not be saved without pickle)
        external = ids.to_numpy(zero_copy_only=False).astype(str)
    item_idx = model.item_vocab.encode(external)
    cat, num, attrs = model.schema.encode_item_features(batch)
    available = batch.column("available").fill_null(False).to_numpy(zero_copy_only=False).astype(bool, copy=False)
    inputs = (torch.from_numpy(item_idx), torch.from_numpy(cat), torch.from_numpy(num), torch.from_numpy(attrs))
    categories = filter_vocab.encode_arrow(batch.column("category")).astype(np.int32)
    attributes = {name: encode_column(batch.column(name), values) for name, values in (attr_vocab or {}).items()}
    return Encoded(start, inputs, external, categories, available, attributes)


# --- reading --------------------------------------------------------------------------------


def open_catalog(file: Path, columns: list[str]) -> pq.ParquetFile:
    """The catalog's Parquet file, checked to have `columns` (e.g. `FeatureSchema.item_columns()`)."""
    try:
        schema = pq.read_schema(file)
        missing = [c for c in columns if c not in schema.names]
        if missing:
            raise DataError(
                f"{file}: no column(s) {missing}, which the model's feature schema needs; it has {schema.names}"
            )
        # string columns come back dictionary-encoded straight from the Parquet pages: no per-row strings
        dict_cols = [c for c in columns if c != "item_id" and pa.types.is_string(schema.field(c).type)]
        return pq.ParquetFile(file, read_dictionary=dict_cols)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file}: not a readable Parquet file ({e})") from e


def iter_batches_from(
    pf: pq.ParquetFile, file: Path, columns: list[str], start: int, batch_size: int, stop: int | None = None
) -> Iterator[tuple[int, pa.RecordBatch]]:
    """Record batches of catalog rows [start, stop), skipping whole row groups before `start` unread."""
    meta = pf.metadata
    first_row = 0
    groups: list[int] = []  # the row groups read
    for rg in range(meta.num_row_groups):
        rows = meta.row_group(rg).num_rows
        if first_row + rows > start or groups:
            groups.append(rg)
        elif not groups:
            first_row += rows
    if not groups:
        return
    row = first_row
    try:
        for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=columns, use_threads=True):
            if row + batch.num_rows <= start:
                row += batch.num_rows
                continue
            if row < start:
                batch = batch.slice(start - row)
                row = start
            if stop is not None and row + batch.num_rows >= stop:
                if stop > row:
                    yield row, batch.slice(0, stop - row)
                return
            yield row, batch
            row += batch.num_rows
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file}: cannot read ({e})") from e


class BatchReader(threading.Thread):
    """Reads and encodes batches ahead of the tower; an error is handed over through the queue."""

    _END = object()

    def __init__(
        self,
        batches: Iterator[tuple[int, pa.RecordBatch]],
        model: TwoTowerModel,
        filter_vocab: CategoricalColumn,
        device: torch.device,
        ahead: bool,
        attr_vocab: dict[str, list[str]] | None = None,
    ):
        super().__init__(name="towerann-embed-reader", daemon=True)
        self.batches, self.model, self.device, self.ahead = batches, model, device, ahead
        self.filter_vocab, self.attr_vocab = filter_vocab, attr_vocab
        self.q: queue.Queue[Any] = queue.Queue(maxsize=QUEUE_DEPTH)
        self.stop = threading.Event()

    def start(self) -> None:
        if self.ahead:
            super().start()

    def run(self) -> None:
        try:
            for start, batch in self.batches:
                if self.stop.is_set():
                    return
                enc = encode_batch(self.model, batch, start, self.filter_vocab, self.attr_vocab)
                if self.device.type != "cpu":
                    enc.inputs = tuple(t.pin_memory().to(self.device, non_blocking=True) for t in enc.inputs)
                self.q.put(enc)
            self.q.put(self._END)
        except BaseException as e:  # noqa: BLE001 - re-raised in the main thread
            self.q.put(e)

    def __iter__(self) -> Iterator[Encoded]:
        if not self.ahead:
            for start, batch in self.batches:
                enc = encode_batch(self.model, batch, start, self.filter_vocab, self.attr_vocab)
                enc.inputs = tuple(t.to(self.device) for t in enc.inputs)
                yield enc
            return
        while True:
            item = self.q.get()
            if item is self._END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        self.stop.set()
        while self.is_alive():  # unblock a put() on a full queue
            try:
                self.q.get(timeout=0.05)
            except queue.Empty:
                pass


# --- progress file --------------------------------------------------------------------------


def catalog_fingerprint(file: Path, pf: pq.ParquetFile) -> dict[str, Any]:
    """Cheap identity of a catalog file: a rewritten file changes size, mtime or row count."""
    st = file.stat()
    return {"path": str(file.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns, "rows": pf.metadata.num_rows}


def _read_progress(path: Path) -> dict[str, Any]:
    import json

    try:
        p = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(f"{path}: unreadable progress file ({e}); rerun with --overwrite to start over") from e
    ok = (
        isinstance(p, dict)
        and p.get("kind") == PROGRESS_KIND
        and p.get("format_version") == PROGRESS_VERSION
        and isinstance(p.get("parts"), list)
        and all(isinstance(x, dict) for x in p["parts"])
    )
    if not ok:
        raise ArtifactError(
            f"{path}: not a towerann embedding progress file (or a corrupted one); rerun with --overwrite to start over"
        )
    return p


def _check_progress(path: Path, p: dict[str, Any], want: dict[str, Any]) -> None:
    for key, label in (
        ("model_version", "model"),
        ("catalog", "catalog"),
        ("part_size", "part size"),
        ("attributes", "attribute list"),
    ):
        if p.get(key, [] if key == "attributes" else None) != want[key]:  # runs before attributes had none
            raise ArtifactError(
                f"{path}: this unfinished run was started with another {label} "
                f"({p.get(key)!r}, now {want[key]!r}); rerun with --overwrite to start over"
            )
    for i, part in enumerate(p["parts"]):
        vec, ids = part_names(i)
        d = path.parent
        if (
            part.get("vectors") != vec
            or not (d / vec).is_file()
            or not (d / ids).is_file()
            or not all((d / f"{a}-{i:05d}.npy").is_file() for a in _attr_files(want["attributes"]))
        ):
            raise ArtifactError(
                f"{path}: part {i} is listed as finished but its files are missing; "
                "rerun with --overwrite to start over"
            )


def _start_or_resume(work: Path, want: dict[str, Any], fresh: bool) -> dict[str, Any]:
    """The progress state of the run in `work`: an unfinished one of the same model and catalog
    (unless `fresh`), else a new, empty one."""
    progress_path = work / PROGRESS
    if work.exists() and fresh:
        log.info("discarding unfinished run in %s", work)
        shutil.rmtree(work)
    if work.exists():
        if not progress_path.exists():
            raise ArtifactError(f"{work}: no {PROGRESS} in the work directory; remove it or rerun with --overwrite")
        state = _read_progress(progress_path)
        _check_progress(progress_path, state, want)
        log.info("resuming %s: %d part(s) already done", work, len(state["parts"]))
        return state
    work.mkdir(parents=True)
    state = {"kind": PROGRESS_KIND, "format_version": PROGRESS_VERSION, **want, "parts": []}
    write_json_atomic(progress_path, state)
    return state


# --- the run --------------------------------------------------------------------------------


def _pick_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as e:
        raise ConfigError(f"device {device!r} is not a torch device (use cpu or cuda)") from e


def _check_part(work: Path, i: int, vectors: np.ndarray) -> None:
    """Vectors must be finite and L2-normalised; a broken model shows here, not in the index."""
    if not np.isfinite(vectors).all():
        raise ArtifactError(f"{work / part_names(i)[0]}: non-finite vectors; the model's weights are broken")
    step = max(1, len(vectors) // NORM_SAMPLE)
    norms = np.linalg.norm(vectors[::step], axis=1)
    if len(norms) and not np.allclose(norms, 1.0, atol=1e-3):
        raise ArtifactError(
            f"{work / part_names(i)[0]}: vectors are not unit-norm (|v| in "
            f"[{norms.min():.4f}, {norms.max():.4f}]); the item tower must L2-normalise"
        )


def _attr_files(attributes: list[str]) -> tuple[str, ...]:
    """The per-item arrays a run writes: ATTRS, then attr_<name> per filter attribute."""
    return ATTRS + tuple(f"attr_{a}" for a in attributes)


def _write_attr_part(work: Path, i: int, attrs: dict[str, np.ndarray]) -> None:
    for a, arr in attrs.items():
        tmp = work / f".{a}-{i:05d}.tmp.npy"
        np.save(tmp, arr, allow_pickle=False)
        tmp.replace(work / f"{a}-{i:05d}.npy")


def _assemble_attrs(work: Path, n_parts: int, count: int, names: tuple[str, ...] = ATTRS) -> dict[str, str]:
    """Concatenate the per-part attribute files into one file each, through a memmap (bounded memory)."""
    sums = {}
    for a in names:
        parts = [load_npy(work / f"{a}-{i:05d}.npy", mmap=True) for i in range(n_parts)]
        dtype = np.result_type(*[p.dtype for p in parts]) if parts else np.dtype(np.int64)
        if a == "categories" or a.startswith("attr_"):
            dtype = np.dtype(np.int32)
        elif a == "available":
            dtype = np.dtype(bool)
        path = work / f"{a}.npy"
        out = open_memmap(path, mode="w+", dtype=dtype, shape=(count,))
        s = 0
        for p in parts:
            out[s : s + len(p)] = p
            s += len(p)
        out.flush()
        del out, parts
        sums[a] = sha256_file(path)
        for i in range(n_parts):
            (work / f"{a}-{i:05d}.npy").unlink()
    return sums


def embed_rows(
    model: TwoTowerModel,
    tower: torch.nn.Module,
    pf: pq.ParquetFile,
    file: Path,
    columns: list[str],
    start: int,
    stop: int,
    batch_size: int,
    filter_vocab: CategoricalColumn,
    attr_vocab: dict[str, list[str]],
    dev: torch.device,
    timings: dict[str, float] | None = None,
    bar: Any = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Catalog rows [start, stop) -> their vectors and per-item attribute arrays (_attr_files order).

    The one place the tower runs over the catalog, for the local runner and for a Ray task alike: its
    calls are the Parquet batches read from `start`, so a part's vectors do not depend on which
    runner, or which earlier part, came before it."""
    timings = {} if timings is None else timings
    buf = np.empty((stop - start, model.dim), np.float32)
    attrs: dict[str, list[np.ndarray]] = {a: [] for a in _attr_files(list(attr_vocab))}
    reader = BatchReader(
        iter_batches_from(pf, file, columns, start, batch_size, stop),
        model,
        filter_vocab,
        dev,
        ahead=dev.type != "cpu",
        attr_vocab=attr_vocab,
    )
    filled = 0
    try:
        reader.start()
        t_wait = time.perf_counter()
        with torch.inference_mode():
            for enc in reader:
                t0 = time.perf_counter()
                timings["wait_reader_s"] = timings.get("wait_reader_s", 0.0) + t0 - t_wait
                n = len(enc.available)
                vec = tower(*enc.inputs)
                buf[filled : filled + n] = vec.cpu().numpy() if dev.type != "cpu" else vec.numpy()
                timings["tower_s"] = timings.get("tower_s", 0.0) + time.perf_counter() - t0
                attrs["external_ids"].append(enc.external_ids)
                attrs["categories"].append(enc.categories)
                attrs["available"].append(enc.available)
                for name, codes in (enc.attributes or {}).items():
                    attrs[f"attr_{name}"].append(codes)
                filled += n
                if bar is not None:
                    bar.update(n)
                t_wait = time.perf_counter()
    finally:
        reader.close()
    if filled != stop - start:
        raise DataError(
            f"{file}: read {filled} of the {stop - start} rows from row {start} that its metadata "
            "promises; the file changed during the run"
        )
    return buf, {a: np.concatenate(v) for a, v in attrs.items()}


def write_finished_part(
    work: Path, i: int, start: int, vectors: np.ndarray, attrs: dict[str, np.ndarray]
) -> dict[str, Any]:
    """Check part i and write its files into the work directory; return its manifest entry."""
    _check_part(work, i, vectors)
    entry = write_part(work, i, vectors, np.arange(start, start + len(vectors), dtype=np.int64))
    _write_attr_part(work, i, attrs)
    return entry


@dataclass
class EmbedRun:
    """An embedding run set up (fresh or resumed) in its work directory; parts are rows
    [i * part_size, (i + 1) * part_size) of the catalog."""

    model_dir: Path
    model: TwoTowerModel
    file: Path
    pf: pq.ParquetFile
    columns: list[str]
    attributes: list[str]
    n_rows: int
    part_size: int
    work: Path
    state: dict[str, Any]
    filter_vocab: CategoricalColumn
    attr_vocab: dict[str, list[str]]

    @property
    def parts(self) -> list[dict[str, Any]]:
        return self.state["parts"]

    @property
    def n_parts(self) -> int:
        return -(-self.n_rows // self.part_size)

    @property
    def done_rows(self) -> int:
        """Catalog rows in the finished parts (a finished prefix of them)."""
        return min(len(self.parts) * self.part_size, self.n_rows)

    def rows(self, i: int) -> tuple[int, int]:
        return i * self.part_size, min(self.n_rows, (i + 1) * self.part_size)

    def save_progress(self) -> None:
        write_json_atomic(self.work / PROGRESS, self.state)


def check_attribute_names(attributes: tuple[str, ...] | list[str] | str) -> list[str]:
    """The filter attribute names, checked as the index and the config check them (a name becomes a file name)."""
    if isinstance(attributes, str):  # attributes="brand" would otherwise be five one-letter columns
        attributes = [attributes]
    names = list(attributes)
    bad = [a for a in names if not isinstance(a, str) or not ATTRIBUTE_NAME.match(a) or a in ("category", "categories")]
    if bad:
        raise ConfigError(
            f"attributes {bad}: a filter attribute is a catalog column named with 1-32 characters a-z, 0-9, _ "
            "starting with a letter (category is always filterable: leave it out)"
        )
    twice = sorted({a for a in names if names.count(a) > 1})
    if twice:
        raise ConfigError(f"attributes: {twice} listed more than once")
    return names


def _check_attribute_columns(file: Path, attributes: list[str]) -> None:
    if not attributes:
        return
    try:
        have = pq.read_schema(file).names
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{file}: not a readable Parquet file ({e})") from e
    missing = [a for a in attributes if a not in have]
    if missing:
        raise DataError(
            f"{file}: no column(s) {missing} to keep as filter attributes; the catalog's columns are {have}"
        )


def start_run(
    model_dir: str | Path,
    items: str | Path,
    out: str | Path,
    batch_size: int,
    part_size: int,
    resume: bool,
    overwrite: bool,
    attributes: tuple[str, ...] | list[str],
) -> EmbedRun:
    """Check the arguments and the catalog, then start (or resume) the run in `<out>.partial/`."""
    out = Path(out)
    if batch_size < 1 or part_size < 1:
        raise ConfigError(f"batch_size and part_size must be >= 1 (got {batch_size}, {part_size})")
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or pass --overwrite")
    attributes = check_attribute_names(attributes)
    file = resolve_items_file(items)
    model = TwoTowerModel.load(model_dir)
    columns = model.schema.item_columns()
    _check_attribute_columns(file, attributes)
    columns += [a for a in attributes if a not in columns]
    pf = open_catalog(file, columns)
    t = pf.schema_arrow.field("item_id").type
    if not (pa.types.is_int64(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise DataError(f"{file}: column 'item_id' has type {t}; expected int64 or string")
    work = work_dir_for(out)
    want = {
        "model_version": model.version,
        "catalog": catalog_fingerprint(file, pf),
        "part_size": int(part_size),
        "attributes": attributes,
    }
    state = _start_or_resume(work, want, fresh=overwrite or not resume)
    return EmbedRun(
        Path(model_dir),
        model,
        file,
        pf,
        columns,
        attributes,
        pf.metadata.num_rows,
        int(part_size),
        work,
        state,
        filter_categories(pf, model),
        column_values(pf, attributes),
    )


def finish_run(run: EmbedRun, out: str | Path, overwrite: bool) -> Path:
    """Every part done: assemble the attribute arrays, write the manifest, rename the work directory to `out`."""
    out = Path(out)
    if len(run.parts) != run.n_parts:
        raise DataError(
            f"{run.file}: {len(run.parts)} of {run.n_parts} parts embedded; the file changed during the run"
        )
    attr_sums = _assemble_attrs(run.work, len(run.parts), run.n_rows, _attr_files(run.attributes))
    manifest = manifest_for(
        run.parts,
        attr_sums,
        model_version=run.model.version,
        dim=run.model.dim,
        metric=run.model.metric,
        category_names=[UNKNOWN_CATEGORY] + run.filter_vocab.values,
        extra={
            "source": {"items": str(run.file), "rows": run.n_rows, "model": str(run.model_dir)},
            **({"attributes": run.attr_vocab} if run.attributes else {}),
        },
    )
    write_manifest(run.work / MANIFEST, manifest)
    (run.work / PROGRESS).unlink()
    if out.exists() and not overwrite:
        raise ArtifactError(f"{out} already exists; choose another --out or pass --overwrite")
    replace_dir(run.work, out)
    return out


def embed_catalog(
    model_dir: str | Path,
    items: str | Path,
    out: str | Path,
    batch_size: int = 16384,
    part_size: int = 1_048_576,
    resume: bool = True,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: bool | None = None,
    max_parts: int | None = None,
    stats: dict[str, Any] | None = None,
    attributes: tuple[str, ...] | list[str] = (),
) -> Path:
    """Embed every catalog row with the model's item tower and write a vectors directory at `out`.

    Internal ids are catalog row numbers. `resume` continues an unfinished run found in
    `<out>.partial/` (same model and catalog only); `overwrite` discards it and replaces `out`.
    `max_parts` stops after that many new parts and returns the work directory (to split a run;
    tests use it to simulate an interruption). `stats`, if given, receives stage timings.
    `attributes`: catalog columns to keep as filter attributes ([filters] attributes; embed.attributes).
    `towerann embed --ray` runs the same parts as Ray tasks (cluster.embed).
    """
    t_start = time.perf_counter()
    run = start_run(model_dir, items, out, batch_size, part_size, resume, overwrite, attributes)
    dev = _pick_device(device)
    tower = run.model.net.item_tower.to(dev).eval()
    threads_before = torch.get_num_threads()
    if dev.type == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)  # the tower is GEMM-bound: use every core
    timings = {"tower_s": 0.0, "write_s": 0.0, "wait_reader_s": 0.0}
    # Read-ahead pays when the tower runs on a GPU. On CPU the reader thread competes with the
    # tower's OpenMP threads for the same cores: measured on 2 cores (10M items), the tower ran
    # 35% slower beside it and the whole run took longer, so there decoding runs inline.
    bar = tqdm(
        total=run.n_rows,
        initial=run.done_rows,
        desc="embed",
        unit="item",
        unit_scale=True,
        disable=None if progress is None else not progress,
    )
    new_parts = 0
    try:
        for i in range(len(run.parts), run.n_parts):
            start, stop = run.rows(i)
            vectors, attrs = embed_rows(
                run.model,
                tower,
                run.pf,
                run.file,
                run.columns,
                start,
                stop,
                batch_size,
                run.filter_vocab,
                run.attr_vocab,
                dev,
                timings,
                bar,
            )
            t2 = time.perf_counter()
            run.parts.append(write_finished_part(run.work, i, start, vectors, attrs))
            run.save_progress()
            timings["write_s"] += time.perf_counter() - t2
            new_parts += 1
            del vectors, attrs
            if max_parts is not None and new_parts >= max_parts and len(run.parts) < run.n_parts:
                log.info("stopping after %d new part(s) as asked; %s holds the progress", new_parts, run.work)
                return run.work
    finally:
        bar.close()
        torch.set_num_threads(threads_before)

    t3 = time.perf_counter()
    finish_run(run, out, overwrite)
    timings["finish_s"] = time.perf_counter() - t3
    timings["total_s"] = time.perf_counter() - t_start
    if stats is not None:
        stats.update(
            timings,
            count=run.n_rows,
            device=str(dev),
            threads=torch.get_num_threads() if dev.type != "cpu" else os.cpu_count(),
        )
    log.info("embedded %d items into %s in %.1fs", run.n_rows, out, timings["total_s"])
    return Path(out)
