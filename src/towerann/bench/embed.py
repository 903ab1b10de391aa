"""`towerann bench embed`: batch embedding end to end (Parquet in, vectors out) beside its ceilings.

In one run: the machine's SGEMM rate, the item tower alone on in-memory tensors, each stage alone
(Parquet decode, feature encoding) and the whole `embed_catalog`. Reported as items/s, achieved
GFLOP/s (from the Linear layers' FLOPs per item), and ratios to SGEMM and to the pure tower, so
the cost of IO and encoding is visible.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from towerann.bench.options import add_catalog, add_out
from towerann.bench.report import memory_bandwidth_gbs, sgemm_gflops, write_report
from towerann.errors import ArtifactError, DataError

log = logging.getLogger(__name__)

SAMPLE = 1 << 20  # rows timed stage by stage (the whole catalog goes through embed_catalog)
TRAIN_ITEMS, TRAIN_USERS = 20_000, 2_000


def tower_flops_per_item(tower: torch.nn.Module) -> int:
    """Multiply-adds x 2 of every Linear layer: the FLOPs one item costs (embeddings are lookups)."""
    return sum(2 * m.in_features * m.out_features for m in tower.modules() if isinstance(m, torch.nn.Linear))


def _reuse(path: Path, check: Any, invalid: type[Exception]) -> Path | None:
    """`path` if an earlier run left a valid artifact there (check passes), else None (and it is removed)."""
    try:
        check(path)
    except invalid:
        shutil.rmtree(path, ignore_errors=True)
        return None
    log.info("reusing %s", path)
    return path


def _catalog(work: Path, n_items: int) -> Path:
    from towerann.data.dataset import validate_dataset
    from towerann.data.synth import generate

    path = work / f"catalog-{n_items}"
    return _reuse(path, validate_dataset, DataError) or generate(path, n_items, 1000, seed=1)


def _model(work: Path) -> Path:
    from towerann.data.synth import generate
    from towerann.model.model import model_version_of
    from towerann.model.towers import TowerConfig
    from towerann.model.train import TrainConfig, train

    path = work / "model"
    if _reuse(path, model_version_of, ArtifactError):
        return path
    data = generate(work / "train-data", TRAIN_ITEMS, TRAIN_USERS, seed=0, overwrite=True)
    train(data, path, TowerConfig(), TrainConfig(epochs=2, max_seconds=60), overwrite=True)  # default tower sizes
    return path


def _stages(model_dir: Path, items: Path, batch_size: int, threads: int) -> dict[str, Any]:
    """Each stage alone on the first SAMPLE rows: decode, encode, tower on tensors already in memory."""
    from towerann.embed.runner import (
        encode_batch,
        filter_categories,
        iter_batches_from,
        open_catalog,
        resolve_items_file,
    )
    from towerann.model.model import TwoTowerModel

    model = TwoTowerModel.load(model_dir)
    file = resolve_items_file(items)
    columns = model.schema.item_columns()
    pf = open_catalog(file, columns)
    t0 = time.perf_counter()
    batches = []
    for start, b in iter_batches_from(pf, file, columns, 0, batch_size):
        if start >= SAMPLE:
            break
        batches.append((start, b))
    t1 = time.perf_counter()
    vocab = filter_categories(pf, model)
    encoded = [encode_batch(model, b, s, vocab) for s, b in batches]
    t2 = time.perf_counter()
    n = sum(len(e.available) for e in encoded)
    tower = model.net.item_tower.eval()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for e in encoded[:2]:
                tower(*e.inputs)  # warm-up
            times = []
            for _ in range(3):
                t = time.perf_counter()
                for e in encoded:
                    tower(*e.inputs)
                times.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    tower_s = float(np.median(times))
    return {
        "sample_items": n,
        "read_s": t1 - t0,
        "encode_s": t2 - t1,
        "tower_s": tower_s,
        "flops_per_item": tower_flops_per_item(tower),
        "dim": model.dim,
    }


def measure(
    n_items: int = 1_000_000,
    model_dir: str | Path | None = None,
    work: str | Path = "bench-results/embed-data",
    batch_size: int = 16384,
    keep: bool = False,
) -> dict[str, Any]:
    from towerann.embed.runner import embed_catalog

    work = Path(work)
    work.mkdir(parents=True, exist_ok=True)
    catalog = _catalog(work, n_items)
    model_path = Path(model_dir) if model_dir else _model(work)
    threads = os.cpu_count() or 1

    sgemm = sgemm_gflops(threads=threads)
    bandwidth = memory_bandwidth_gbs()
    stages = _stages(model_path, catalog, batch_size, threads)
    flops = stages["flops_per_item"]

    out = work / f"vectors-{n_items}"
    stats: dict[str, Any] = {}
    t0 = time.perf_counter()
    embed_catalog(model_path, catalog, out, batch_size=batch_size, resume=False, overwrite=True, stats=stats)
    seconds = time.perf_counter() - t0
    out_bytes = sum(f.stat().st_size for f in out.iterdir())
    if not keep:
        shutil.rmtree(out)

    per_item = {k: stages[k] / stages["sample_items"] for k in ("read_s", "encode_s", "tower_s")}
    pure_items_s = 1.0 / per_item["tower_s"]
    items_s = n_items / seconds
    tower_gflops = flops * pure_items_s / 1e9
    e2e_gflops = flops * items_s / 1e9
    return {
        "items": n_items,
        "batch_size": batch_size,
        "threads": threads,
        "model": str(model_path),
        "dim": stages["dim"],
        "flops_per_item": flops,
        "end_to_end": {
            "seconds": seconds,
            "items_per_s": items_s,
            "gflops": e2e_gflops,
            "output_bytes": out_bytes,
            "stages_in_run_s": {k: v for k, v in stats.items() if k.endswith("_s")},
        },
        "pure_tower": {"items_per_s": pure_items_s, "gflops": tower_gflops, "sample_items": stages["sample_items"]},
        "stage_alone_s_for_catalog": {
            "parquet_decode": per_item["read_s"] * n_items,
            "feature_encode": per_item["encode_s"] * n_items,
            "tower": per_item["tower_s"] * n_items,
        },
        "machine_sgemm_gflops": sgemm,
        "machine_memory_bandwidth_gbs": bandwidth,
        "ratio_tower_to_sgemm": tower_gflops / sgemm,
        "ratio_end_to_end_to_sgemm": e2e_gflops / sgemm,
        "ratio_end_to_end_to_pure_tower": items_s / pure_items_s,
        "load_average_at_end": os.getloadavg()[0],
    }


def _plot(result: dict[str, Any]) -> Callable[[Any], None]:
    def draw(fig: Any) -> None:
        ax = fig.add_subplot(1, 1, 1)
        alone = result["stage_alone_s_for_catalog"]
        names = ["Parquet decode", "feature encode", "item tower", "sum of stages", "end to end"]
        vals = [
            alone["parquet_decode"],
            alone["feature_encode"],
            alone["tower"],
            sum(alone.values()),
            result["end_to_end"]["seconds"],
        ]
        bars = ax.bar(names, vals, color=["C0", "C0", "C0", "C7", "C3"])
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.1f}s", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom")
        ax.set_ylabel(f"seconds for {result['items']:,} items")
        ax.set_title(
            f"Batch embedding, {result['threads']} threads: tower at "
            f"{result['ratio_tower_to_sgemm']:.0%} of SGEMM ({result['machine_sgemm_gflops']:.0f} GFLOP/s), "
            f"end to end {result['end_to_end']['items_per_s']:,.0f} items/s"
        )

    return draw


def run(args: argparse.Namespace) -> int:
    result = measure(args.items, args.model, args.work, args.batch_size, args.keep)
    json_path, png_path = write_report(args.out, f"embed-{args.items}", result, _plot(result))
    e = result["end_to_end"]
    print(
        f"{result['items']:,} items in {e['seconds']:.1f} s = {e['items_per_s']:,.0f} items/s "
        f"({e['gflops']:.1f} GFLOP/s end to end, {result['ratio_end_to_end_to_sgemm']:.0%} of SGEMM)"
    )
    print(
        f"item tower alone: {result['pure_tower']['gflops']:.1f} GFLOP/s = {result['ratio_tower_to_sgemm']:.0%} of "
        f"SGEMM {result['machine_sgemm_gflops']:.1f}; "
        f"end to end = {result['ratio_end_to_end_to_pure_tower']:.0%} of the pure tower"
    )
    print(f"wrote {json_path} and {png_path}")
    return 0


def add_bench_command(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "embed",
        help="batch embedding throughput vs the pure tower and SGEMM",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_catalog(p, 1_000_000, dim=None)
    p.add_argument("--model", default=None, help="model directory (default: train a small one, reused)")
    p.add_argument(
        "--work",
        default="bench-results/embed-data",
        help="where catalogs, the model and vectors go (reused; default bench-results/embed-data)",
    )
    p.add_argument("--batch-size", type=int, default=16384, help="items per tower batch (default 16384)")
    p.add_argument("--keep", action="store_true", help="keep the vectors directory (default: remove it)")
    add_out(p, "embed-N.json and embed-N.png")
    p.set_defaults(func=run)
