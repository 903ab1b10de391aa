"""`towerann plan`: how many machines a catalog needs, and what recall and latency to expect there.

Memory comes from a byte model of each backend (what the process holds per item, checked against
the memory the index reports and a test checks against the process's growth); latency and recall
come from committed benchmark runs (`bench pq` for ivfpq, `bench ann` for the others: JSON under
docs/bench/). For each measured catalog size the planner takes the fastest measured setting that
reaches the recall target at K; between and beyond measured sizes it scales p50/p99 as
items_per_node^alpha, alpha fitted on the two largest measured sizes (or the stated default for the
backend when only one size was measured). Everything extrapolated is labelled as such; a recall is
stated only where a committed run reached it at a comparable size (within COMPARABLE_SIZE of the node's
items), never carried to a catalog many times larger than any run.

For ivfpq the re-rank rows (`--rerank-dtype`: float32, float16 or int8) are what `--mode` is about: `ram`
holds them in the process and `warm` in the page cache, so both count them against a node's memory;
`cold` reads them from disk per query and counts only the resident index.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from towerann.bench.options import add_dim, add_k, add_kind, add_recall
from towerann.errors import ConfigError
from towerann.index.ivfpq import HNSW_COARSE_LISTS, HNSW_COARSE_M
from towerann.index.vecfile import RERANK_DTYPES, row_format

KINDS = ("ivfpq", "hnsw", "exact", "scann")
# p50 ~ n^alpha when only one size was measured: ivfpq/scann scan a fixed share of ~sqrt(n) lists of
# ~sqrt(n) items at a fixed recall (~n^0.5 per query, measured 0.4-0.6 between 300k and 1M); a graph
# walk grows ~log n (0.2 over a decade); brute force is linear.
DEFAULT_ALPHA = {"ivfpq": 0.5, "scann": 0.5, "hnsw": 0.2, "exact": 1.0}
# The slot tables every backend keeps (index/base.py), per item. In the process: the category code and each
# attribute's (CODE_BYTES each: int8 up to 127 values, int16 up to 32767, else int32) and two flag bits. Memory-mapped
# from the snapshot (the page cache's, read for the rows a query returns): the id (8) and the id -> slot lookup (16).
# On disk besides: the two flags as bool arrays (2).
CODE_BYTES = 2
FLAG_BYTES = 2 / 8
MAPPED_TABLE_BYTES = 8 + 16
HNSW_M = 32
MODES = ("warm", "cold", "ram")
# A measured recall stands for node sizes up to this many times the run's catalog: recall falls as a
# catalog grows (the committed PQ16 runs reached recall@100 0.987 at 1M and at most 0.936 at 10M).
COMPARABLE_SIZE = 2.0
HEADROOM = 0.7  # share of a node's RAM the index may take (the rest: server, OS, page cache, a swap's second copy)
UNITS = {  # a size needs one: is "64" 64 GB or 64 bytes?
    "B": 1,
    "KB": 1e3,
    "MB": 1e6,
    "GB": 1e9,
    "TB": 1e12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_bytes(text: str, flag: str = "--ram-per-node") -> float:
    """A size with its unit ("64GB", "512 GiB", "1.5e3MB") -> bytes; a bare number is refused."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]*)?(?:e[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if m and not m.group(2):
        raise ConfigError(f"{flag} {text.strip()}: give a unit, e.g. {m.group(1)}GB")
    if not m or m.group(2).upper() not in UNITS:
        raise ConfigError(f"{flag} {text!r}: expected a size with its unit, e.g. 64GB or 512GiB")
    return float(m.group(1)) * UNITS[m.group(2).upper()]


def rerank_row_bytes(dim: int, rerank_dtype: str) -> float:
    """Bytes of one ivfpq re-rank row, as index/vecfile.py stores it."""
    if rerank_dtype not in RERANK_DTYPES:
        raise ConfigError(f"--rerank-dtype {rerank_dtype!r}: choose from {', '.join(RERANK_DTYPES)}")
    kind, cols = row_format(rerank_dtype, dim)
    return float(kind.itemsize * cols)


def bytes_per_item(
    kind: str,
    n: float,
    dim: int,
    pq_m: int = 16,
    attributes: int = 0,
    code_bytes: int = CODE_BYTES,
    rerank_dtype: str = "float32",
    keep_float32: bool = True,
) -> dict[str, float]:
    """Resident and on-disk bytes per item of one node's index over `n` items (`code_bytes`: the width of
    the category and attribute codes, which a loaded index keeps as narrow as their values allow).
    `rerank` is what an ivfpq query re-ranks from: in the page cache when warm, in the process in RAM."""
    codes = code_bytes * (1 + attributes)
    tables = codes + FLAG_BYTES  # what the process holds
    tables_disk = codes + 2 + MAPPED_TABLE_BYTES
    raw = 4.0 * dim
    if kind == "ivfpq":
        # PQ codes (mapped from the lists file, scanned by every search), coarse centroids (+ a list's
        # offset and size), PQ centroids (256 per sub-space), a byte a page of the vector file; the lists
        # file also holds a slot id per code (read by filtered searches only: the page cache's).
        # The float32 vectors stay on disk beside a narrower re-rank copy, unless keep_float32 is off (then
        # the re-rank rows are the only copy). From HNSW_COARSE_LISTS lists, a graph over the centroids.
        if not keep_float32 and rerank_dtype == "float32":
            raise ConfigError("--no-float32-copy needs --rerank-dtype float16 or int8 (the only copy of the vectors)")
        nlist = max(1.0, 4 * math.sqrt(n))
        row = rerank_row_bytes(dim, rerank_dtype)
        graph = 2 * HNSW_COARSE_M * 4 + 16 if nlist >= HNSW_COARSE_LISTS else 0
        resident = pq_m + tables + (nlist * (raw + 32 + graph) + 256 * raw) / n + row / 4096
        on_disk = (raw if keep_float32 else 0.0) + (row if rerank_dtype != "float32" else 0.0)
        return {
            "resident": resident,
            "disk": on_disk + pq_m + 8 + tables_disk,
            "vectors_on_disk": on_disk,
            "rerank": row,
        }
    if kind == "hnsw":  # vectors + level-0 links (2M int32) + ~1/M of nodes on upper levels
        return {
            "resident": raw + 2 * HNSW_M * 4 * (1 + 1 / HNSW_M) + tables,
            "disk": raw + 2 * HNSW_M * 4 + tables_disk,
        }
    if kind == "exact":
        return {"resident": raw + tables, "disk": raw + tables_disk}
    if kind == "scann":  # AH codes (4 bits per 2 dims), int32 ids, the reorder vectors in RAM
        return {"resident": dim / 4 + 4 + raw + tables, "disk": dim / 4 + 4 + raw + tables_disk}
    raise ConfigError(f"--kind {kind!r}: choose from {', '.join(KINDS)}")


def measured_curves(
    bench_dir: Path, kind: str, k: int, recall: float, mode: str, pq_m: int, rerank_dtype: str = "float32"
) -> list[dict[str, Any]]:
    """Per measured catalog size: the fastest point reaching `recall` at K (from docs/bench JSON); for
    ivfpq of the one code size, mode and re-rank row type (points from before the row types: float32)."""
    out: dict[int, dict[str, Any]] = {}
    for path in sorted(bench_dir.glob("pq*.json" if kind == "ivfpq" else "ann-*.json")):
        try:
            r = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if "far" in path.name:  # the far-off set is the hard case, not the user-query plan
            continue
        n = int(r.get("dataset", {}).get("items", 0))
        for p in r.get("points", []):
            if p.get("k") != k or p.get("recall", 0) < recall:
                continue
            if kind == "ivfpq":
                if p.get("pq_m") != pq_m or p.get("mode") != mode:
                    continue
                if p.get("rerank_dtype", "float32") != rerank_dtype:
                    continue
            elif p.get("series") != f"towerann {kind}":
                continue
            best = out.get(n)
            if best is None or p["p50_ms"] < best["p50_ms"]:
                out[n] = {
                    "items": n,
                    "p50_ms": p["p50_ms"],
                    "p99_ms": p["p99_ms"],
                    "recall": p["recall"],
                    "params": p.get("params"),
                    "source": path.name,
                }
    return [out[n] for n in sorted(out)]


def predict_latency(curves: list[dict[str, Any]], kind: str, n: float) -> dict[str, Any]:
    if not curves:
        return {
            "p50_ms": None,
            "p99_ms": None,
            "recall": None,
            "basis": "no committed run reaches the recall target at this K",
        }
    exact = next((c for c in curves if c["items"] == int(n)), None)
    if exact is not None:
        return {**exact, "basis": f"measured at {exact['items']:,} items ({exact['source']})"}
    if len(curves) >= 2:
        a, b = curves[-2], curves[-1]
        fitted = math.log(b["p50_ms"] / a["p50_ms"]) / math.log(b["items"] / a["items"])
        alpha = min(max(fitted, 0.0), 1.0)  # runs on a noisy machine can fit nonsense; no index is worse than linear
        how = f"fitted on {a['items']:,} and {b['items']:,} items" + (
            "" if alpha == fitted else f" ({fitted:.2f}, clamped)"
        )
    else:
        b, alpha = curves[-1], DEFAULT_ALPHA[kind]
        how = f"assumed for {kind} (one measured size)"
    scale = (n / b["items"]) ** alpha
    comparable = n <= COMPARABLE_SIZE * b["items"]
    return {
        "p50_ms": b["p50_ms"] * scale,
        "p99_ms": b["p99_ms"] * scale,
        "recall": b["recall"] if comparable else None,
        "params": b["params"],
        "alpha": alpha,
        "basis": f"extrapolated from {b['items']:,} items ({b['source']}) as n^{alpha:.2f}, alpha {how}"
        + (
            ""
            if comparable
            else f"; recall not measured at this size (the setting reached {b['recall']:.3f} at {b['items']:,} "
            "items and a larger catalog needs more of it)"
        ),
    }


def plan(
    items: float,
    dim: int,
    kind: str,
    ram_per_node: float,
    k: int = 1000,
    recall: float = 0.95,
    pq_m: int = 16,
    attributes: int = 0,
    mode: str = "warm",
    bench_dir: Path | None = None,
    headroom: float = HEADROOM,
    rerank_dtype: str = "float32",
    keep_float32: bool = True,
) -> dict[str, Any]:
    if items < 1 or dim < 1 or ram_per_node <= 0:
        raise ConfigError("--items, --dim and --ram-per-node must be positive")
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r}: choose from {', '.join(MODES)}")
    total = bytes_per_item(kind, items, dim, pq_m, attributes, rerank_dtype=rerank_dtype, keep_float32=keep_float32)
    nodes = max(1, math.ceil(items * memory_per_item(kind, total, mode) / (ram_per_node * headroom)))
    per_node = items / nodes
    node_bytes = bytes_per_item(
        kind, per_node, dim, pq_m, attributes, rerank_dtype=rerank_dtype, keep_float32=keep_float32
    )
    curves = measured_curves(bench_dir or default_bench_dir(), kind, k, recall, mode, pq_m, rerank_dtype)
    latency = predict_latency(curves, kind, per_node)
    return {
        "items": items,
        "dim": dim,
        "kind": kind,
        "k": k,
        "recall_target": recall,
        "pq_m": pq_m if kind == "ivfpq" else None,
        "mode": mode if kind == "ivfpq" else None,
        "rerank_dtype": rerank_dtype if kind == "ivfpq" else None,
        "keep_float32": keep_float32 if kind == "ivfpq" else None,
        "memory_bytes_per_item": memory_per_item(kind, node_bytes, mode),
        "ram_per_node_bytes": ram_per_node,
        "headroom": headroom,
        "resident_bytes_per_item": node_bytes["resident"],
        "disk_bytes_per_item": node_bytes["disk"],
        "nodes": nodes,
        "items_per_node": per_node,
        "resident_bytes_per_node": per_node * node_bytes["resident"],
        "disk_bytes_per_node": per_node * node_bytes["disk"],
        "per_node_latency": latency,
        "measured_curve": curves,
        "note": "per node, one query on one thread; a sharded query also pays the fan-out and merge "
        "(not in these numbers)"
        if nodes > 1
        else "one node",
    }


def memory_per_item(kind: str, model: dict[str, float], mode: str) -> float:
    """What a node's RAM must hold per item: the resident index, and for ivfpq warm (page cache) or ram
    (process) the re-rank rows too; cold reads them from disk."""
    if kind == "ivfpq" and mode != "cold":
        return model["resident"] + model["rerank"]
    return model["resident"]


def default_bench_dir() -> Path:
    """docs/bench of the checkout this module runs from, else of the current directory."""
    here = Path(__file__).resolve().parents[3] / "docs" / "bench"
    return here if here.is_dir() else Path("docs/bench")


def run(args: argparse.Namespace) -> int:
    p = plan(
        float(args.items),
        args.dim,
        args.kind,
        parse_bytes(args.ram_per_node),
        k=args.k,
        recall=args.recall,
        pq_m=args.pq_m,
        attributes=args.attributes,
        mode=args.mode,
        bench_dir=Path(args.bench_dir) if args.bench_dir else None,
        rerank_dtype=args.rerank_dtype,
        keep_float32=not args.no_float32_copy,
    )
    if args.json:
        print(json.dumps(p, indent=2))
        return 0
    lat = p["per_node_latency"]
    print(
        f"{p['items']:,.0f} items x {p['dim']}-d, {p['kind']}"
        + (f" (PQ{p['pq_m']}, {p['rerank_dtype']} re-rank rows, {p['mode']})" if p["pq_m"] else "")
    )
    print(
        f"  resident {p['resident_bytes_per_item']:.1f} B/item, in memory {p['memory_bytes_per_item']:.1f} B/item, "
        f"on disk {p['disk_bytes_per_item']:.1f} B/item"
    )
    print(
        f"  nodes: {p['nodes']} of {p['ram_per_node_bytes'] / 1e9:.0f} GB ({p['headroom']:.0%} for the index): "
        f"{p['items_per_node']:,.0f} items, {p['resident_bytes_per_node'] / 1e9:.1f} GB resident and "
        f"{p['disk_bytes_per_node'] / 1e9:.1f} GB on disk each"
    )
    if lat["p50_ms"] is None:
        print(f"  latency: unknown - {lat['basis']}")
    else:
        print(
            f"  per node at recall@{p['k']} >= {p['recall_target']}: "
            f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms"
            + (
                f" (measured recall {lat['recall']:.3f}, {lat['params']})"
                if lat["recall"] is not None
                else f" (recall not measured at this size; {lat['params']})"
            )
        )
        print(f"  basis: {lat['basis']}")
    print(f"  {p['note']}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "plan",
        help="capacity plan: bytes per item, nodes, expected recall and latency",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--items", type=float, required=True, help="catalog size (e.g. 1e9)")
    add_dim(p, 128)
    add_kind(p, "ivfpq", choices=KINDS)
    p.add_argument(
        "--ram-per-node",
        default="64GB",
        metavar="SIZE",
        help="RAM of one node, with its unit: B, KB, MB, GB, TB or KiB..TiB (default %(default)s)",
    )
    add_k(p, 1000)
    add_recall(p, "recall@K target")
    p.add_argument("--pq-m", type=int, default=16, help="ivfpq: code bytes per item (default 16)")
    p.add_argument(
        "--attributes",
        type=int,
        default=0,
        help=f"filter attributes besides category, {CODE_BYTES} B/item each (default %(default)s)",
    )
    p.add_argument(
        "--mode",
        choices=MODES,
        default="warm",
        help="ivfpq: re-rank rows in the page cache (warm) or in RAM, both counted against a node's memory, "
        "or read from disk per query (cold) (default warm)",
    )
    p.add_argument(
        "--rerank-dtype",
        default="float32",
        metavar="{" + ",".join(RERANK_DTYPES) + "}",
        help="ivfpq: the re-rank rows' type, as built (`index build --param rerank_dtype=...`; default %(default)s)",
    )
    p.add_argument(
        "--no-float32-copy",
        action="store_true",
        help="ivfpq built with keep_float32=false: the re-rank rows are the only copy of the vectors on disk",
    )
    p.add_argument("--bench-dir", default=None, help="where the committed bench JSON lives (default docs/bench)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run)
