"""`towerann index ...`: build and publish a snapshot from a vectors directory, roll back, inspect."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from towerann.artifacts import load_npy
from towerann.config import ServeConfig
from towerann.errors import ConfigError
from towerann.index import KINDS, SHARDED
from towerann.index.build import AUTO_HELP, UNTUNED_TARGET, Tuning, build_index
from towerann.index.protocol import Index
from towerann.index.retune import MIN_LIVE_QUERIES
from towerann.index.snapshot import current_version, list_versions, publish, read_checked_manifest, resolve, rollback
from towerann.index.tune import not_paying

# Tuning queries come from a file: the model package makes them (index/ never loads a model).
NEEDS_QUERIES = (
    "--recall needs user-tower queries: --queries FILE "
    "(make one with `towerann model queries --data DIR --model DIR --out q.npy`)"
)
QUERIES_HELP = (
    "user-tower query vectors (.npy, float32 [m, dim]) for tuning; "
    "`towerann model queries --data DIR --model DIR --out q.npy` writes them"
)

# The K that tuning measures recall at, for `index build`, `index tune` and `refresh` alike: the largest K
# a server answers by default ([serve] max_k), so the tuned settings reach the recall target at every K asked.
TUNE_K = ServeConfig.max_k
TUNE_K_HELP = "k for tuning: the recall target holds at this K (default %(default)s, [serve] max_k)"

# index/ reads no model: tuning queries come from a file. The old flags stay, hidden, to say so in one line.
QUERIES_MOVED = (
    "--data and --model moved out of `index`: write the tuning queries with "
    "`towerann model queries --data DIR --model DIR --out q.npy`, then pass --queries q.npy"
)


def _refuse_moved_flags(parser: argparse.ArgumentParser) -> None:
    for flag in ("--data", "--model"):
        parser.add_argument(flag, default=None, help=argparse.SUPPRESS)


def _check_moved_flags(args: argparse.Namespace) -> None:
    if args.data is not None or args.model is not None:
        raise ConfigError(QUERIES_MOVED)


def add_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "index",
        help="ANN index: build + publish snapshots, roll back, inspect",
        description="Snapshots of an item index under a root directory: build and publish one, re-tune the "
        "current one, roll CURRENT back, inspect one.",
    )
    sub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    b = sub.add_parser(
        "build",
        help="build an index from a vectors directory and publish it as a snapshot",
        description="Build an index over a vectors directory (from `towerann embed`, or imported from a .parquet "
        "or .npy file of vectors made elsewhere), tune its search settings to --recall at --k on user-tower "
        "queries (--queries), measure its filter plan (which search path a filter keeping a given share of "
        "the catalog takes: on the tuning queries, or without them on queries made from the items, to recall "
        f"{UNTUNED_TARGET}), and publish it as a new snapshot version under --out: CURRENT names it, "
        "servers polling that root swap it in, and older versions beyond --keep are pruned. Untuned, hnsw "
        "searches at ef=512.",
    )
    b.add_argument(
        "--vectors",
        required=True,
        help="vectors directory written by `towerann embed`, or vectors made elsewhere: a .parquet file "
        "(an id column and a list-of-floats vector column) or a .npy matrix with --ids; a file is "
        "first imported into a vectors directory (--vectors-out)",
    )
    b.add_argument(
        "--vectors-out",
        default=None,
        help="where an imported vectors file goes (default: beside --out, named OUT-vectors)",
    )
    b.add_argument("--ids", default=None, help="with a .npy --vectors: the item ids, one per row (.npy)")
    b.add_argument("--id-column", default="item_id", help="Parquet --vectors: id column (default item_id)")
    b.add_argument("--vector-column", default="vector", help="Parquet --vectors: vector column (default vector)")
    b.add_argument("--category-column", default=None, help="Parquet --vectors: category column for filters (optional)")
    b.add_argument("--available-column", default=None, help="Parquet --vectors: availability column (optional)")
    b.add_argument("--normalize", action="store_true", help="L2-normalise imported vectors (cosine similarity)")
    b.add_argument(
        "--kind",
        required=True,
        choices=[*KINDS, "auto", SHARDED],
        help=f"backend; {AUTO_HELP} (--recall, default 0.95); {SHARDED} = --shards indexes of "
        "--shard-kind, items partitioned by id hash (docs/shards.md)",
    )
    b.add_argument("--shards", type=int, default=None, help=f"--kind {SHARDED}: number of shards")
    b.add_argument(
        "--shard-kind",
        default=None,
        choices=KINDS,
        help=f"--kind {SHARDED}: each shard's backend (default hnsw); --param and tuning apply to every shard",
    )
    b.add_argument("--out", required=True, help="snapshot root (e.g. indexes/); CURRENT points at the new version")
    b.add_argument(
        "--recall",
        type=float,
        default=None,
        help="tune search params to this recall@k on user-tower queries (e.g. 0.95); give --queries",
    )
    b.add_argument("--k", type=int, default=TUNE_K, help=TUNE_K_HELP)
    b.add_argument("--queries", default=None, help=QUERIES_HELP)
    _refuse_moved_flags(b)
    b.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="build parameter (e.g. M=32, nlist=4096; hnsw partition_by=category partition_min=10000: "
        "a sub-index per category for filters; ivfpq rerank_dtype=float16 or int8: narrower re-rank rows, and "
        "keep_float32=false: those rows are the only copy of the vectors, no float32 file) "
        "or search default (e.g. ef=512); repeatable",
    )
    b.add_argument("--keep", type=int, default=3, help="snapshot versions to keep (default 3)")
    b.add_argument(
        "--resume-dir",
        default=None,
        help="--kind ivfpq: build part by part in this work directory (training, then each vectors part "
        "encoded, then the lists assembled; each step's files land whole): run the same command again "
        "after a kill and it goes on from the last finished step (index.ivfpq_resumable)",
    )
    b.set_defaults(func=run_build)

    t = sub.add_parser(
        "tune",
        help="re-tune a published snapshot's search settings (no rebuild) and publish them as a new version",
        description="Measure the CURRENT snapshot of ROOT again on user-tower queries (--queries, or with "
        "--from-live the live queries a server serving ROOT kept in ROOT/live_queries/) and choose the "
        "fastest search settings that reach --recall at --k; the result is published as a new version that "
        "shares the index files (hard links) of the one it re-tunes.",
    )
    t.add_argument("root", help="snapshot root (e.g. indexes/); its CURRENT version is re-tuned")
    t.add_argument(
        "--recall",
        type=float,
        default=None,
        help="recall@k target on the tuning queries (needed with --queries; with --from-live the default is "
        "the version's own tuned target)",
    )
    t.add_argument("--k", type=int, default=TUNE_K, help=TUNE_K_HELP)
    t.add_argument("--queries", default=None, help=QUERIES_HELP)
    t.add_argument(
        "--from-live",
        action="store_true",
        help="tune on the live queries a server serving ROOT sampled (ROOT/live_queries/: query vectors, "
        "each used unfiltered; [monitor] reservoir) instead of --queries",
    )
    t.add_argument(
        "--min-queries",
        type=int,
        default=MIN_LIVE_QUERIES,
        help="--from-live: refuse fewer live queries than this (default %(default)s)",
    )
    _refuse_moved_flags(t)
    t.add_argument(
        "--calibrate-filters",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="measure the filter plan again (default: when the snapshot has one)",
    )
    t.add_argument("--keep", type=int, default=3, help="snapshot versions to keep (default 3)")
    t.set_defaults(func=_tune)

    r = sub.add_parser(
        "rollback",
        help="point CURRENT at the previous snapshot version",
        description="Point CURRENT of a snapshot root at the version before the current one (kept by --keep "
        "when it was published). Servers polling the root load it as they load a new one; the newer "
        "version stays on disk until pruned. Refused when no older version is left.",
    )
    r.add_argument("--root", required=True, help="snapshot root (e.g. indexes/)")
    r.set_defaults(func=_rollback)

    i = sub.add_parser(
        "info",
        help="print a snapshot's manifest summary as JSON (checks checksums) and its filter plan as a table",
        description="Check every file of a snapshot against its manifest's checksums and print the manifest's "
        "summary as JSON: backend, model version, count, build and search settings, the tuning curve; "
        "for a root, also CURRENT and the versions kept. The filter plan, when the index has one, follows "
        "as a table on stderr (share of the catalog a filter keeps -> the path searched, its measured recall "
        "and p50), so stdout stays one JSON document.",
    )
    i.add_argument("directory", help="a snapshot directory, or a root (its CURRENT version is shown)")
    i.add_argument("--json", action="store_true", help="JSON only: leave out the filter plan table")
    i.set_defaults(func=_info)


def parse_params(items: list[str]) -> dict[str, Any]:
    """--param KEY=VALUE items -> {key: value}, each value JSON when it parses as JSON (M=32 -> 32)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE, e.g. --param M=32")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run_build(args: argparse.Namespace) -> int:
    """`index build`."""
    from towerann.data.vectors_dir import read_vectors

    _check_moved_flags(args)
    if args.resume_dir is not None and args.kind != "ivfpq":
        raise ConfigError(f"--resume-dir builds --kind ivfpq part by part; --kind {args.kind} builds in memory")
    if args.recall is not None and args.queries is None and args.kind != "exact":
        raise ConfigError(NEEDS_QUERIES)  # tuning on item vectors would overestimate recall
    t0 = time.perf_counter()
    if Path(args.vectors).is_file():
        from towerann.data.external_vectors import import_vectors

        out = Path(args.out)
        vectors_dir = import_vectors(
            args.vectors,
            args.vectors_out or out.with_name(out.name + "-vectors"),
            ids=args.ids,
            id_column=args.id_column,
            vector_column=args.vector_column,
            category_column=args.category_column,
            available_column=args.available_column,
            normalize=args.normalize,
            overwrite=True,
        )
        print(f"imported {args.vectors} -> {vectors_dir}")
        args.vectors = str(vectors_dir)
    elif args.ids or args.normalize or args.category_column or args.available_column:
        raise ConfigError(
            "--ids, --normalize and the column options apply to a vectors file (.parquet, .npy), "
            f"not to the vectors directory {args.vectors}"
        )
    params = _kind_params(args)
    queries = load_npy(args.queries) if args.queries else None
    recall = args.recall if args.recall is not None else 0.95 if args.kind == "auto" else None
    tuning = Tuning(queries, args.k, recall) if recall is not None and queries is not None else None
    t_build = time.perf_counter()
    if args.resume_dir is not None:
        index, meta = _build_resumable(args, params, tuning)
    else:
        vs = read_vectors(args.vectors)
        meta = {"model_version": vs.model_version, "category_names": vs.category_names}
        index = build_index(
            vs.vectors,
            vs.ids,
            vs.categories,
            vs.available,
            kind=args.kind,
            params=params,
            tuning=tuning,
            metric=vs.metric,
            calibrate_filters=True,  # on the tuning queries, else on queries made from the items
            filter_k=args.k,
        )
        del vs
    build_s = time.perf_counter() - t_build
    path = publish(
        index,
        args.out,
        meta["model_version"],
        keep=args.keep,
        extra={
            "vectors_dir": str(Path(args.vectors).resolve()),
            "category_names": meta["category_names"],
            "build_seconds": round(build_s, 3),
        },
    )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    print(
        f"built {index.describe()} over {len(index)} items in {build_s:.2f}s "
        f"(total {time.perf_counter() - t0:.2f}s), peak memory {peak_mb:.0f} MiB"
    )
    if index.tuning:
        t = index.tuning
        speed = f", p50 {t['p50_ms']:.3f} ms vs exact {t['exact_p50_ms']:.3f} ms" if t.get("p50_ms") else ""
        print(
            f"tuned: {t['params']} recall@{t['k']}={t['recall']:.4f}{speed} (target {t['target']}, "
            f"{t['queries']} queries, {len(t.get('curve', []))} settings measured"
            f"{'' if t['reached'] else ', NOT reached'}; `towerann index info` shows the curve)"
        )
        warning = not_paying(t, index.kind)
        if warning:
            print(f"WARNING: {warning}")
    if index.filter_calibration:
        fc = index.filter_calibration
        print(
            f"filter plan at k={','.join(map(str, fc['ks']))}, recall floor "
            f"{', '.join(f'{v:.4g}' for v in fc['recall_floor'].values())}, measured on "
            f"{fc['queries']} {'item-made' if fc.get('queries_from') == 'items' else 'tuning'} queries:"
        )
        print("\n".join(plan_table(index.search_defaults, fc)))
    print(f"snapshot: {path}")
    return 0


def plan_table(search_defaults: dict[str, Any], calibration: dict[str, Any] | None) -> list[str]:
    """The filter plan as text: per k and measured share of the catalog kept, the path the plan takes
    there and that path's measured recall and p50 (exact search's p50 beside it)."""
    plan = search_defaults.get("filter_plan") or []
    if not plan:
        return ["no filter plan: the default thresholds decide (exact below exact_below qualifying items)"]
    points = (calibration or {}).get("points") or []
    lines = [f"{'k':>6} {'kept':>7} {'items':>9}  {'path':<9} {'recall':>7} {'p50 ms':>9} {'exact ms':>9}"]
    for k in sorted({int(row[0]) for row in plan}):
        rows = [row for row in plan if int(row[0]) == k]
        here = [p for p in points if int(p["k"]) == k]
        for share in sorted({p["share"] for p in here}):
            path = next((row[2] for row in rows if row[1] >= share), rows[-1][2])
            at = {p["path"]: p for p in here if p["share"] == share}
            p, exact = at.get(path) or at.get("exact") or {}, at.get("exact") or {}
            lines.append(
                f"{k:>6} {share:>7.1%} {p.get('kept', ''):>9}  {p.get('path', path):<9} "
                f"{p.get('recall', float('nan')):>7.4f} {p.get('p50_ms', float('nan')):>9.3f} "
                f"{exact.get('p50_ms', float('nan')):>9.3f}"
            )
        if not here:  # a plan without its measurements: the rows as stored
            lines += [f"{k:>6} <={row[1]:>6.1%} {'':>9}  {row[2]:<9}" for row in rows]
    return lines


ITEM_SAMPLE_ROWS = 100_000  # catalog rows item-made calibration queries are drawn from, in a resumable build


def _build_resumable(
    args: argparse.Namespace, params: dict[str, Any], tuning: Tuning | None
) -> tuple[Index, dict[str, Any]]:
    """`index build --resume-dir`: the ivfpq built part by part in that work directory, then tuned and
    its filter plan measured as build_index does; (index, the vectors manifest's model version and
    category names)."""
    from towerann.index.build import finish_build, split_params
    from towerann.index.ivfpq_resumable import ResumableBuild, VectorsDirSource

    build, search = split_params("ivfpq", params)
    source = VectorsDirSource(Path(args.vectors))
    job = ResumableBuild(source, Path(args.resume_dir), build)
    index = job.run()
    # Item-made calibration queries (no tuning queries) are made from a sample of the catalog's rows, read
    # from the files (there may be no float32 copy; all of it would not fit in RAM at this scale).
    vectors = np.empty((0, index.dim), np.float32)
    if tuning is None:
        stored = index.rerank_vectors
        sample = np.random.default_rng(0).choice(stored.n, min(stored.n, ITEM_SAMPLE_ROWS), replace=False)
        vectors = stored.rows(np.sort(sample))
    finish_build(index, vectors, search, tuning, calibrate_filters=True, filter_k=args.k)
    return index, {key: source.manifest[key] for key in ("model_version", "category_names")}


def _kind_params(args: argparse.Namespace) -> dict[str, Any]:
    """The build's params (a sharded index's: its shard count and backend too)."""
    params = parse_params(args.param)
    if args.kind != SHARDED:
        if args.shards is not None or args.shard_kind is not None:
            raise ConfigError(f"--shards and --shard-kind go with --kind {SHARDED}, not --kind {args.kind}")
        return params
    if args.shards is None:
        raise ConfigError(f"--kind {SHARDED} needs --shards N (and --shard-kind, default hnsw)")
    if "shards" in params or "backend" in params:
        raise ConfigError("give the shard count and backend as --shards and --shard-kind, not as --param")
    return {"shards": args.shards, "backend": args.shard_kind or "hnsw", **params}


def _tune(args: argparse.Namespace) -> int:
    from towerann.index.retune import LIVE_QUERIES, retune, retune_from_live

    _check_moved_flags(args)
    if read_checked_manifest(resolve(args.root), verify=False)["backend"] == SHARDED:
        raise ConfigError(
            f"{args.root}: index tune does not re-tune a {SHARDED} snapshot yet; rebuild it with "
            "`index build --kind sharded --recall ...` (tuning there sets every shard's search params)"
        )
    if args.from_live:
        if args.queries:
            raise ConfigError("give --queries FILE or --from-live, not both")
        path, t, n = retune_from_live(
            args.root, args.k, args.recall, args.keep, args.calibrate_filters, min_queries=args.min_queries
        )
        print(f"{n} live queries from {Path(args.root) / LIVE_QUERIES}")
    else:
        if not args.queries:
            raise ConfigError(NEEDS_QUERIES)
        if args.recall is None:
            raise ConfigError("--recall is needed with --queries (with --from-live it defaults to the tuned target)")
        queries = load_npy(args.queries)
        path, t = retune(
            args.root, queries, args.k, args.recall, keep=args.keep, calibrate_filters=args.calibrate_filters
        )
    speed = f", p50 {t['p50_ms']:.3f} ms" if t.get("p50_ms") else ""
    print(
        f"tuned: {t['params']} recall@{t['k']}={t['recall']:.4f}{speed} (target {t['target']}"
        f"{'' if t['reached'] else ', NOT reached'})"
    )
    warning = not_paying(t, read_checked_manifest(path, verify=False)["backend"])
    if warning:
        print(f"WARNING: {warning}")
    print(f"snapshot: {path}")
    return 0


def _rollback(args: argparse.Namespace) -> int:
    old = current_version(args.root)
    new = rollback(args.root)
    print(f"{args.root}: CURRENT {old} -> {new}")
    return 0


def _info(args: argparse.Namespace) -> int:
    directory = resolve(args.directory)
    m = read_checked_manifest(directory)
    size = sum((directory / name).stat().st_size for name in m["checksums"])
    info = {
        k: m.get(k)
        for k in (
            "backend",
            "description",
            "model_version",
            "dim",
            "metric",
            "count",
            "slots",
            "build_params",
            "search_defaults",
            "tuning",
            "created_at",
        )
    }
    info.update(path=str(directory), files=len(m["checksums"]), bytes=size, checksums="ok")
    if m.get("retuned_from"):  # `index tune`: the version whose files (hard links) and build this one shares
        info["retuned_from"] = m["retuned_from"]
    if m.get("retune_reason"):  # why: the live re-tune's online recall, or the live queries tuned on
        info["retune_reason"] = m["retune_reason"]
    memory = (m.get("backend_state") or {}).get("memory")  # ivfpq: resident vs on-disk bytes once loaded
    if memory:
        info["memory"] = memory
    parts = (m.get("backend_state") or {}).get("partitions")  # hnsw partition_by: a sub-index per value
    if parts:
        info["partitions"] = {
            "by": parts["by"],
            "min_items": parts["min_items"],
            "values": {str(s["value"]): s["manifest"]["count"] for s in parts["subs"]},
        }
    root = Path(args.directory)
    if directory != root:
        info.update(current=current_version(root), versions=list_versions(root))
    print(json.dumps(info, indent=2, sort_keys=True))
    if not args.json and m.get("backend") not in ("exact", SHARDED):
        print("filter plan (share of the catalog a filter keeps -> path, recall, p50):", file=sys.stderr)
        print("\n".join(plan_table(m.get("search_defaults") or {}, m.get("filter_calibration"))), file=sys.stderr)
    return 0
