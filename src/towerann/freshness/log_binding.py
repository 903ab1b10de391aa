"""Which delta log belongs to which index root, checked before a root is served or refreshed.

A bundle's `delta_seq` is a place in one particular log: the entries after it are what a server must
replay. Served with another root's log, a server replays that catalog's writes into this one; with a
log that is behind the bundle (another log, or one that was reset), it replays nothing and writes
acknowledged before are lost without a word. So:

- every delta log has an id and, once bound, the id of the root it belongs to (kept in the log:
  a `meta` table in SQLite, a `<key>:meta` hash in Redis);
- every root has `root.json`: its own id and the log it was last served with (id and where);
- `bind_delta_log` refuses, in one line naming both, a log that belongs to another root, a log
  that ends before the bundle's cut-off, and a switch to another log (another store, or a new
  file) while the root's previous log holds entries newer than the bundle (they would never be
  replayed). A previous log that cannot be read from here (Redis) is assumed to hold such entries,
  unless [freshness] adopt_log = true says they are folded into a bundle or may go.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import tempfile
import uuid
from pathlib import Path
from typing import Any

from towerann.artifacts import write_json_atomic
from towerann.errors import ConfigError
from towerann.freshness.deltalog import DeltaLog

log = logging.getLogger(__name__)

ROOT_FILE = "root.json"


def root_id(root: str | Path) -> str:
    """The root's id, made on first use (atomically: several workers starting at once agree on one)."""
    path = Path(root) / ROOT_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{ROOT_FILE}.", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump({"root_id": uuid.uuid4().hex, "delta_log": None}, f)
        try:
            os.link(tmp, path)  # fails if another process made it first: theirs stands
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    return str(_record(path)["root_id"])


def _record(path: Path) -> dict[str, Any]:
    try:
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or not isinstance(record.get("root_id"), str):
            raise ValueError("no root_id")
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable ({e}); it names the index root's delta log - restore it") from e
    return record


def bind_delta_log(root: str | Path, delta: DeltaLog, bundle_delta_seq: int, adopt: bool = False) -> None:
    """Check that `delta` is the log of index root `root` and holds the bundle's cut-off; bind the
    log to the root (and record it in root.json) when it is new. Raises ConfigError otherwise."""
    root = Path(root)
    rid = root_id(root)
    log_id, owner = delta.identity()
    if owner is not None and owner != rid:
        raise ConfigError(
            f"{delta.where} belongs to another index root (id {owner}), not {root} (id {rid}): give "
            "each root a log of its own ([freshness] delta_path, or another Redis db)"
        )
    record = _record(root / ROOT_FILE)
    previous = record.get("delta_log") or None
    legacy = root.parent / "delta.sqlite"  # where the log was kept before roots had their own
    here_path = getattr(delta, "path", None)
    if previous is None and legacy.exists() and (here_path is None or Path(here_path).resolve() != legacy.resolve()):
        previous = {
            "where": f"the SQLite delta log {legacy} (the default before {root}/delta.sqlite)",
            "path": str(legacy),
        }
    if previous is not None and previous.get("id") != log_id and not adopt:  # a switch to another log
        newer = _newer_entries(previous, bundle_delta_seq)
        if newer != 0:
            held = (
                f"holds entries up to seq {newer}, newer than the bundle's cut-off {bundle_delta_seq}"
                if newer
                else "cannot be read from here, and may hold entries newer than the bundle"
            )
            raise ConfigError(
                f"{root} was served with {previous.get('where')}, which {held}; serving it with "
                f"{delta.where} would never replay them: go back to that log, or fold it into a bundle "
                "first (towerann refresh with it), or set [freshness] adopt_log = true to let them go"
            )
    last = delta.last_seq()
    if last < bundle_delta_seq:
        raise ConfigError(
            f"the bundle served from {root} folds {delta.where} up to seq {bundle_delta_seq}, but that "
            f"log ends at seq {last}: it is another log, or it was reset (writes acknowledged after the "
            "bundle's cut-off are gone); serve the bundle with the log it was built from"
        )
    if delta.claim(rid) != rid:  # another root bound it between our two looks
        raise ConfigError(
            f"{delta.where} was bound to another index root while {root} was starting; give each root a log of its own"
        )
    here = {"id": log_id, "where": delta.where, **({"path": str(Path(here_path).resolve())} if here_path else {})}
    if record.get("delta_log") != here:
        if previous is not None:
            log.warning("index root %s: delta log %s replaces %s", root, delta.where, previous.get("where"))
        write_json_atomic(root / ROOT_FILE, {**record, "delta_log": here})
        log.info("index root %s: bound to %s", root, delta.where)


def _newer_entries(previous: dict[str, Any], cut: int) -> int | None:
    """The last seq of the root's previous log when it is above `cut`, 0 when it holds nothing newer
    (or no longer exists), None when it cannot be read from here (a Redis log)."""
    path = previous.get("path")
    if not path:
        return None
    if not Path(path).exists():
        return 0
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            last = int(db.execute("SELECT MAX(seq) FROM delta").fetchone()[0] or 0)
        finally:
            db.close()
    except sqlite3.DatabaseError:
        return None
    return last if last > cut else 0
