"""`towerann embed --ray`: the catalog's parts embedded by Ray tasks across a cluster.

One task per part (catalog rows [i * part_size, (i + 1) * part_size)) runs `embed_rows`, the same
function the local runner runs for that part, so the vectors are byte-identical to a local run of
the same model. Not Ray Data's `map_batches`: its blocks would cut the tower's batches elsewhere, and
whether a device's GEMM gives each row the same bits in any batch is not ours to promise.

Workers read the model directory and the catalog at the paths given (a shared filesystem, or the same
files copied to every node) and return their arrays through the object store; the driver writes the
parts, the progress file and the manifest exactly as the local runner does, so an interrupted run
resumes with either runner and nothing needs a shared writable disk.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from towerann.cluster.ray_shards import require_ray
from towerann.embed.runner import finish_run, start_run, write_finished_part
from towerann.errors import ConfigError, DataError, TowerannError

log = logging.getLogger(__name__)

_MODELS: dict[tuple[str, str], Any] = {}  # per worker process: the model a previous task loaded


def embed_part(
    model_dir: str,
    model_version: str,
    file: str,
    columns: list[str],
    rows: tuple[int, int],
    n_rows: int,
    batch_size: int,
    filter_values: list[str],
    attr_vocab: dict[str, list[str]],
    threads: int,
) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """One part on a Ray worker: its vectors, attribute arrays and the node that ran it. Checks that this node sees the
    driver's model and catalog (same version, same row count) before it spends a core on them."""
    import torch

    from towerann.embed.runner import embed_rows, open_catalog
    from towerann.model.model import TwoTowerModel
    from towerann.model.schema import CategoricalColumn

    torch.set_num_threads(max(1, threads))
    key = (model_dir, model_version)
    if key not in _MODELS:
        model = TwoTowerModel.load(model_dir)
        if model.version != model_version:
            raise DataError(
                f"{model_dir} on this node holds model {model.version}, the driver's is {model_version}; "
                "every node must see the same model directory"
            )
        _MODELS.clear()
        _MODELS[key] = model
    model = _MODELS[key]
    pf = open_catalog(Path(file), columns)
    if pf.metadata.num_rows != n_rows:
        raise DataError(
            f"{file} on this node has {pf.metadata.num_rows} rows, the driver's has {n_rows}; "
            "every node must see the same catalog"
        )
    import ray

    vectors, attrs = embed_rows(
        model,
        model.net.item_tower.eval(),
        pf,
        Path(file),
        columns,
        rows[0],
        rows[1],
        batch_size,
        CategoricalColumn("category", filter_values),
        attr_vocab,
        torch.device("cpu"),
    )
    return vectors, attrs, ray.get_runtime_context().get_node_id()


def embed_catalog_ray(
    model_dir: str | Path,
    items: str | Path,
    out: str | Path,
    address: str | None = None,
    batch_size: int = 16384,
    part_size: int = 1_048_576,
    resume: bool = True,
    overwrite: bool = False,
    cpus_per_task: int = 1,
    progress: bool | None = None,
    stats: dict[str, Any] | None = None,
    attributes: tuple[str, ...] | list[str] = (),
) -> Path:
    """`embed_catalog` with the parts run as Ray tasks. `address`: a running cluster ("auto", or
    host:port of `ray start --head`); None connects as `ray.init()` does (RAY_ADDRESS, a cluster
    started on this machine, else a new local one). Already connected: that connection is used."""
    ray = require_ray()
    if cpus_per_task < 1:
        raise ConfigError(f"cpus_per_task must be >= 1 (got {cpus_per_task})")
    t_start = time.perf_counter()
    run = start_run(model_dir, items, out, batch_size, part_size, resume, overwrite, attributes)
    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level="ERROR")
    task = ray.remote(embed_part).options(num_cpus=cpus_per_task)
    # Enough tasks in flight to keep every core of the cluster busy, and no more: each result is a
    # whole part (part_size x dim floats) in the object store until the driver has written it.
    window = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus_per_task)) + 1
    todo = list(range(len(run.parts), run.n_parts))
    args = (str(run.model_dir.resolve()), run.model.version, str(run.file.resolve()), run.columns)
    pending: dict[Any, int] = {}
    finished: dict[int, dict[str, Any]] = {}  # parts written ahead of an earlier one still running
    nodes: set[str] = set()
    bar = tqdm(
        total=run.n_rows,
        initial=run.done_rows,
        desc="embed (ray)",
        unit="item",
        unit_scale=True,
        disable=None if progress is None else not progress,
    )
    try:
        while todo or pending:
            while todo and len(pending) < window:
                i = todo.pop(0)
                pending[
                    task.remote(
                        *args,
                        run.rows(i),
                        run.n_rows,
                        batch_size,
                        run.filter_vocab.values,
                        run.attr_vocab,
                        cpus_per_task,
                    )
                ] = i
            [ref], _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ref)
            try:
                vectors, attrs, node = ray.get(ref)
            except ray.exceptions.RayTaskError as e:
                cause = getattr(e, "cause", None)
                if isinstance(cause, TowerannError):  # the worker's own clear message, not a traceback
                    raise type(cause)(f"part {i}: {cause}") from None
                raise
            nodes.add(node)
            finished[i] = write_finished_part(run.work, i, run.rows(i)[0], vectors, attrs)
            del vectors, attrs, ref
            bar.update(finished[i]["count"])
            while len(run.parts) in finished:  # the progress file lists a finished prefix of the parts
                run.parts.append(finished.pop(len(run.parts)))
                run.save_progress()
    finally:
        bar.close()
        for ref in pending:
            ray.cancel(ref)
    finish_run(run, out, overwrite)
    if stats is not None:
        stats.update(
            count=run.n_rows,
            total_s=time.perf_counter() - t_start,
            runner="ray",
            nodes=len(nodes),
            cluster_cpus=ray.cluster_resources().get("CPU", 0),
        )
    log.info("embedded %d items into %s on Ray in %.1fs", run.n_rows, out, time.perf_counter() - t_start)
    return Path(out)
