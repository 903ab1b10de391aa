"""The FeatureStore contract on the Feast backend, against a real Feast repo: `feast apply` and
`feast materialize` run here into its SQLite online store; sessions live in our embedded store.

Skipped where feast is not installed (it is an extra: pip install 'towerann[feast]')."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("feast")

from test_feature_store_contract import (  # noqa: E402  the suite, run here with the Feast fixture below
    MakeStore,
    test_batch_get_keeps_input_order,
    test_concurrent_appends_lose_nothing,
    test_ids_are_strings,
    test_read_your_writes_newest_first,
    test_session_capped_to_max_events,
    test_static_features_round_trip,
    test_ttl_hides_old_events,
    test_unknown_user_is_empty_but_has_its_session,
)

from towerann.errors import ConfigError  # noqa: E402
from towerann.features import FeatureStore, open_store  # noqa: E402

__all__ = [
    "test_batch_get_keeps_input_order",
    "test_concurrent_appends_lose_nothing",
    "test_ids_are_strings",
    "test_read_your_writes_newest_first",
    "test_session_capped_to_max_events",
    "test_static_features_round_trip",
    "test_ttl_hides_old_events",
    "test_unknown_user_is_empty_but_has_its_session",
]

FEATURE_STORE_YAML = """project: towerann_contract
registry: data/registry.db
provider: local
online_store:
  type: sqlite
  path: data/online.db
offline_store:
  type: file
entity_key_serialization_version: 3
"""

DEFINITIONS = """
from datetime import timedelta
from feast import Entity, FeatureView, Field, FileSource
from feast.types import Float64, String
from feast.value_type import ValueType

member = Entity(name="member", join_keys=["member_id"], value_type=ValueType.STRING)
profile = FeatureView(
    name="member_profile", entities=[member], ttl=timedelta(days=3650), online=True,
    source=FileSource(path="data/members.parquet", timestamp_field="event_timestamp"),
    schema=[Field(name="member_id", dtype=String), Field(name="years", dtype=Float64),
            Field(name="score", dtype=Float64), Field(name="nation", dtype=String)])
activity = FeatureView(
    name="member_activity", entities=[member], ttl=timedelta(days=3650), online=True,
    source=FileSource(path="data/activity.parquet", timestamp_field="event_timestamp"),
    schema=[Field(name="member_id", dtype=String), Field(name="rank", dtype=Float64), Field(name="v", dtype=Float64)])
"""

# towerann's feature names (the contract suite's) -> the repo's own names, over two feature views
MAPPING = """entity = "member_id"
sessions = "embedded"
[features]
age = "member_profile:years"
score = "member_profile:score"
country = "member_profile:nation"
rank = "member_activity:rank"
v = "member_activity:v"
"""


def feast(repo: Path, *args: str) -> None:
    exe = Path(sys.executable).with_name("feast")
    subprocess.run(
        [str(exe if exe.exists() else "feast"), *args], cwd=repo, check=True, capture_output=True, timeout=120
    )


@pytest.fixture(scope="session")
def feast_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Feast repo, applied and materialized once: one member (seed-1) comes from its offline files."""
    import pandas as pd

    repo = tmp_path_factory.mktemp("feast") / "repo"
    (repo / "data").mkdir(parents=True)
    (repo / "feature_store.yaml").write_text(FEATURE_STORE_YAML)
    (repo / "definitions.py").write_text(DEFINITIONS)
    (repo / "towerann.toml").write_text(MAPPING)
    ts = pd.Timestamp("2026-01-01", tz="UTC")
    pd.DataFrame(
        {"member_id": ["seed-1"], "years": [52.0], "score": [0.5], "nation": ["nz"], "event_timestamp": [ts]}
    ).to_parquet(repo / "data" / "members.parquet")
    pd.DataFrame({"member_id": ["seed-1"], "rank": [3.0], "v": [None], "event_timestamp": [ts]}).to_parquet(
        repo / "data" / "activity.parquet"
    )
    feast(repo, "apply")
    feast(repo, "materialize", "2025-01-01T00:00:00", pd.Timestamp.now(tz="UTC").strftime("%Y-%m-%dT%H:%M:%S"))
    return repo


@pytest.fixture
def make_store(feast_repo: Path, tmp_path: Path) -> MakeStore:
    """Fresh stores: each over its own copy of the applied repo (registry + online store), so none sees
    another's users; its sessions in an embedded store of its own."""
    opened: list[FeatureStore] = []

    def make(**kw) -> FeatureStore:
        copy = tmp_path / f"repo-{len(opened)}"
        shutil.copytree(feast_repo, copy)
        store = open_store(f"feast:{copy}", path=tmp_path / f"sessions-{len(opened)}.sqlite", **kw)
        opened.append(store)
        return store

    yield make
    for s in opened:
        s.close()


def test_materialized_features_are_read_from_feasts_online_store(make_store: MakeStore) -> None:
    store = make_store()
    seed = store.get_one("seed-1")  # never put through towerann: only Feast has it
    assert seed.known and seed.static == {"age": 52.0, "score": 0.5, "country": "nz", "rank": 3.0}
    assert seed.recent_items == () and store.stats()["users"] == 0 and store.stats()["backend"] == "feast"


def test_a_row_replaces_the_users_values_in_every_feature_view(make_store: MakeStore) -> None:
    store = make_store()
    store.put_users([{"user_id": "u1", "rank": 1, "country": "fr"}, {"user_id": "u2", "v": 2}])
    store.put_users([{"user_id": "u1", "age": 3}])  # nothing for member_activity in this batch: nulls written
    assert store.get_one("u1").static == {"age": 3.0}
    assert store.get_one("u2").static == {"v": 2.0}


def test_a_mapping_that_names_no_feast_feature_fails_at_open(feast_repo: Path, tmp_path: Path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(feast_repo, copy)
    (copy / "towerann.toml").write_text(MAPPING.replace("member_profile:nation", "member_profile:land"))
    with pytest.raises(ConfigError, match="country = 'member_profile:land' is not a feature"):
        open_store(f"feast:{copy}")
    (copy / "towerann.toml").unlink()
    with pytest.raises(ConfigError, match="no towerann.toml"):
        open_store(f"feast:{copy}")
