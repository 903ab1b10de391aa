"""A restart of the server with the embedded store keeps the user's session - even after kill -9."""

from __future__ import annotations

from pathlib import Path

import httpx

from towerann.data.dataset import read_interactions, read_items
from towerann.server.server import start_subprocess


def test_restart_keeps_session_with_embedded_store(bundle_paths: dict[str, Path], tmp_path: Path) -> None:
    items = read_items(bundle_paths["data"])
    counts = read_interactions(bundle_paths["data"])["item_id"].value_counts()
    items = items.assign(pop=items["item_id"].map(counts).fillna(0)).sort_values("pop", ascending=False)
    cat = dict(zip(items["item_id"].tolist(), items["category"].tolist()))
    category = "cat_0003"
    clicked = items[(items["category"] == category) & items["available"]]["item_id"].head(10)
    store_path = str(tmp_path / "features.sqlite")
    # the session's one bundle root was served before with other delta logs (Redis ones too): adopt this one
    config = tmp_path / "towerann.toml"
    config.write_text("[freshness]\nadopt_log = true\n")

    def share(url: str) -> float:
        got = httpx.post(f"{url}/v1/candidates", json={"user_id": "new-visitor", "k": 50}).json()["candidates"]
        return sum(cat[c["item_id"]] == category for c in got) / len(got)

    first = start_subprocess(
        bundle_paths["index"], "embedded", store_path, config=config
    )  # a real `towerann serve` process
    try:
        cold = share(first.url)
        for item in clicked:
            assert (
                httpx.post(f"{first.url}/v1/events", json={"user_id": "new-visitor", "item_id": str(item)}).status_code
                == 200
            )
        warm = share(first.url)
        first.process.kill()  # SIGKILL right after the acknowledged clicks: no clean shutdown
        first.process.wait()
    finally:
        first.stop()
    assert warm >= cold + 0.3, (cold, warm)

    second = start_subprocess(
        bundle_paths["index"], "embedded", store_path, config=config
    )  # only the SQLite file carries the session
    try:
        assert share(second.url) == warm
    finally:
        second.stop()
