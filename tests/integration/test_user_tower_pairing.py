"""A user tower alone, paired with item vectors made elsewhere by a declared space id.

A small PyTorch two-tower is written here; its item tower runs only in this test (the "vectors made
elsewhere": a Parquet file published with `towerann refresh --vectors ... --space-id S` in a CLI
subprocess), its user tower is exported to ONNX and imported alone (`towerann model import
--user-tower ... --space-id S`, no item tower). `towerann serve --index ROOT --model DIR` (a real
process, real HTTP) then answers `user_id` requests with the user tower over the user's features from
the feature store: checked against exact search of that user's tower vector (run by hand in PyTorch)
over the item vectors. Mismatches are refused with one line naming both values, at start-up (another
space id, another dim, a model with no space id, a user tower against a bundle built by an item tower)
and at reload (the old version keeps serving); a same-space version is swapped in.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from towerann.cli import main
from towerann.data.dataset import read_interactions, read_items, read_users
from towerann.data.synth import generate
from towerann.errors import IndexIncompatible
from towerann.features.embedded import EmbeddedFeatureStore
from towerann.features.loader import load_dataset_features
from towerann.serving.bundle import RetrievalBundle

N = 8  # session length of the shop's user tower
D = 16  # the shop's dim
SPACE = "shop-emb-v1"
OTHER_SPACE = "shop-emb-v2"
K = 20
TOKEN = "pair-t0ken"
TOWERANN = [sys.executable, "-m", "towerann.cli"]


class Shop(nn.Module):
    """Someone else's two-tower: its own id tables (row 0 = unknown) and feature names."""

    def __init__(self, n_items: int, n_users: int, n_depts: int, n_countries: int, dim: int = D, seed: int = 7):
        super().__init__()
        torch.manual_seed(seed)
        self.sku = nn.Embedding(n_items + 1, dim)
        self.dept = nn.Embedding(n_depts + 1, dim)
        self.member = nn.Embedding(n_users + 1, dim)
        self.country = nn.Embedding(n_countries + 1, dim)
        self.age = nn.Linear(1, dim)

    def item_vec(self, sku: torch.Tensor, dept: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.sku(sku) + 0.5 * self.dept(dept), dim=1)

    def user_vec(
        self,
        member: torch.Tensor,
        recent: torch.Tensor,
        recent_mask: torch.Tensor,
        age: torch.Tensor,
        country: torch.Tensor,
    ) -> torch.Tensor:
        m = recent_mask.unsqueeze(2)
        hist = (self.sku(recent) * m).sum(1) / m.sum(1).clamp(min=1.0)
        return F.normalize(
            hist + 0.1 * self.member(member) + 0.02 * self.age(age / 100) + 0.1 * self.country(country), dim=1
        )


class UserSide(nn.Module):
    def __init__(self, shop: Shop):
        super().__init__()
        self.shop = shop

    def forward(self, member, recent, recent_mask, age, country):  # type: ignore[no-untyped-def]
        return self.shop.user_vec(member, recent, recent_mask, age, country)


class ItemSide(nn.Module):
    def __init__(self, shop: Shop):
        super().__init__()
        self.shop = shop

    def forward(self, sku, dept):  # type: ignore[no-untyped-def]
        return self.shop.item_vec(sku, dept)


def export(module: nn.Module, args: tuple[torch.Tensor, ...], names: list[str], output: str, path: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module.eval(),
            args,
            str(path),
            input_names=names,
            output_names=[output],
            dynamic_axes={n: {0: "batch"} for n in [*names, output]},
            opset_version=17,
            dynamo=False,
        )
    return path


USER_SCHEMA = """
[model]
dim = {dim}
metric = "ip"
normalized = true

[ids]
items = "skus.txt"
users = "members.txt"

[user_tower]
output = "user_embedding"
[[user_tower.inputs]]
name = "member"
dtype = "int64"
shape = []
source = "user_id"
[[user_tower.inputs]]
name = "recent"
dtype = "int64"
shape = [{n}]
source = "session_items"
[[user_tower.inputs]]
name = "recent_mask"
dtype = "float32"
shape = [{n}]
source = "session_mask"
[[user_tower.inputs]]
name = "age"
dtype = "float32"
shape = [1]
source = "user_feature"
feature = "age"
[[user_tower.inputs]]
name = "country"
dtype = "int64"
shape = []
source = "user_feature"
feature = "country"
values = {countries}
"""

ITEM_SCHEMA = """
[item_tower]
output = "item_embedding"
[[item_tower.inputs]]
name = "sku"
dtype = "int64"
shape = []
source = "item_id"
[[item_tower.inputs]]
name = "dept"
dtype = "int64"
shape = []
source = "item_column"
column = "category"
values = {depts}
"""


def export_user(shop: Shop, path: Path) -> Path:
    z = torch.zeros(2, dtype=torch.int64)
    args = (z, torch.zeros(2, N, dtype=torch.int64), torch.ones(2, N), torch.zeros(2, 1), z)
    return export(UserSide(shop), args, ["member", "recent", "recent_mask", "age", "country"], "user_embedding", path)


def import_cli(w: dict[str, Any], out: Path, *extra: str, schema: Path | None = None, user: Path | None = None) -> int:
    args = ["model", "import", "--schema", str(schema or w["user_schema"]), "--user-tower", str(user or w["user_onnx"])]
    return main([*args, "--data", str(w["data"]), "--out", str(out), *extra])


def write_vectors(path: Path, ids: np.ndarray, vectors: np.ndarray, categories: np.ndarray) -> None:
    emb = pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).reshape(-1)), vectors.shape[1])
    pq.write_table(pa.table({"sku": ids.astype(np.int64), "emb": emb, "category": categories.astype(str)}), path)


def refresh_args(vectors: Path, root: Path, space: str, *extra: str) -> list[str]:
    args = ["refresh", "--vectors", str(vectors), "--id-column", "sku", "--vector-column", "emb"]
    return [*args, "--category-column", "category", "--index", str(root), "--space-id", space, *extra]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("pairing")
    data = generate(work / "data", 2000, 300, seed=3)
    items, users = read_items(data), read_users(data)
    rng = np.random.default_rng(5)
    skus = rng.permutation(items["item_id"].to_numpy())  # the shop's own row order, not the catalog's
    members = rng.permutation(users["user_id"].to_numpy())[:250]  # 50 users the shop never saw
    depts, countries = sorted(items["category"].unique()), sorted(users["country"].unique())
    (work / "skus.txt").write_text("\n".join(map(str, skus)) + "\n")
    (work / "members.txt").write_text("\n".join(map(str, members)) + "\n")
    sizes = (len(skus), len(members), len(depts), len(countries))
    shop = Shop(*sizes)
    user_schema = work / "user.toml"
    user_schema.write_text(USER_SCHEMA.format(dim=D, n=N, countries=list(countries)))
    w: dict[str, Any] = {
        "work": work,
        "data": data,
        "shop": shop,
        "sizes": sizes,
        "items": items,
        "user_schema": user_schema,
        "user_onnx": export_user(shop, work / "user.onnx"),
        "sku_row": {int(s): i + 1 for i, s in enumerate(skus)},
        "member_row": {int(m): i + 1 for i, m in enumerate(members)},
        "dept_row": {c: i + 1 for i, c in enumerate(depts)},
        "country_row": {c: i + 1 for i, c in enumerate(countries)},
        "depts": depts,
    }
    # the vectors made elsewhere: the shop's item tower, run here, on every catalog item
    with torch.inference_mode():
        vectors = shop.item_vec(
            torch.tensor([w["sku_row"][int(i)] for i in items["item_id"]]),
            torch.tensor([w["dept_row"][c] for c in items["category"]]),
        ).numpy()
    w["vectors"] = vectors
    w["ids"] = items["item_id"].to_numpy()
    write_vectors(work / "items.parquet", w["ids"], vectors, items["category"].to_numpy())

    # the user tower alone, declaring the space; its held-out users' queries tune the index
    assert import_cli(w, work / "models" / "shop-user", "--space-id", SPACE) == 0
    w["user_model"] = work / "models" / "shop-user"
    queries = ["model", "queries", "--data", str(data), "--model", str(w["user_model"]), "--out", str(work / "q.npy")]
    assert main(queries) == 0

    root = work / "indexes"
    args = refresh_args(work / "items.parquet", root, SPACE, "--kind", "hnsw", "--recall", "0.98", "--k", "100")
    done = subprocess.run(
        TOWERANN + [*args, "--queries", str(work / "q.npy")], cwd=work, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    w["root"] = root

    store = EmbeddedFeatureStore(work / "features.sqlite")
    load_dataset_features(store, data)
    store.close()
    return w


def by_hand_user(w: dict[str, Any], user_id: int, history: list[int], age: float, country: str) -> np.ndarray:
    recent = torch.zeros(1, N, dtype=torch.int64)
    mask = torch.zeros(1, N)
    for j, item in enumerate(history[:N]):
        recent[0, j], mask[0, j] = w["sku_row"].get(item, 0), 1.0
    with torch.inference_mode():
        return (
            w["shop"]
            .user_vec(
                torch.tensor([w["member_row"].get(user_id, 0)]),
                recent,
                mask,
                torch.tensor([[age]]),
                torch.tensor([w["country_row"].get(country, 0)]),
            )[0]
            .numpy()
        )


@pytest.fixture
def server(world: dict[str, Any], free_port: int) -> Iterator[str]:
    """`towerann serve --index ROOT --model DIR` in its own process, on loopback."""
    w = world
    log_path = w["work"] / f"serve-{free_port}.log"
    log = log_path.open("w")
    cmd = [*TOWERANN, "serve", "--index", str(w["root"]), "--model", str(w["user_model"]), "--workers", "1"]
    cmd += ["--store", "embedded", "--store-path", str(w["work"] / "features.sqlite"), "--port", str(free_port)]
    # the admin reload is what the test asks for: a CURRENT watcher could swap first and leave it "unchanged"
    config = w["work"] / f"serve-{free_port}.toml"
    config.write_text("[freshness]\npoll_s = 0\n")
    cmd += ["--config", str(config)]
    env = {**os.environ, "TOWERANN_API_TOKEN": TOKEN}
    proc = subprocess.Popen(cmd, cwd=w["work"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{free_port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def expected_history(inter: Any, user_id: int, clicks: list[int]) -> list[int]:
    offline = inter[inter["user_id"] == user_id].sort_values("timestamp", kind="stable")["item_id"].tolist()[::-1]
    return list(dict.fromkeys([*clicks[::-1], *offline]))  # session newest first, then offline, deduped


def ask(url: str, user_id: int, k: int = K) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/candidates", json={"user_id": user_id, "k": k}, timeout=30)
    assert r.status_code == 200, r.text
    got: dict[str, Any] = r.json()
    return got


def reload(url: str) -> dict[str, Any]:
    r = httpx.post(f"{url}/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
    got: dict[str, Any] = r.json()
    assert r.status_code == (409 if got.get("outcome") == "refused" else 200), r.text
    return got


def test_user_id_requests_run_the_imported_user_tower_over_vectors_made_elsewhere(
    world: dict[str, Any], server: str
) -> None:
    w, url = world, server
    users = read_users(w["data"]).set_index("user_id")
    inter = read_interactions(w["data"])
    version = RetrievalBundle.load(w["root"]).version
    model_version = json.loads((w["user_model"] / "manifest.json").read_text())["model_version"]
    chosen = [int(u) for u in users.index[:30]] + [int(users.index[-1])]  # the last: not in the shop's table
    hits = total = 0
    for n, user_id in enumerate(chosen):
        clicks = [int(w["ids"][7 * n + 3])] if n % 3 == 0 else []  # some users click first: a session
        for item in clicks:
            r = httpx.post(f"{url}/v1/events", json={"user_id": user_id, "item_id": item}, timeout=30)
            assert r.status_code == 200, r.text
        got = ask(url, user_id)
        assert got["model_version"] == model_version and got["index_version"] == version
        ids = [c["item_id"] for c in got["candidates"]]
        assert len(ids) == K == len(set(ids)) and all(type(i) is int for i in ids)  # JSON integers
        u = users.loc[user_id]
        q = by_hand_user(w, user_id, expected_history(inter, user_id, clicks), float(u["age"]), u["country"])
        scores = w["vectors"] @ q
        truth = w["ids"][np.argsort(-scores, kind="stable")[:K]]
        hits += len(set(ids) & set(truth.tolist()))
        total += K
        # the scores are those of this user's tower vector: the right tower, fed the right features
        rows = np.searchsorted(w["ids"], ids)
        assert [c["score"] for c in got["candidates"]] == pytest.approx(scores[rows].tolist(), abs=1e-4)
    assert hits / total >= 0.95, hits / total

    # query_vector requests still work on the paired bundle
    q = w["vectors"][11]
    r = httpx.post(f"{url}/v1/candidates", json={"query_vector": [float(x) for x in q], "k": 1}, timeout=30)
    assert r.status_code == 200 and r.json()["candidates"][0]["item_id"] == int(w["ids"][11]), r.text

    # reload: a version of another space is refused with one line naming both; the old one keeps serving
    work, root = w["work"], w["root"]
    assert main([*refresh_args(work / "items.parquet", root, OTHER_SPACE), "--kind", "exact"]) == 0
    out = reload(url)
    assert out["outcome"] == "refused" and "\n" not in out["error"], out
    assert SPACE in out["error"] and OTHER_SPACE in out["error"] and "IndexIncompatible" in out["error"]
    assert ask(url, chosen[1])["index_version"] == version

    # a same-space version is paired and swapped in: a new item made for user chosen[1] comes first
    u = users.loc[chosen[1]]
    q = by_hand_user(w, chosen[1], expected_history(inter, chosen[1], []), float(u["age"]), u["country"])
    new_id = 99_000_001
    write_vectors(
        work / "items-v2.parquet",
        np.append(w["ids"], new_id),
        np.vstack([w["vectors"], q[None, :]]),
        np.append(w["items"]["category"].to_numpy(), "cat_new"),
    )
    assert main([*refresh_args(work / "items-v2.parquet", root, SPACE), "--kind", "exact"]) == 0
    out = reload(url)
    assert out["outcome"] == "swapped", out
    got = ask(url, chosen[1])
    assert got["index_version"] != version and got["model_version"] == model_version
    assert got["candidates"][0]["item_id"] == new_id
    assert got["candidates"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def one_line_refusal(capsys: pytest.CaptureFixture[str], index: Path, model: Path) -> str:
    code = main(["serve", "--index", str(index), "--model", str(model), "--store", "memory", "--port", "0"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    return err


def test_mismatches_are_refused_at_start_up_with_one_line_naming_both(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    w = world
    root = tmp_path / "indexes"
    assert main([*refresh_args(w["work"] / "items.parquet", root, SPACE), "--kind", "exact"]) == 0

    # another space id: the same tower, declared for another space
    assert import_cli(w, tmp_path / "other-space", "--space-id", OTHER_SPACE) == 0
    err = one_line_refusal(capsys, root, tmp_path / "other-space")
    assert "space id mismatch" in err and repr(SPACE) in err and repr(OTHER_SPACE) in err

    # another dim: a user tower of dim 8 that declares the right space
    small = Shop(*w["sizes"], dim=8)
    schema8 = w["work"] / "user8.toml"
    schema8.write_text(w["user_schema"].read_text().replace(f"dim = {D}", "dim = 8"))
    onnx8 = export_user(small, tmp_path / "user8.onnx")
    assert import_cli(w, tmp_path / "dim8", "--space-id", SPACE, schema=schema8, user=onnx8) == 0
    err = one_line_refusal(capsys, root, tmp_path / "dim8")
    assert "dim mismatch" in err and f"dim {D}" in err and "dim 8" in err and repr(SPACE) in err

    # a full import (user + item towers) declaring the space pairs like the user tower alone
    full_schema = w["work"] / "full.toml"
    full_schema.write_text(w["user_schema"].read_text() + ITEM_SCHEMA.format(depts=list(w["depts"])))
    z = torch.zeros(2, dtype=torch.int64)
    item_onnx = export(ItemSide(w["shop"]), (z, z), ["sku", "dept"], "item_embedding", tmp_path / "items.onnx")
    full = ["--item-tower", str(item_onnx)]
    assert import_cli(w, tmp_path / "full-space", *full, "--space-id", SPACE, schema=full_schema) == 0
    b = RetrievalBundle.load(root, given_model=tmp_path / "full-space")
    assert b.vectors_only and b.has_user_tower and b.space_id == SPACE
    users = read_users(w["data"]).set_index("user_id")
    user_id = int(users.index[4])
    u = users.loc[user_id]
    want = by_hand_user(w, user_id, [int(w["ids"][2])], float(u["age"]), u["country"])
    cat = int(b.item_model_cat[b.item_internal.get(str(w["ids"][2]))])
    got = b.encoder.encode(str(user_id), {"age": float(u["age"]), "country": u["country"]}, [(str(w["ids"][2]), cat)])
    assert np.allclose(got, want, atol=1e-5)

    # the same full import with no space id: not paired with a vectors-only bundle (no guessing)
    assert import_cli(w, tmp_path / "full-nospace", *full, schema=full_schema) == 0
    err = one_line_refusal(capsys, root, tmp_path / "full-nospace")
    assert "declares no space id" in err and repr(SPACE) in err

    # a user tower alone against a bundle built from an item tower (of another version): refused
    from towerann.embed.runner import embed_catalog
    from towerann.freshness.publish import publish_bundle

    embed_catalog(tmp_path / "full-nospace", w["data"], tmp_path / "vectors", progress=False)
    built = publish_bundle(tmp_path / "full-root", tmp_path / "full-nospace", tmp_path / "vectors", kind="exact")
    err = one_line_refusal(capsys, tmp_path / "full-root", w["user_model"])
    full_version = RetrievalBundle.load(built).model_version
    assert "user tower imported alone" in err and repr(full_version) in err
    with pytest.raises(IndexIncompatible, match="user tower imported alone"):
        RetrievalBundle.load(tmp_path / "full-root", given_model=w["user_model"])
    # and its item tower is not there to embed with
    code = main(["embed", "--model", str(w["user_model"]), "--items", str(w["data"]), "--out", str(tmp_path / "v2")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "user tower imported alone" in err, err


def test_a_user_tower_without_item_tower_or_space_id_is_a_one_line_error(
    world: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert import_cli(world, tmp_path / "m") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--space-id" in err and "--item-tower" in err, err
    assert not (tmp_path / "m").exists()
    # a schema that still describes an item tower, with none given: one line too
    full = world["user_schema"].read_text() + ITEM_SCHEMA.format(depts=list(world["depts"]))
    (tmp_path / "full.toml").write_text(full)
    assert import_cli(world, tmp_path / "m", "--space-id", SPACE, schema=tmp_path / "full.toml") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "[item_tower]" in err, err


class StaticUser(nn.Module):
    """A user tower of static features only: no session input, so no item id table."""

    def __init__(self, n_countries: int):
        super().__init__()
        torch.manual_seed(3)
        self.country = nn.Embedding(n_countries + 1, D)
        self.age = nn.Linear(1, D)

    def forward(self, age, country):  # type: ignore[no-untyped-def]
        return F.normalize(self.country(country) + 0.1 * self.age(age / 100), dim=1)


def test_a_user_tower_without_session_inputs_needs_no_item_ids(world: dict[str, Any], tmp_path: Path) -> None:
    w = world
    text = w["user_schema"].read_text()
    start, end = text.index('[[user_tower.inputs]]\nname = "member"'), text.index('[[user_tower.inputs]]\nname = "age"')
    (tmp_path / "members.txt").write_text((w["work"] / "members.txt").read_text())
    (tmp_path / "static.toml").write_text((text[:start] + text[end:]).replace('items = "skus.txt"\n', ""))
    z = torch.zeros(2, dtype=torch.int64)
    tower = StaticUser(w["sizes"][3])
    onnx = export(tower, (torch.zeros(2, 1), z), ["age", "country"], "user_embedding", tmp_path / "static.onnx")
    out = tmp_path / "static"
    assert import_cli(w, out, "--space-id", SPACE, schema=tmp_path / "static.toml", user=onnx) == 0
    b = RetrievalBundle.load(w["root"], given_model=out)
    assert b.has_user_tower and b.encoder.model.item_vocab.size == 1  # the unknown row alone
    users = read_users(w["data"])
    country = users["country"].iloc[0]
    got = b.encoder.encode("1", {"age": 30.0, "country": country}, [(str(w["ids"][0]), 0)])
    with torch.inference_mode():
        want = tower(torch.tensor([[30.0]]), torch.tensor([w["country_row"][country]]))[0].numpy()
    assert np.allclose(got, want, atol=1e-5)
