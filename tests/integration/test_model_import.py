"""Bring your own towers: a two-tower written here in plain PyTorch (its own feature names, its own id
tables), exported to ONNX, imported with `towerann model import`, embedded, indexed and served over
real HTTP; its candidates equal the PyTorch model run by hand plus exact search. Bad schemas get one line."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from towerann.cli import main
from towerann.config import Config, FeaturesConfig, FreshnessConfig, PathsConfig, ServeConfig
from towerann.data.dataset import read_interactions, read_items, read_users
from towerann.data.synth import generate
from towerann.data.vectors_dir import read_vectors
from towerann.embed.runner import embed_catalog
from towerann.errors import ConfigError
from towerann.features.embedded import EmbeddedFeatureStore
from towerann.features.loader import load_dataset_features
from towerann.freshness.publish import publish_bundle
from towerann.model.onnx_import import import_model
from towerann.server.server import start_background

D, N = 16, 8  # the shop model's dim and session length


class Shop(nn.Module):
    """Someone else's two-tower: shared sku table, its own names and its own row order (row 0 = unknown)."""

    def __init__(self, n_items: int, n_users: int, n_depts: int, n_countries: int):
        super().__init__()
        torch.manual_seed(7)
        self.sku = nn.Embedding(n_items + 1, D)
        self.dept = nn.Embedding(n_depts + 1, D)
        self.member = nn.Embedding(n_users + 1, D)
        self.country = nn.Embedding(n_countries + 1, D)
        self.price = nn.Linear(1, D)
        self.age = nn.Linear(1, D)

    def item_vec(self, sku: torch.Tensor, dept: torch.Tensor, price: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.sku(sku) + 0.5 * self.dept(dept) + 0.05 * self.price(price), dim=1)

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


class ItemSide(nn.Module):
    def __init__(self, shop: Shop, normalize: bool = True):
        super().__init__()
        self.shop, self.normalize = shop, normalize

    def forward(self, sku, dept, price):  # type: ignore[no-untyped-def]
        v = self.shop.item_vec(sku, dept, price)
        return v if self.normalize else 3.0 * v


class UserSide(nn.Module):
    def __init__(self, shop: Shop):
        super().__init__()
        self.shop = shop

    def forward(self, member, recent, recent_mask, age, country):  # type: ignore[no-untyped-def]
        return self.shop.user_vec(member, recent, recent_mask, age, country)


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


SCHEMA = """
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

[item_tower]
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
[[item_tower.inputs]]
name = "price"
dtype = "float32"
shape = [1]
source = "item_column"
column = "price"
"""


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("shop")
    data = generate(work / "data", 300, 120, seed=3)
    items, users = read_items(data), read_users(data)
    rng = np.random.default_rng(5)
    skus = rng.permutation(items["item_id"].to_numpy())  # the shop's own row order, not the catalog's
    members = rng.permutation(users["user_id"].to_numpy())[:100]  # 20 users the shop model never saw
    depts, countries = sorted(items["category"].unique()), sorted(users["country"].unique())
    (work / "skus.txt").write_text("\n".join(map(str, skus)) + "\n")
    (work / "members.txt").write_text("\n".join(map(str, members)) + "\n")
    model = Shop(len(skus), len(members), len(depts), len(countries))
    z = torch.zeros(2, dtype=torch.int64)
    item_onnx = export(
        ItemSide(model), (z, z, torch.zeros(2, 1)), ["sku", "dept", "price"], "item_embedding", work / "items.onnx"
    )
    user_onnx = export(
        UserSide(model),
        (z, torch.zeros(2, N, dtype=torch.int64), torch.ones(2, N), torch.zeros(2, 1), z),
        ["member", "recent", "recent_mask", "age", "country"],
        "user_embedding",
        work / "users.onnx",
    )
    schema = work / "schema.toml"
    schema.write_text(SCHEMA.format(dim=D, n=N, depts=list(depts), countries=list(countries)))
    return {
        "work": work,
        "data": data,
        "model": model,
        "sizes": (len(skus), len(members), len(depts), len(countries)),
        "schema": schema,
        "item_onnx": item_onnx,
        "user_onnx": user_onnx,
        "sku_row": {int(s): i + 1 for i, s in enumerate(skus)},
        "member_row": {int(m): i + 1 for i, m in enumerate(members)},
        "dept_row": {c: i + 1 for i, c in enumerate(depts)},
        "country_row": {c: i + 1 for i, c in enumerate(countries)},
    }


def by_hand_items(s: dict[str, Any], items: Any) -> np.ndarray:
    with torch.inference_mode():
        return (
            s["model"]
            .item_vec(
                torch.tensor([s["sku_row"].get(int(i), 0) for i in items["item_id"]]),
                torch.tensor([s["dept_row"].get(c, 0) for c in items["category"]]),
                torch.tensor(items["price"].to_numpy(np.float32))[:, None],
            )
            .numpy()
        )


def by_hand_user(s: dict[str, Any], user_id: int, history: list[int], age: float, country: str) -> np.ndarray:
    recent = torch.zeros(1, N, dtype=torch.int64)
    mask = torch.zeros(1, N)
    for j, item in enumerate(history[:N]):
        recent[0, j], mask[0, j] = s["sku_row"].get(item, 0), 1.0
    with torch.inference_mode():
        return (
            s["model"]
            .user_vec(
                torch.tensor([s["member_row"].get(user_id, 0)]),
                recent,
                mask,
                torch.tensor([[age]]),
                torch.tensor([s["country_row"].get(country, 0)]),
            )[0]
            .numpy()
        )


def test_an_imported_pytorch_two_tower_is_embedded_indexed_and_served_as_run_by_hand(shop, tmp_path) -> None:
    s = shop
    out = tmp_path / "models" / "shop"
    assert (
        main(
            [
                "model",
                "import",
                "--schema",
                str(s["schema"]),
                "--user-tower",
                str(s["user_onnx"]),
                "--item-tower",
                str(s["item_onnx"]),
                "--data",
                str(s["data"]),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    items = read_items(s["data"])
    embed_catalog(out, s["data"], tmp_path / "vectors", progress=False)
    vs = read_vectors(tmp_path / "vectors")
    want = by_hand_items(s, items)
    assert np.allclose(vs.vectors, want, atol=1e-5) and np.array_equal(vs.external_ids, items["item_id"].to_numpy())

    store_path = tmp_path / "features.sqlite"
    store = EmbeddedFeatureStore(store_path)
    load_dataset_features(store, s["data"])
    store.close()
    publish_bundle(tmp_path / "indexes", out, tmp_path / "vectors", kind="exact")
    (tmp_path / "token").write_text("t0ken\n")
    cfg = Config(
        serve=ServeConfig(),
        paths=PathsConfig(index=str(tmp_path / "indexes"), model=str(out)),
        features=FeaturesConfig(store="embedded", path=str(store_path)),
        freshness=FreshnessConfig(
            adopt_log=True, delta_path=str(tmp_path / "delta.sqlite"), token_file=str(tmp_path / "token")
        ),
    )
    users, inter = read_users(s["data"]).set_index("user_id"), read_interactions(s["data"])
    avail = items["available"].to_numpy()
    handle = start_background(cfg)
    try:
        for user_id, clicks in (
            (int(users.index[0]), [int(items["item_id"][5]), int(items["item_id"][9])]),
            (int(users.index[-1]), [int(items["item_id"][40])]),
        ):  # the last: not in the shop's table
            for item in clicks:
                assert (
                    httpx.post(f"{handle.url}/v1/events", json={"user_id": user_id, "item_id": item}).status_code == 200
                )
            got = httpx.post(f"{handle.url}/v1/candidates", json={"user_id": user_id, "k": 20}).json()
            offline = (
                inter[inter["user_id"] == user_id].sort_values("timestamp", kind="stable")["item_id"].tolist()[::-1]
            )
            history = list(dict.fromkeys([*clicks[::-1], *offline]))  # session newest first, then offline, deduped
            q = by_hand_user(s, user_id, history, float(users.loc[user_id, "age"]), users.loc[user_id, "country"])
            scores = np.where(avail, want @ q, -np.inf)
            top = np.argsort(-scores, kind="stable")[:20]
            assert [c["item_id"] for c in got["candidates"]] == items["item_id"].to_numpy()[top].tolist()
            assert [c["score"] for c in got["candidates"]] == pytest.approx(scores[top].tolist(), abs=1e-5)
            assert got["model_version"].startswith("shop-")

        # a live item write goes through the imported item tower too (an id the shop's table never saw)
        row = {"item_id": "999999", "category": items["category"][3], "price": 12.5, "available": True}
        r = httpx.post(f"{handle.url}/v1/items", json={"items": [row]}, headers={"Authorization": "Bearer t0ken"})
        assert r.status_code == 200, r.text
        new = by_hand_items(s, pd.DataFrame([row]).astype({"item_id": np.int64}))
        b = handle.retriever.holder.current()
        res = b.index.search(new, 1)
        assert b.external_ids[res.ids[0, 0]] == 999999 and res.scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    finally:
        handle.stop()

    # a refresh re-embeds the catalog with the imported tower (tuned on its user queries) and folds in the write
    from towerann.freshness.deltalog import SQLiteDeltaLog
    from towerann.freshness.refresh import refresh
    from towerann.serving.bundle import RetrievalBundle

    refresh(
        s["data"],
        out,
        tmp_path / "indexes",
        SQLiteDeltaLog(tmp_path / "delta.sqlite"),
        kind="exact",
        recall=0.9,
        progress=False,
    )
    b = RetrievalBundle.load(tmp_path / "indexes")
    assert b.holds("999999") and b.delta_seq == 1 and b.model_version.startswith("shop-")


def bad(s: dict[str, Any], tmp_path: Path, text: str) -> str:
    schema = s["work"] / f"bad-{abs(hash(text))}.toml"
    schema.write_text(text)
    with pytest.raises(ConfigError) as e:
        import_model(schema, s["user_onnx"], s["item_onnx"], s["data"], tmp_path / "m")
    assert not (tmp_path / "m").exists()
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_schemas_get_one_line_naming_what_does_not_match(shop, tmp_path, capsys) -> None:
    s = shop
    good = s["schema"].read_text()
    assert "'item_embedding' gives vectors of dim 16; the model's dim is 24" in bad(
        s, tmp_path, good.replace(f"dim = {D}", "dim = 24")
    )
    block = '[[user_tower.inputs]]\nname = "recent_mask"\ndtype = "float32"\nshape = [8]\nsource = "session_mask"\n'
    assert block in good
    missing = good.replace(block, "")
    assert "'recent_mask'" in bad(s, tmp_path, missing) and "missing from the schema" in bad(s, tmp_path, missing)
    assert "normalized = False" in bad(s, tmp_path, good.replace("normalized = true", "normalized = false"))
    assert "'price'" in bad(
        s, tmp_path, good.replace('name = "price"\ndtype = "float32"', 'name = "price"\ndtype = "int64"')
    )
    assert "'country'" in bad(s, tmp_path, good.replace('feature = "country"', 'feature = "nation"'))

    # an id list longer than the shop's table: found on its last id, not at the request that meets it
    (s["work"] / "more_skus.txt").write_text((s["work"] / "skus.txt").read_text() + "123456789\n")
    assert "last index of a vocabulary" in bad(s, tmp_path, good.replace('"skus.txt"', '"more_skus.txt"'))

    # outputs that are not unit-norm for metric ip: found on the sample run; "cosine" normalises them
    z = torch.zeros(2, dtype=torch.int64)
    scaled = export(
        ItemSide(s["model"], normalize=False),
        (z, z, torch.zeros(2, 1)),
        ["sku", "dept", "price"],
        "item_embedding",
        tmp_path / "scaled.onnx",
    )
    with pytest.raises(ConfigError, match="item tower output 'item_embedding' is not L2-normalised"):
        import_model(s["schema"], s["user_onnx"], scaled, s["data"], tmp_path / "m")
    cosine = s["work"] / "cosine.toml"
    cosine.write_text(good.replace('metric = "ip"', 'metric = "cosine"'))
    import_model(cosine, s["user_onnx"], scaled, s["data"], tmp_path / "cos")
    from towerann.model.model import TwoTowerModel

    m = TwoTowerModel.load(tmp_path / "cos")
    items = read_items(s["data"])
    assert np.allclose(m.encode_items(items), by_hand_items(s, items), atol=1e-5)

    # an item tower from another model: the towers do not share a space
    stranger = Shop(*s["sizes"])
    with torch.no_grad():
        for p in stranger.parameters():
            p.normal_()
    other = export(
        ItemSide(stranger),
        (z, z, torch.zeros(2, 1)),
        ["sku", "dept", "price"],
        "item_embedding",
        tmp_path / "other.onnx",
    )
    with pytest.raises(ConfigError, match="do not seem to share one space"):
        import_model(s["schema"], s["user_onnx"], other, s["data"], tmp_path / "m")

    # the CLI: non-zero exit, one line on stderr
    code = main(
        [
            "model",
            "import",
            "--schema",
            str(s["work"] / f"bad-{abs(hash(missing))}.toml"),
            "--user-tower",
            str(s["user_onnx"]),
            "--item-tower",
            str(s["item_onnx"]),
            "--data",
            str(s["data"]),
            "--out",
            str(tmp_path / "m"),
        ]
    )
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "recent_mask" in err
