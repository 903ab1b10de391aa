"""A plain `towerann index build` root (no model/ inside: served with [paths] model) hot-swaps like a
bundle root: a new version published under it is reloaded with the same model, and `index rollback`
swaps back. (Before: every reload of such a root was refused, 409 "no model/ directory".)"""

from __future__ import annotations

from pathlib import Path

import httpx
from ann_catalog import AUTH, TOKEN

from towerann.cli import main
from towerann.config import Config, FeaturesConfig, FreshnessConfig, PathsConfig, ServeConfig
from towerann.index.snapshot import current_version
from towerann.server.server import start_background


def test_a_plain_index_root_reloads_with_the_configured_model(bundle_paths: dict[str, Path], tmp_path: Path) -> None:
    root = tmp_path / "indexes"
    build = ["index", "build", "--vectors", str(bundle_paths["vectors"]), "--kind", "exact", "--out", str(root)]
    assert main(build) == 0
    first = current_version(root)
    assert not (root / first / "model").exists()  # plain: the model comes from [paths] model
    (tmp_path / "token").write_text(TOKEN)
    cfg = Config(
        serve=ServeConfig(max_k=100),
        paths=PathsConfig(index=str(root), model=str(bundle_paths["model"])),
        features=FeaturesConfig(store="memory"),
        freshness=FreshnessConfig(
            delta_path=str(tmp_path / "delta.sqlite"), token_file=str(tmp_path / "token"), poll_s=0.0
        ),
    )
    handle = start_background(cfg)
    try:
        before = httpx.post(f"{handle.url}/v1/candidates", json={"user_id": "3", "k": 10}).json()
        assert before["index_version"] == first
        assert main(build) == 0  # a second version under the same root
        second = current_version(root)
        assert second != first
        r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["outcome"] == "swapped", r.text
        after = httpx.post(f"{handle.url}/v1/candidates", json={"user_id": "3", "k": 10}).json()
        assert after["index_version"] == second and after["model_version"] == before["model_version"]
        assert [c["item_id"] for c in after["candidates"]] == [c["item_id"] for c in before["candidates"]]
        assert main(["index", "rollback", "--root", str(root)]) == 0
        r = httpx.post(f"{handle.url}/v1/admin/reload", headers=AUTH, timeout=60)
        assert r.status_code == 200 and r.json()["index_version"] == first, r.text
    finally:
        handle.stop()
