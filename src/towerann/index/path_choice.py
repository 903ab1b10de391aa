"""Which path one masked search takes: the rule every search applies, and the plan table's format.

The paths and how a plan table is measured are described in `towerann.index.filter_plan`; this module
holds only what a search needs at query time, so that the slot base class does not depend on the
calibration machinery (which searches indexes itself).
"""

from __future__ import annotations

from typing import Any

from towerann.errors import BadRequest

PATHS = ("exact", "filtered", "post", "partition")


def check_path(path: Any) -> str:
    if path != "auto" and path not in PATHS:
        raise BadRequest(f"filter_path must be 'auto' or one of {', '.join(PATHS)}, got {path!r}")
    return str(path)


def check_table(table: Any) -> list[list[Any]]:
    """A filter_plan as stored in JSON: rows [k (int >= 1), max_share (0..1], path]."""
    if not isinstance(table, list):
        raise BadRequest(f"filter_plan must be a list of [k, max_share, path] rows, got {type(table).__name__}")
    for row in table:
        ok = (
            isinstance(row, (list, tuple))
            and len(row) == 3
            and isinstance(row[0], int)
            and row[0] >= 1
            and isinstance(row[1], (int, float))
            and 0 < row[1] <= 1
            and row[2] in PATHS
        )
        if not ok:
            raise BadRequest(f"filter_plan row {row!r}: expected [k >= 1, 0 < max_share <= 1, one of {PATHS}]")
    return table


# A mask with no filter (removed or hidden items only) keeping at least this share of the slots takes
# the unfiltered search with the masked slots dropped, not the plan. Such slots are scattered with
# respect to a query; a plan is measured on category masks, which follow the vectors' clusters and lose
# far more recall at the same share: at 1M items an ivfpq plan said exact from 3% kept up, so once the
# bulk writes had hidden a few items every unfiltered request was brute force (45 ms against 0.23).
HIDDEN_ONLY_SHARE = 0.5


def choose(
    n_qual: int,
    n_slots: int,
    k: int,
    params: dict[str, Any],
    filtered: bool = True,
    paths: tuple[str, ...] = PATHS,
) -> str | None:
    """The path for a masked search keeping n_qual of n_slots slots; None: the backend's own choice.
    `filtered`: the mask holds a filter (else it only drops removed or hidden items); `paths`: the
    backend's paths."""
    forced = params.get("filter_path", "auto")
    if n_qual <= k:
        return "exact"
    if forced != "auto":
        return str(forced)
    if n_qual <= int(params.get("exact_below", 0)):
        return "exact"
    if not filtered and n_qual >= HIDDEN_ONLY_SHARE * n_slots:
        return "post" if "post" in paths else "filtered"
    table = params.get("filter_plan")
    if not table:
        return None
    ks = sorted({row[0] for row in table})
    at = next((x for x in ks if x >= k), ks[-1])
    share = n_qual / max(n_slots, 1)
    rows = [row for row in table if row[0] == at]
    return str(next((row[2] for row in rows if share <= row[1]), rows[-1][2]))
