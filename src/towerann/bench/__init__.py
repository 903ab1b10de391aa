"""Benchmarks: towerann measured beside its peers and against the machine's own ceilings, each a
`towerann bench NAME` subcommand (commands.py lists them) writing NAME.json and NAME.png through
report.py, and `towerann plan` (capacity.py), which reads the committed results to size a deployment.
The options the benchmarks share are declared once in options.py.

The names below are loaded from their modules on first use, so importing the package imports no
benchmark (nor torch, faiss or ray).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from towerann.lazy import lazy_names

if TYPE_CHECKING:
    from towerann.bench.ann import run_ann_bench
    from towerann.bench.capacity import plan
    from towerann.bench.compressed import run_pq_bench
    from towerann.bench.filter import run_filter_bench
    from towerann.bench.report import percentiles, write_report
    from towerann.bench.shards import run_shards_bench

__all__ = [
    "percentiles",
    "plan",
    "run_ann_bench",
    "run_filter_bench",
    "run_pq_bench",
    "run_shards_bench",
    "write_report",
]

_MODULE_OF = {
    "run_ann_bench": "ann",
    "plan": "capacity",
    "run_pq_bench": "compressed",
    "run_filter_bench": "filter",
    "percentiles": "report",
    "write_report": "report",
    "run_shards_bench": "shards",
}

if not TYPE_CHECKING:  # the type checker reads the imports above instead
    __getattr__ = lazy_names(__name__, _MODULE_OF)
