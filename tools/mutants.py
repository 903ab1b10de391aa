#!/usr/bin/env python3
"""Targeted mutation testing: do the tests notice when the production code breaks?

Each mutant replaces one exact snippet of one file under src/towerann with a broken variant (the
snippet must occur exactly once; if it no longer does, the mutant is reported as an error, never
as killed). The working tree is never modified: src/ and tests/ (and pyproject.toml, for the
pytest settings) are copied once into a temporary tree, each mutant gets a fresh copy of that
src/ with its one change, and pytest runs in the temporary tree with its src/ first on
PYTHONPATH (ahead of the editable install's path entry). A small pytest plugin, loaded with -p,
records where every imported towerann module came from; a run that imported towerann from
anywhere but the mutant's copy is an error. Before the mutants, the same test selections run
once unmutated (the baseline): a selection that fails unmutated cannot score a mutant.

    .venv/bin/python tools/mutants.py                 # every mutant, default tests
    .venv/bin/python tools/mutants.py --list
    .venv/bin/python tools/mutants.py --only hnsw-no-selector --only merge-direction
    .venv/bin/python tools/mutants.py --tests tests/contracts/test_index_contract.py tests/unit/index/test_index_tune.py
    .venv/bin/python tools/mutants.py --only base-mask-only-with-filter -k hnsw   # who kills it on HNSW
    .venv/bin/python tools/mutants.py --tests-from HEAD   # the test files as committed (score an older suite)
    .venv/bin/python tools/mutants.py --tests /tmp/old_contract.py   # a file outside the repo

A kill counts only when it is the mutation's doing: after the mutants, every test that killed one
runs again on the unmutated tree (all in one pytest run), and a test that fails there too (a flaky
or broken test) makes the outcome an error, never a kill. A run that hits --timeout is its own outcome, "timeout",
not a kill: a mutant that makes the code slow is not caught by a test that fails. --budget-s bounds
the whole run: mutants not started when it is spent are reported "not run". --jobs N runs N mutants
at a time (each in its own copy of src/ and its own pytest temp dir), for a machine with cores to spare:
on CI's 2 cores two at a time took as long as one at a time.

Exit status: 0 every mutant killed; 1 a mutant survived; 2 an error, a timeout or a mutant not
run (snippet not found or ambiguous, baseline failing, the killing test failing unmutated,
towerann imported from the wrong tree, a mutant that breaks collection) and none survived.

To add a mutant, append a Mutant to MUTANTS: the file (relative to src/towerann), the exact
original snippet, its replacement, what it breaks, and optionally `select` (a pytest -k
expression: the tests able to see it, so a ScaNN mutant need not wait for the other backends)
and `tests` (test paths, when the default --tests cannot see it, e.g. freshness or serving).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TESTS = ("tests/contracts/test_index_contract.py",)
PYTEST_ARGS = ("-x", "-q", "-p", "no:cacheprovider", "-rfE")
GUARD = "_towerann_mutant_guard"


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/towerann
    old: str  # exact snippet, must occur exactly once
    new: str
    why: str
    select: str | None = None  # pytest -k expression; None: every selected test
    tests: tuple[str, ...] = ()  # test paths for this mutant; empty: --tests


MUTANTS: list[Mutant] = [
    # ---- base class: masks, mutations, fallbacks -------------------------------------------------
    Mutant(
        "base-mask-only-with-filter",
        "index/base.py",
        "self.run_path(q, k, p, mask, path)",
        "self.run_path(q, k, p, mask if filter is not None else None, path)",
        "the library ignores removed/unavailable items when the request has no filter",
    ),
    Mutant(
        "base-shortfall-off",
        "index/base.py",
        "        if n_short:\n",
        "        if False:\n",
        "rows the library returns short of k are not completed by exact search",
        select="library_shortfall_falls_back_to_exact",  # the whole contract file took 74 s to reach it
    ),
    Mutant(
        "base-exact-below-ignored",
        "index/path_choice.py",
        'n_qual <= int(params.get("exact_below", 0))',
        "n_qual <= 16384",
        "the exact_below search parameter is ignored (a forced-library test would silently run brute force)",
        select="library_shortfall_falls_back_to_exact",
    ),
    Mutant(
        "base-remove-keeps-slot",
        "index/base.py",
        "self._alive.set(slots, False)",
        "pass",
        "remove() does not mark the item's slot dead",
    ),
    Mutant(
        "base-upsert-keeps-old",
        "index/base.py",
        "self._alive.set(old, False)",
        "pass",
        "an upsert leaves the old vector's slot alive",
    ),
    Mutant(
        "base-set-available-ignored",
        "index/base.py",
        "self._avail.set(slots, bool(available))",
        "pass",
        "set_available() changes nothing",
    ),
    Mutant(
        "base-exact-dense-mask-ignored",
        "index/base.py",
        "scores[:, ~mask.bits] = -np.inf",
        "pass",
        "exact search over a mask admitting most slots returns masked-out slots",
    ),
    Mutant(
        "merge-direction",
        "index/merge.py",
        "part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]",
        "part = np.argpartition(scores, kk - 1, axis=1)[:, :kk]",
        "top-k keeps the lowest scores (merge direction flipped)",
    ),
    Mutant(
        "merge-padding-kept",
        "index/merge.py",
        "ids[~np.isfinite(top) | np.isnan(top)] = PAD_ID",
        "pass",
        "excluded (-inf) columns come back as real ids instead of -1 padding",
        select="removed_items_never_return",  # the whole contract file took 70 s to reach it
    ),
    # ---- backends ---------------------------------------------------------------------------------
    Mutant(
        "exact-mask-ignored",
        "index/exact.py",
        "scores = np.where(mask.bits, scores, np.float32(-np.inf))",
        "pass",
        "the exact backend's search returns masked-out slots when most qualify",
        select="exact",
    ),
    Mutant(
        "hnsw-no-selector",
        "index/hnsw.py",
        "p.sel = faiss.IDSelectorBitmap(len(mask.bits), faiss.swig_ptr(bits))",
        "pass",
        "HNSW searches without the mask's bitmap selector",
        select="hnsw",
    ),
    Mutant(
        "hnsw-ef-param-ignored",
        "index/hnsw.py",
        'ef = max(int(params["ef"]), k)',
        'ef = max(int(self.default_search["ef"]), k)',
        "HNSW ignores the ef search parameter (always searches with the class default)",
        select="hnsw",
    ),
    Mutant(
        "hnsw-efsearch-unset",
        "index/hnsw.py",
        "p.efSearch = ef",
        "pass",
        "HNSW's walk inside a mask never sets efSearch (faiss' default, 16: it walks at k whatever the ef)",
        tests=("tests/unit/index/test_hnsw_search_paths.py",),
    ),
    Mutant(
        "hnsw-walk-params-of-first-ef",
        "index/hnsw.py",
        "p = self._unmasked_params.get(ef)",
        "p = next(iter(self._unmasked_params.values()), None)",
        "HNSW's unmasked walk reuses the search parameters made for the first ef it saw, at every ef",
        select="hnsw",
    ),
    Mutant(
        "ids-take-fresh-build-unclipped",
        "index/base.py",
        'ids: np.ndarray = self.tail.data.take(slots, mode="clip")',
        "ids: np.ndarray = self.tail.data.take(np.abs(slots) // 2)",
        "a fresh build maps result slots to the wrong item ids",
    ),
    Mutant(
        "hnsw-filter-ef-not-widened",
        "index/hnsw.py",
        "ef = min(math.ceil(ef * len(mask.bits) / max(mask.count, 1)), 4 * ef)",
        "ef = ef",
        "HNSW does not widen the beam as the mask narrows",
        select="hnsw",
    ),
    Mutant(
        "hnsw-post-filter-keeps-masked",
        "index/hnsw.py",
        "ok = (slots >= 0) & mask.bits[np.maximum(slots, 0)]",
        "ok = slots >= 0",
        "HNSW's post-filtered path (most slots qualify) returns masked-out slots",
        select="hnsw",
    ),
    Mutant(
        "hnsw-post-filter-short-rows-left",
        "index/hnsw.py",
        "        if short.any():\n            out_slots[short], out_scores[short] = self._walk(q[short], k, ef, mask)",
        "        if False:\n            out_slots[short], out_scores[short] = self._walk(q[short], k, ef, mask)",
        "HNSW's post-filtered rows left short of k are not redone by the selector search",
        tests=("tests/unit/index/test_hnsw_search_paths.py",),
    ),
    Mutant(
        "ivfpq-no-selector",
        "index/ivfpq.py",
        "p.sel = faiss.IDSelectorBitmap(mask.n, faiss.swig_ptr(bits))",
        "pass",
        "IVF-PQ searches without the mask's bitmap selector",
        select="ivfpq",
    ),
    Mutant(
        "ivfpq-nprobe-param-ignored",
        "index/ivfpq.py",
        'nprobe = int(params["nprobe"])',
        'nprobe = int(self.default_search["nprobe"])',
        "IVF-PQ ignores the nprobe search parameter (always probes the class default)",
        select="ivfpq",
    ),
    Mutant(
        "ivfpq-nprobe-unset",
        "index/ivfpq.py",
        "p.nprobe = min(nprobe, trained.nlist)",
        "pass",
        "IVF-PQ never sets nprobe (faiss' default: 1 list)",
        select="ivfpq",
    ),
    Mutant(
        "ivfpq-filter-nprobe-not-widened",
        "index/ivfpq.py",
        "nprobe = math.ceil(nprobe * mask.n / max(mask.count, 1))",
        "nprobe = nprobe",
        "IVF-PQ does not probe more lists as the mask narrows",
        select="ivfpq",
    ),
    Mutant(
        "ivfpq-rerank-ignored",
        "index/ivfpq.py",
        'rerank = int(params.get("rerank") or 0)',
        "rerank = 0",
        "IVF-PQ never re-ranks with the full vectors",
        select="ivfpq",
    ),
    Mutant(
        "vecfile-fresh-tier-unscored",
        "index/vecfile.py",
        "                out[i, in_fresh] = score_stored(q[i : i + 1], encode(rows, self.dtype), self.dtype)\n",
        "                pass\n",
        "items added after a load (the in-memory tier) are never re-ranked from their own vectors",
        tests=("tests/integration/test_compressed_index.py",),
    ),
    Mutant(
        "vecfile-evict-keeps-pages",
        "index/vecfile.py",
        "        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # then the cache can let them go\n",
        "        pass\n",
        "a cold benchmark measures the page cache: the file's pages are never dropped",
        tests=("tests/integration/test_compressed_index.py",),
    ),
    Mutant(
        "scann-mask-ignored",
        "index/scann.py",
        "scores = np.where((slots >= 0) & mask.bits[slots], scores, np.float32(-np.inf))",
        "scores = np.where(slots >= 0, scores, np.float32(-np.inf))",
        "ScaNN's main tier returns masked-out slots",
        select="scann",
    ),
    Mutant(
        "scann-keeps-float-dataset",
        "index/scann.py",
        "            if self._rerank == RERANK_SCANN:  # the layout before (kept to build one for the tests)\n",
        "            if True:\n",
        "a new ScaNN build keeps its own float dataset again (its load holds the GIL building reorder state)",
        tests=("tests/unit/index/test_scann_rerank.py",),
    ),
    Mutant(
        "scann-rerank-pool-is-fetch",
        "index/scann.py",
        "self._reranked(q, k, fetch, min(reorder, self._n_main), leaves or -1, mask)",
        "self._reranked(q, k, fetch, fetch, leaves or -1, mask)",
        "the exact re-rank scores only the fetch best AH candidates, not the reorder pool",
        select="scann",
    ),
    Mutant(
        "scann-leaves-ignored",
        "index/scann.py",
        'leaves = int(params.get("leaves") or 0) if self._leaves else 0',
        "leaves = 0",
        "ScaNN ignores the leaves parameter (searches the build's default)",
        select="scann",
    ),
    Mutant(
        "scann-delta-mask-ignored",
        "index/scann.py",
        "ds = np.where(mask.bits[n_main:], inner_products(q, delta), np.float32(-np.inf))",
        "ds = inner_products(q, delta)",
        "ScaNN's delta tier (items added since the build) returns masked-out slots",
        select="scann",
    ),
    # ---- tuning ----------------------------------------------------------------------------------
    Mutant(
        "tune-takes-fallback",
        "index/tune.py",
        "        if res.exact_rows:\n",
        "        if False:\n",
        "the tuner counts rows answered by the exact fallback as ANN recall",
        tests=("tests/unit/index/test_index_tune.py",),
    ),
    Mutant(  # (keeping the first reaching setting in the sweep is no longer a bug: the turns re-decide)
        "tune-first-contender",
        "index/tune.py",
        "return near[steady_winner(rounds[:, : len(near)])], ",
        "return near[0], ",
        "the tuner keeps the first of the settings timed again in turns, not the fastest",
        tests=("tests/unit/index/test_index_tune.py",),
    ),
    Mutant(
        "auto-head-to-head-slower",
        "index/build.py",
        "better = challenger_wins",
        "better = not challenger_wins",
        "auto keeps the slower of two candidates timed in turns",
        select="auto",
        tests=("tests/unit/index/test_index_tune.py",),
    ),
    Mutant(
        "ivfpq-pays-like-the-rest",
        "index/tune.py",
        "return PAYS_RATIO_BY_KIND.get(kind, PAYS_RATIO)",
        "return PAYS_RATIO",
        "auto keeps an ivfpq that is only 2x faster than exact search (the line is 3x for ivfpq)",
        select="ivfpq_under_three_times",
        tests=("tests/unit/index/test_build_filter_plan.py",),
    ),
    Mutant(
        "ivfpq-save-links-after-adds",
        "index/ivfpq.py",
        "if self._loaded_from is None or self._ix is not None or self._vecs.fresh.n:",
        "if self._loaded_from is None:",
        "a loaded ivfpq with items added since saves the loaded files (links), losing the added items",
        select="links_its_files_until",
        tests=("tests/integration/test_ivfpq_resumable.py",),
    ),
    Mutant(
        "lean-exact-ignores-filter",
        "index/vecfile.py",
        "hidden = None if bits is None else ~bits[at:stop]",
        "hidden = None",
        "without a float32 copy, exact search over most of the catalog returns items the filter excludes",
        select="answers_are_the_same",
        tests=("tests/unit/index/test_ivfpq_no_float32.py",),
    ),
    Mutant(
        "fp16-exact-ignores-filter",
        "index/vecfile.py",
        "        params.sel = selector\n",
        "",
        "exact search over float16 rows in faiss (no float32 copy) returns items the filter excludes",
        select="answers_are_the_same and float16",
        tests=("tests/unit/index/test_ivfpq_no_float32.py",),
    ),
    Mutant(
        "exact-reads-build-array",
        "index/vecfile.py",
        "(0, self.main if self.float32 else None)",
        "(0, self._file if self.float32 else None)",
        "exact search over an in-memory ivfpq reads the array its build started from, not the rows added since",
        tests=("tests/unit/index/test_ivfpq_exact_after_add.py",),
    ),
    Mutant(
        "spilled-rows-out-of-order",
        "index/ivfpq_resumable.py",
        "block[slots - lo] = np.fromfile(rows_file, self.dtype).reshape(-1, self.cols)",
        "block[:] = np.fromfile(rows_file, self.dtype).reshape(-1, self.cols)",
        "the resumable build writes each slot range's vector rows in arrival order, not slot order",
        select="in_memory_builds_files",
        tests=("tests/integration/test_ivfpq_resumable.py",),
    ),
    Mutant(
        "resumable-build-starts-over",
        "index/ivfpq_resumable.py",
        'todo = [i for i in range(len(self.counts)) if i not in self.state["encoded"]]',
        "todo = list(range(len(self.counts)))",
        "a killed part-by-part build encodes the parts it had finished again",
        select="killed_build",
        tests=("tests/integration/test_ivfpq_resumable.py",),
    ),
    # ---- freshness and serving -------------------------------------------------------------------
    Mutant(
        "refresh-keeps-poison",
        "freshness/refresh.py",
        'fold_catalog(items, _embeddable(model_dir, entries, items["item_id"].dtype.kind in "iu"))',
        "fold_catalog(items, entries)",
        "a rebuild folds in an upsert the item tower cannot embed (and fails on it, every time)",
        tests=("tests/unit/freshness/test_refresh_poisoned_log.py",),
    ),
    Mutant(
        "bundle-map-without-add",
        "serving/bundle.py",
        "        self.index.add(vectors, internal, codes, available, attrs)  # may raise: nothing below has run yet\n",
        "",
        "the bundle's id map changes although the index never took the vectors",
        tests=("tests/unit/serving/test_bundle_changes.py",),
    ),
    Mutant(
        "retriever-never-degraded",
        "serving/retriever.py",
        "degraded = f is None",
        "degraded = False",
        "a request answered without the user's features does not say so",
        tests=("tests/unit/serving/test_limits.py",),
    ),
    Mutant(
        "app-disconnect-is-500",
        "serving/app.py",
        "status=str(status[0] or 499)",
        "status=str(status[0] or 500)",
        "a client gone mid-body is counted as a server error",
        tests=("tests/integration/test_http_bad_input.py",),
    ),
    Mutant(
        "app-bearer-case-sensitive",
        "serving/app.py",
        'if not (same and scheme.lower() == "bearer"):',
        'if not (same and scheme == "Bearer"):',
        "the bearer scheme is matched case-sensitively",
        tests=("tests/integration/test_http_bad_input.py",),
    ),
    Mutant(
        "redis-no-fail-fast",
        "features/redis_store.py",
        "if track and time.monotonic() < self._down_until:",
        "if False and time.monotonic() < self._down_until:",
        "a Redis that just failed is waited on again by every request",
        tests=("tests/integration/test_features_redis.py",),
    ),
    Mutant(
        "redis-volatile-accepted",
        "freshness/deltalog.py",
        'if found.get("appendonly") == "yes":',
        'if found.get("appendonly") in ("yes", "no"):',
        "a delta log in a Redis without appendonly is accepted",
        tests=("tests/integration/test_deltalog.py",),
    ),
    Mutant(
        "redact-forgets-passwords",
        "storeurl.py",
        "        _remember_secrets(url)\n",
        "",
        "a password outside a URL (a client library's message) is not redacted",
        tests=("tests/unit/test_redaction.py",),
    ),
    Mutant(
        "replay-from-zero",
        "freshness/live.py",
        "last = bundle.delta_seq if after is None else after",
        "last = 0 if after is None else after",
        "replay ignores the bundle's cut-off and applies entries the bundle already holds",
        select="cut_off",
        tests=("tests/integration/test_freshness.py",),
    ),
    Mutant(
        "replay-skips-deletes",
        "freshness/live.py",
        "                bundle.remove(entry.item_id)\n",
        "                pass\n",
        "a restarted server forgets acknowledged deletes",
        select="killed_server and hnsw",
        tests=("tests/integration/test_freshness.py",),
    ),
    Mutant(
        "reload-ignores-min-recall",
        "freshness/reload.py",
        "if recall < self.min_recall:",
        "if recall < 0.0:",
        "a bundle below min_recall is swapped in",
        select="min_recall",
        tests=("tests/integration/test_ann_bundles.py",),
    ),
    Mutant(
        "validation-against-itself",
        "freshness/reload.py",
        "bundle.index.exact_search(q[s : s + 4], k).ids",
        "bundle.index.search(q[s : s + 4], k).ids",
        "validation measures the index against itself, not exact search",
        select="min_recall",
        tests=("tests/integration/test_ann_bundles.py",),
    ),
    Mutant(
        "bundle-forgets-cut-off",
        "serving/bundle.py",
        'delta_seq=int((info or {}).get("delta_seq", 0))',
        "delta_seq=0",
        "a loaded bundle forgets its cut-off and replays what it holds",
        select="cut_off",
        tests=("tests/integration/test_freshness.py",),
    ),
    Mutant(
        "write-forgets-seq",
        "freshness/live.py",
        "b.upsert(rows[s:e], vectors[s:e], entries[e - 1].seq)",
        "b.upsert(rows[s:e], vectors[s:e])",
        "a live write does not advance the bundle's place in the log",
        select="in_python",
        tests=("tests/integration/test_freshness.py",),
    ),
    Mutant(
        "workers-search-not-freshened",
        "server/workers.py",
        "        if self.behind():\n            try:\n                await asyncio.wait_for(self.catch_up()",
        "        if False:\n            try:\n                await asyncio.wait_for(self.catch_up()",
        "with several workers, a search does not first apply the writes another worker acknowledged",
        select="written_through_one_worker",
        tests=("tests/integration/test_workers.py",),
    ),
    Mutant(
        "scann-loads-pickle",
        "index/scann.py",
        'if (sdir / "scann_docids.pkl").exists():',
        "if False:",
        "a pickled ScaNN id file is loaded (code execution from the artifacts directory)",
        select="pickle",
        tests=("tests/integration/test_ann_bundles.py",),
    ),
    # ---- auth, the recall monitor, shards, the filter planner, durability -----------------------------
    Mutant(
        "bearer-either-part",
        "serving/app.py",
        'if not (same and scheme.lower() == "bearer"):',
        'if not (same or scheme.lower() == "bearer"):',
        "a wrong token passes when the scheme is Bearer (or the right token under any scheme)",
        select="bearer",
        tests=("tests/integration/test_http_bad_input.py",),
    ),
    Mutant(
        "monitor-scores-ann",
        "serving/monitor.py",
        "truth = bundle.index.exact_search(query[None, :], k, filter=flt).ids[0]",
        "truth = bundle.index.search(query[None, :], k, filter=flt).ids[0]",
        "the recall monitor compares the ANN answer with another ANN answer, not exact search (always 1.0)",
        select="offline_recall",
        tests=("tests/unit/serving/test_recall_monitor.py",),
    ),
    Mutant(
        "sharded-never-partial",
        "serving/retriever.py",
        "        return bool(self.missing_shards)",
        "        return False",
        "a sharded answer without some shards does not say partial (HTTP, client, metrics)",
        tests=("tests/unit/serving/test_candidates_body.py", "tests/integration/test_serve_ray.py"),
    ),
    Mutant(
        "plan-no-recall-gate",
        "index/filter_plan.py",
        'and p["recall"] + RECALL_SE_TOLERANCE * p.get("recall_se", 0.0) >= target',
        "and True",
        "the filter planner takes the fastest path whatever its recall",
        tests=("tests/unit/index/test_plan_recall_noise.py",),
    ),
    Mutant(
        "build-skips-filter-plan",
        "index/build.py",
        "        _calibrate(index, vectors, tuning, filter_k, search)\n",
        "        pass\n",
        "index build tunes unfiltered search but measures no filter plan (filters lose recall on that path)",
        tests=("tests/unit/index/test_build_filter_plan.py",),
    ),
    Mutant(
        "write-applied-whole",
        "freshness/live.py",
        "            end = min(len(rows), start + size)\n",
        "            end = len(rows)\n",
        "a live upsert holds the event loop for its whole batch (searches wait for every row of it)",
        tests=("tests/unit/serving/test_write_slices.py",),
    ),
    Mutant(
        "hnsw-no-room-after-load",
        "index/hnsw.py",
        "        self._room_to_grow()\n",
        "",
        "a loaded HNSW graph is exactly full: its first live add copies the whole graph on the event loop",
        tests=("tests/unit/index/test_hnsw_room.py",),
    ),
    Mutant(
        "deltalog-sync-off",
        "freshness/deltalog.py",
        "PRAGMA synchronous=NORMAL",
        "PRAGMA synchronous=OFF",
        "the SQLite delta log acknowledges writes the OS has not been asked to write (lost on a crash)",
        select="durab",
        tests=("tests/integration/test_deltalog.py",),
    ),
    Mutant(
        "hidden-items-planned-as-filter",
        "index/path_choice.py",
        "    if not filtered and n_qual >= HIDDEN_ONLY_SHARE * n_slots:",
        "    if False:",
        "a few hidden items send an unfiltered search down the filter plan: brute force where it says exact",
        tests=("tests/unit/index/test_hidden_only_mask.py",),
    ),
    Mutant(
        "scann-helper-not-restarted",
        "index/scann_process.py",
        "if self._proc is None or self._proc.poll() is not None:",
        "if self._proc is None:",
        "a ScaNN helper process that died (killed, OOM) is not started again: every search fails",
        tests=("tests/unit/index/test_scann_process.py",),
    ),
    Mutant(
        "scann-helper-off-in-server",
        "server/wiring.py",
        "    load_in_helper_process()  # ScaNN's loader holds the GIL",
        "    pass  # ScaNN's loader holds the GIL",
        "a server loads ScaNN in process again: a hot swap stalls every request for the load",
        tests=("tests/unit/index/test_scann_process.py",),
    ),
    Mutant(
        "artifacts-no-fsync",
        "artifacts.py",
        "        os.fsync(fd)\n",
        "        pass\n",
        "artifact files, directories and renames are never flushed to disk before they are published",
        tests=("tests/unit/test_artifacts_durable.py",),
    ),
    Mutant(
        "room-on-load-ignored",
        "index/base.py",
        'if grows and _room_on_load and not getattr(_this_thread, "no_room", False):',
        "if False:",
        "a serving process maps a snapshot's vectors and its first live add copies them all on the event loop",
        select="reserves_room",
        tests=("tests/unit/index/test_room_on_load.py",),
    ),
    Mutant(
        "scann-delta-labels-unshifted",
        "index/scann.py",
        "d_slots, d_scores = top_inner_products(q, delta, k, first_label=n_main)",
        "d_slots, d_scores = top_inner_products(q, delta, k)",
        "an item added to a ScaNN index after its build is answered as some other item of the main tier",
        select="scann",
        tests=("tests/contracts/test_index_contract.py",),
    ),
]


GUARD_PLUGIN = '''\
"""Written by tools/mutants.py: record where every towerann module was imported from."""
import json, os, sys

def _dump():
    mods = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())
            if (n == "towerann" or n.startswith("towerann.")) and m is not None}
    with open(os.environ["TOWERANN_MUTANT_REPORT"], "w") as f:
        json.dump(mods, f)

def pytest_configure(config):
    import towerann  # noqa: F401  (imported before any test, so the report always names it)

def pytest_unconfigure(config):
    _dump()
'''


@dataclass
class Outcome:
    status: str  # killed | survived | timeout | error | not run
    detail: str = ""
    seconds: float = 0.0


def _copy_tree(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".pytest_cache"))


def prepare(tmp: Path, tests: list[str], tests_from: str | None) -> tuple[Path, list[str]]:
    """The temporary tree: a snapshot of src/ and tests/; returns (tree, test paths inside it)."""
    tree = tmp / "repo"
    tree.mkdir()
    _copy_tree(REPO / "src", tmp / "pristine-src")
    _copy_tree(REPO / "tests", tree / "tests")
    if (REPO / "pyproject.toml").exists():
        shutil.copy2(REPO / "pyproject.toml", tree / "pyproject.toml")
    if (REPO.parent / "shared").exists():  # tests that read data beside the checkout find it beside the tree
        (tmp / "shared").symlink_to(REPO.parent / "shared")
    (tmp / "plugins").mkdir()
    (tmp / "plugins" / f"{GUARD}.py").write_text(GUARD_PLUGIN)
    mapped = []
    for t in tests:
        path = Path(t)
        full = path if path.is_absolute() else REPO / path
        if tests_from:
            rel = full.resolve().relative_to(REPO) if full.resolve().is_relative_to(REPO) else None
            if rel is None:
                raise SystemExit(f"--tests-from needs test paths inside the repository, not {t}")
            text = subprocess.run(
                ["git", "-C", str(REPO), "show", f"{tests_from}:{rel.as_posix()}"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            (tree / rel).parent.mkdir(parents=True, exist_ok=True)
            (tree / rel).write_text(text)
            mapped.append(rel.as_posix())
        elif full.resolve().is_relative_to(REPO):
            mapped.append(full.resolve().relative_to(REPO).as_posix())
        else:  # outside the repo: under tests/ in the tree, so tests/conftest.py applies
            name = full.name if full.name.startswith("test_") else f"test_{full.name}"
            dest = tree / "tests" / "external" / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(full, dest)
            mapped.append(dest.relative_to(tree).as_posix())
    return tree, mapped


def apply(mutant: Mutant, pristine: Path, dest: Path) -> str | None:
    """Copy the pristine src/ to dest with the mutation applied; return an error, or None."""
    target = pristine / "towerann" / mutant.file
    if not target.exists():
        return f"file not found: src/towerann/{mutant.file}"
    text = target.read_text()
    n = text.count(mutant.old)
    if n != 1:
        return (
            f"snippet not found in src/towerann/{mutant.file}"
            if n == 0
            else f"snippet ambiguous: {n} matches in src/towerann/{mutant.file}"
        )
    if dest.exists():
        shutil.rmtree(dest)
    _copy_tree(pristine, dest)
    (dest / "towerann" / mutant.file).write_text(text.replace(mutant.old, mutant.new))
    return None


def run_pytest(
    tree: Path,
    src: Path,
    tmp: Path,
    tests: list[str],
    select: str | None,
    timeout: float,
    log: Path,
    stop_first: bool = True,
) -> Outcome:
    report = log.with_suffix(".imports.json")  # per run: runs may overlap (--jobs)
    report.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(src), str(tmp / "plugins")] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env["TOWERANN_MUTANT_REPORT"] = str(report)
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # no stale bytecode between mutants
    basetemp = tmp / "basetemp" / log.stem  # pytest's own temp dirs, one per run
    basetemp.parent.mkdir(exist_ok=True)  # pytest makes basetemp itself, not its parent
    cmd = [sys.executable, "-m", "pytest", *(a for a in PYTEST_ARGS if stop_first or a != "-x"), "-p", GUARD]
    cmd += ["--basetemp", str(basetemp), *tests]
    if select:
        cmd += ["-k", select]
    start = time.monotonic()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = None
    secs = time.monotonic() - start
    text = log.read_text(errors="replace")
    if rc is None:
        return Outcome("timeout", f"no answer within {timeout:.0f}s", secs)
    wrong = _wrong_imports(report, src)
    if wrong:
        return Outcome("error", wrong, secs)
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M)
    if rc == 0:
        return Outcome("survived", "", secs)
    if rc == 1 and failed:
        return Outcome("killed", failed[0], secs)
    tail = " | ".join(line for line in text.strip().splitlines()[-3:])
    what = {
        2: "interrupted (collection error?)",
        3: "pytest internal error",
        4: "pytest usage error",
        5: "no tests collected",
    }.get(rc, f"pytest exit {rc}")
    return Outcome("error", f"{what}: {tail[:300]}", secs)


def confirm_kills(
    results: list[tuple[Mutant, Outcome]], tree: Path, pristine: Path, tmp: Path, timeout: float, log: Path
) -> list[tuple[Mutant, Outcome]]:
    """Run every killing test once more on the unmutated tree, all in one pytest run; a mutant whose
    killer fails there too (a flaky or broken test) is an error, not a kill."""
    killers = sorted({o.detail for _, o in results if o.status == "killed"})
    if not killers:
        return results
    print(f"confirming {len(killers)} killing tests on the unmutated tree", flush=True)
    check = run_pytest(tree, pristine, tmp, killers, None, 2 * timeout, log, stop_first=False)
    if check.status == "survived":  # all passed: every kill stands
        return results
    failing = set(re.findall(r"^(?:FAILED|ERROR) (\S+)", log.read_text(errors="replace"), re.M))
    if check.status != "killed" or not failing:  # no verdict per test (a timeout, a collection error): none stands
        return [
            (
                m,
                Outcome(
                    "error",
                    f"the killing tests could not be re-run unmutated: {check.status} {check.detail}",
                    o.seconds,
                )
                if o.status == "killed"
                else o,
            )
            for m, o in results
        ]
    return [
        (
            m,
            Outcome("error", f"killed by {o.detail}, which fails unmutated too (flaky or broken)", o.seconds)
            if o.status == "killed" and o.detail in failing
            else o,
        )
        for m, o in results
    ]


def _wrong_imports(report: Path, src: Path) -> str:
    if not report.exists():
        return "the import guard wrote no report (pytest did not start?)"
    mods = json.loads(report.read_text())
    if "towerann" not in mods:
        return "towerann was never imported"
    root = src.resolve()
    bad = [f"{n} from {f}" for n, f in mods.items() if f and not Path(f).resolve().is_relative_to(root)]
    return ("towerann imported from outside the mutant's tree: " + "; ".join(bad[:3])) if bad else ""


def check_snippets(mutants: list[Mutant]) -> int:
    """0 when every mutant's snippet occurs exactly once in its file under src/towerann; else 2, one line each."""
    bad = []
    for m in mutants:
        target = REPO / "src" / "towerann" / m.file
        n = target.read_text().count(m.old) if target.exists() else -1
        if n != 1:
            where = "file not found" if n < 0 else f"{n} matches"
            bad.append(f"{m.name}: src/towerann/{m.file}: {where}")
        for t in m.tests:
            if not (REPO / t.split("::")[0]).exists():
                bad.append(f"{m.name}: test path not found: {t}")
    for line in bad:
        print(line, file=sys.stderr)
    print(f"mutants: {len(mutants) - len({b.split(':')[0] for b in bad})} of {len(mutants)} snippets apply")
    return 2 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--list", action="store_true", help="list the mutants and exit")
    ap.add_argument(
        "--check",
        action="store_true",
        help="check that every mutant's snippet occurs exactly once in its file, and exit (no tests run)",
    )
    ap.add_argument("--only", action="append", metavar="NAME", help="run only this mutant (repeatable)")
    ap.add_argument(
        "--tests",
        nargs="+",
        metavar="PATH",
        help=f"test paths for every mutant (default: each mutant's own, else {' '.join(DEFAULT_TESTS)})",
    )
    ap.add_argument("--tests-from", metavar="REV", help="take the test files from this git revision (git show)")
    ap.add_argument(
        "-k",
        "--select",
        metavar="EXPR",
        help="pytest -k expression for every mutant, replacing each mutant's own (e.g. 'hnsw')",
    )
    ap.add_argument("--timeout", type=float, default=300, help="seconds per pytest run (default 300)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of each test selection")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds for the whole run: mutants not started by then are reported 'not run' (default: none)",
    )
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at a time (default 1)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary tree and the pytest logs")
    args = ap.parse_args(argv)

    names = [m.name for m in MUTANTS]
    assert len(set(names)) == len(names), "mutant names must be unique"
    if args.list:
        for m in MUTANTS:
            sel = f"  [-k {m.select}]" if m.select else ""
            print(f"{m.name:32} src/towerann/{m.file:18} {m.why}{sel}")
        return 0
    if args.check:
        return check_snippets(MUTANTS)
    chosen = MUTANTS
    if args.only:
        unknown = sorted(set(args.only) - set(names))
        if unknown:
            print(f"unknown mutant(s): {', '.join(unknown)}; see --list", file=sys.stderr)
            return 2
        chosen = [m for m in MUTANTS if m.name in args.only]

    tmp = Path(tempfile.mkdtemp(prefix="towerann-mutants-"))
    try:
        all_tests = sorted({t for m in chosen for t in (args.tests or m.tests or DEFAULT_TESTS)})
        tree, mapped_list = prepare(tmp, all_tests, args.tests_from)
        mapped = dict(zip(all_tests, mapped_list))
        pristine = tmp / "pristine-src"
        logs = tmp / "logs"
        logs.mkdir()
        print(
            f"mutants: {len(chosen)}; tree {tmp}; src snapshot of {REPO / 'src'}"
            + (f"; tests from {args.tests_from}" if args.tests_from else ""),
            flush=True,
        )

        def selection(m: Mutant) -> tuple[tuple[str, ...], str | None]:
            return tuple(mapped[t] for t in (args.tests or m.tests or DEFAULT_TESTS)), args.select or m.select

        baseline: dict[tuple[tuple[str, ...], str | None], Outcome] = {}
        if not args.no_baseline:
            for key in dict.fromkeys(selection(m) for m in chosen):
                tests, select = key
                out = run_pytest(
                    tree, pristine, tmp, list(tests), select, args.timeout, logs / f"baseline-{len(baseline)}.log"
                )
                baseline[key] = out
                label = " ".join(tests) + (f" -k {select}" if select else "")
                ok = out.status == "survived"
                print(
                    f"baseline {label}: {'passes' if ok else 'FAILS'} ({out.seconds:.0f}s)"
                    + ("" if ok else f" {out.detail}"),
                    flush=True,
                )

        started = time.monotonic()

        def run_one(m: Mutant) -> tuple[Mutant, Outcome]:
            key = selection(m)
            base = baseline.get(key)
            if args.budget_s is not None and time.monotonic() - started > args.budget_s:
                out = Outcome("not run", f"the --budget-s of {args.budget_s:.0f}s was spent")
            elif base is not None and base.status != "survived":
                out = Outcome("error", f"unmutated tests fail: {base.detail}")
            else:
                src = tmp / "mutant-src" / m.name
                err = apply(m, pristine, src)
                if err:
                    out = Outcome("error", err)
                else:
                    out = run_pytest(tree, src, tmp, list(key[0]), key[1], args.timeout, logs / f"{m.name}.log")
                    shutil.rmtree(src, ignore_errors=True)
            print(f"{m.name}: {out.status.upper()} {out.detail} ({out.seconds:.0f}s)", flush=True)
            return m, out

        with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # threads only wait on pytest processes
            results = list(pool.map(run_one, chosen))

        results = confirm_kills(results, tree, pristine, tmp, args.timeout, logs / "unmutated-killers.log")
        width = max([len("mutant")] + [len(m.name) for m, _ in results])
        print(f"\n{'mutant':{width}}  {'result':8}  {'s':>4}  killed by / detail")
        for m, out in results:
            print(f"{m.name:{width}}  {out.status:8}  {out.seconds:4.0f}  {out.detail}")
        killed = sum(o.status == "killed" for _, o in results)
        survived = [m.name for m, o in results if o.status == "survived"]
        errors = [m.name for m, o in results if o.status in ("error", "timeout", "not run")]
        scored = killed + len(survived)
        print(
            f"\nkilled {killed}/{scored} scored ({100 * killed / max(scored, 1):.0f}%); "
            f"survived {len(survived)}; errors {sum(o.status == 'error' for _, o in results)}; "
            f"timeouts {sum(o.status == 'timeout' for _, o in results)}; "
            f"not run {sum(o.status == 'not run' for _, o in results)}; {time.monotonic() - started:.0f}s"
        )
        if args.keep:
            print(f"kept {tmp}")
        return 1 if survived else 2 if errors else 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
