"""A delta log belongs to one index root (freshness/log_binding.py): each root keeps its own writes,
a server refuses another root's log, a log behind its bundle, and a switch of store that would leave
acknowledged writes unreplayed; a rollback replays every acknowledged write newer than the bundle it
returns to, on the embedded store and on Redis."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from ann_catalog import AUTH, TOKEN

from towerann.cli import main
from towerann.config import Config, FeaturesConfig, FreshnessConfig, PathsConfig, ServeConfig
from towerann.data.dataset import read_items
from towerann.errors import ConfigError
from towerann.freshness.publish import publish_bundle
from towerann.index.snapshot import current_version
from towerann.server.server import start_background
from towerann.server.wiring import open_service


def config(root: Path, tmp: Path, store: str = "embedded", delta_path: str = "", adopt: bool = False) -> Config:
    (tmp / "token").write_text(TOKEN)
    return Config(
        serve=ServeConfig(max_k=100),
        paths=PathsConfig(index=str(root)),
        features=FeaturesConfig(store=store, path=str(tmp / "features.sqlite")),
        freshness=FreshnessConfig(delta_path=delta_path, token_file=str(tmp / "token"), poll_s=0.0, adopt_log=adopt),
    )


def copy_root(bundle_paths: dict[str, Path], dest: Path) -> Path:
    """A new root with the session bundle's versions (not its id and log: other tests serve that root)."""
    shutil.copytree(bundle_paths["index"], dest, ignore=shutil.ignore_patterns("root.json", "delta.sqlite*"))
    return dest


def item(bundle_paths: dict[str, Path], item_id: str, category: str) -> dict[str, Any]:
    row = read_items(bundle_paths["data"]).iloc[0]
    out = {k: (v.item() if hasattr(v, "item") else v) for k, v in row.items()}
    return {**out, "item_id": item_id, "category": category, "available": True}


def write_item(cfg: Config, row: dict[str, Any]) -> None:
    handle = start_background(cfg)
    try:
        r = httpx.post(f"{handle.url}/v1/items", json={"items": [row]}, headers=AUTH)
        assert r.status_code == 200, r.text
    finally:
        handle.stop()


def holds(cfg: Config, item_id: str) -> bool:
    """Does a server started on `cfg` hold the item (a PATCH of it is 200, not 404)?"""
    handle = start_background(cfg)
    try:
        r = httpx.patch(f"{handle.url}/v1/items/{item_id}", json={"available": True}, headers=AUTH)
        assert r.status_code in (200, 404), r.text
        return r.status_code == 200
    finally:
        handle.stop()


def refused(cfg: Config) -> str:
    with pytest.raises(ConfigError) as e:
        open_service(cfg).close()
    return str(e.value)


def test_two_roots_in_one_folder_keep_their_own_writes(bundle_paths: dict[str, Path], tmp_path: Path) -> None:
    mine = copy_root(bundle_paths, tmp_path / "indexes" / "mine")
    plain = copy_root(bundle_paths, tmp_path / "indexes" / "plain")
    write_item(config(mine, tmp_path), item(bundle_paths, "880100", "only-mine"))
    assert (mine / "delta.sqlite").exists() and not (tmp_path / "indexes" / "delta.sqlite").exists()
    assert holds(config(mine, tmp_path), "880100")
    assert not holds(config(plain, tmp_path), "880100")  # before: replayed from the shared log
    # plain served with mine's log: refused, naming both
    why = refused(config(plain, tmp_path, delta_path=str(mine / "delta.sqlite")))
    assert "belongs to another index root" in why and str(plain) in why and str(mine / "delta.sqlite") in why


def test_a_log_behind_the_bundle_is_refused(bundle_paths: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "indexes"
    publish_bundle(root, bundle_paths["model"], bundle_paths["vectors"], kind="exact", delta_seq=9)
    why = refused(config(root, tmp_path))
    assert "up to seq 9" in why and "ends at seq 0" in why and str(root / "delta.sqlite") in why


@pytest.fixture
def durable_redis(private_redis: Callable[..., Any], free_port: int) -> str:
    """A redis-server of the test's own that logs every write before it answers: its URL."""
    private_redis(free_port, "--appendonly", "yes", "--appendfsync", "always")
    return f"redis://127.0.0.1:{free_port}/0"


def test_switching_store_while_the_old_log_holds_newer_writes_is_refused(
    bundle_paths: dict[str, Path], tmp_path: Path, durable_redis: str
) -> None:
    root = copy_root(bundle_paths, tmp_path / "indexes")
    write_item(config(root, tmp_path), item(bundle_paths, "880200", "switch"))  # seq 1 > the bundle's 0
    why = refused(config(root, tmp_path, store=durable_redis))
    assert (
        str(root / "delta.sqlite") in why and "Redis at redis://127.0.0.1" in why and "newer than the bundle" in why
    ), why
    assert holds(config(root, tmp_path, store=durable_redis, adopt=True), "880200") is False  # adopted: let go
    # Back to the embedded log: the root was last served with the Redis one, which cannot be read from
    # an embedded configuration, so the switch is refused too (adopt_log would allow it).
    assert "cannot be read from here" in refused(config(root, tmp_path))


@pytest.mark.parametrize("store", ["embedded", "redis"])
def test_a_rollback_replays_every_write_newer_than_the_bundle_it_returns_to(
    store: str, bundle_paths: dict[str, Path], tmp_path: Path, request
) -> None:
    url = request.getfixturevalue("durable_redis") if store == "redis" else "embedded"
    root = copy_root(bundle_paths, tmp_path / "indexes")
    first = current_version(root)
    cfg = config(root, tmp_path, store=url)
    write_item(cfg, item(bundle_paths, "880300", "before-the-rebuild"))
    publish_bundle(root, bundle_paths["model"], bundle_paths["vectors"], kind="exact", delta_seq=1)  # folds seq 1
    write_item(cfg, item(bundle_paths, "880301", "after-the-rebuild"))
    assert main(["index", "rollback", "--root", str(root)]) == 0 and current_version(root) == first
    assert holds(cfg, "880300") and holds(cfg, "880301")  # both replayed onto the old bundle after a restart
