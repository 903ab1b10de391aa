"""The live re-tune of a serving process (serving.retune_loop) wired to its service: the reservoir of live
queries, the loop, its metrics in the app's registry, and the rebuild [freshness] rebuild_on_drift runs.
Used by the single-process server (server.server) and by each worker process (server.workers)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from fastapi import FastAPI

from towerann.index.snapshot import CURRENT
from towerann.server.wiring import Service
from towerann.serving.retune_loop import RetuneLoop, attach

log = logging.getLogger(__name__)


def rebuilder(svc: Service) -> Callable[[str], None] | None:
    """What [freshness] rebuild_on_drift runs when no re-tune restores a bundle's recall target: a refresh
    (freshness.refresh: the [paths] data catalog and the delta log up to now, embedded by the served
    bundle's own model, built as the served index is and tuned to its target) published under the root,
    then swapped in by the CURRENT watcher (or at once when [freshness] poll_s is 0). None where the server
    cannot rebuild: the index path is not a snapshot root or [paths] data holds no dataset; and at the
    time, a vectors-only bundle (no item tower: only reported)."""
    cfg = svc.cfg
    root, data = Path(cfg.paths.index), Path(cfg.paths.data)
    if not (root / CURRENT).is_file() or not (data / "manifest.json").is_file():
        return None

    def rebuild(reason: str) -> None:
        from towerann.freshness.refresh import refresh

        b = svc.retriever.holder.current()
        if b.vectors_only or not (b.path / "model").is_dir():
            log.warning(
                "rebuild on drift: bundle %s has no item tower of its own here; publish a new one "
                "(`towerann refresh --vectors FILE`)",
                b.version,
                extra={"event": "rebuild_skipped", "version": b.version},
            )
            return
        tuned = b.index.tuning or {}
        log.info(
            "rebuild on drift started: bundle %s (%s)",
            b.version,
            reason,
            extra={"event": "rebuild_started", "version": b.version, "reason": reason},
        )
        out = refresh(
            data,
            b.path / "model",
            root,
            svc.writer.delta,
            kind=b.index.kind,
            recall=tuned.get("target"),
            k=int(tuned.get("k") or 100),
            keep=cfg.retune.keep,
            progress=False,
            params=dict(b.index.build_params),
            attributes=cfg.filters.attributes,
        )
        log.info(
            "rebuild on drift published %s (%d items, %.1fs)",
            Path(out["path"]).name,
            out["items"],
            out["seconds"],
            extra={"event": "rebuild_published", "version": Path(out["path"]).name},
        )
        if svc.reloader is not None and cfg.freshness.poll_s <= 0:
            svc.reloader.reload("rebuild on drift")

    return rebuild


def start_live_retune(svc: Service, app: FastAPI | None, worker: str | None = None) -> RetuneLoop | None:
    """The reservoir of live queries and the live re-tune of this serving process (serving.retune_loop),
    its metrics in `app`'s registry; None when the recall monitor is off. `worker`: with several worker
    processes, this one's index (each keeps its own reservoir directory; worker 0 alone re-tunes)."""
    cfg = svc.cfg
    root = Path(cfg.paths.index)
    metrics = getattr(getattr(app, "state", None), "metrics", None)
    return attach(
        cfg,
        svc.retriever.holder,
        svc.retriever.monitor,
        svc.writer.lock,
        root if (root / CURRENT).is_file() else None,
        registry=getattr(metrics, "registry", None),
        rebuild=rebuilder(svc) if cfg.freshness.rebuild_on_drift else None,
        writer="main" if worker is None else f"worker-{worker}",
        judge=worker is None or worker == "0",
    )
