"""Re-tune a published snapshot's search settings without rebuilding it (`towerann index tune`).

The tuner picks the fastest setting reaching a recall target *as measured on the machine it ran on*:
a build on a busy machine (or for another K, recall target or server type) can pick a setting that is
wrong for the serving machine. Re-tuning loads the current version,
measures again (`index.tune`; the filter plan too when the snapshot has one, since its paths run at
the new setting), and publishes a new version: the same data files as hard links, a new manifest. A
rebuild of 10M items takes about half an hour; this takes minutes, and a running server picks the new
version up on its next reload like any other.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from towerann.errors import ConfigError
from towerann.index.filter_plan import calibrate
from towerann.index.snapshot import CURRENT, load_snapshot, republish, resolve
from towerann.index.tune import tune

log = logging.getLogger(__name__)


def retune(
    root: str | Path, queries: np.ndarray, k: int, recall: float, keep: int = 3, calibrate_filters: bool | None = None
) -> tuple[Path, dict[str, Any]]:
    """Tune the CURRENT version of snapshot root `root` again on `queries` (user-tower vectors) to
    `recall` at `k` and publish the result as a new version. calibrate_filters None: re-measure the
    filter plan when the snapshot has one. Returns (the new version's path, the tuning result)."""
    root = Path(root)
    if not (root / CURRENT).exists():
        raise ConfigError(
            f"{root}: not a snapshot root (no {CURRENT}); give the directory that `index build --out` "
            "or `serve --index` names"
        )
    source = resolve(root)
    index = load_snapshot(source)
    if index.kind == "exact":
        raise ConfigError(f"{source}: an exact index has no search settings to tune")
    manifest = dict(index.manifest or {})  # load_snapshot always sets it
    # Settings the old tuning chose go; explicit settings given at build time (and exact_below) stay.
    for key in (index.tuning or {}).get("params", {}):
        index.search_defaults.pop(key, None)
    result = tune(index, queries, k, recall)
    if calibrate_filters is None:
        calibrate_filters = manifest.get("filter_calibration") is not None
    if calibrate_filters:  # else the old plan stays: its paths still exist, its thresholds may be off
        calibrate(index, queries, ks=(k,), target=recall)
    manifest.update(
        search_defaults=index.search_defaults,
        tuning=index.tuning,
        filter_calibration=index.filter_calibration,
        retuned_from=source.name,
    )
    path = republish(root, source, manifest, keep=keep)
    log.info(
        "re-tuned %s: %s (recall@%d %.4f, p50 %s ms) -> %s",
        source.name,
        result["params"],
        k,
        result["recall"],
        result["p50_ms"],
        path.name,
    )
    return path, result
