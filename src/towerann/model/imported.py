"""An imported two-tower model: towers trained elsewhere (ONNX), driven through towerann's tower inputs.

`towerann model import` (towerann.model.onnx_import) writes an ordinary model directory whose
manifest names the tower kind "onnx-import":
  manifest.json      kind "model", tower_kind "onnx-import": version, dim, metric, feature schema, mapping,
                     checksums, towers (["user", "item"] or ["user"]), space_id (optional)
  user_tower.onnx    the team's user tower, as exported
  item_tower.onnx    the team's item tower, as exported (absent from a user tower imported alone)
  item_vocab.npy     external item ids, in the order of the towers' item index (see `IndexMap`)
  user_vocab.npy     external user ids likewise

A *user tower imported alone* (`towerann model import --user-tower U.onnx --space-id S`, no item tower)
has towers ["user"] and must declare `space_id`: the name of the vector space its queries live in,
the one a vectors-only bundle (`towerann refresh --vectors FILE --space-id S`) declares for the item
vectors made elsewhere. `serve --model DIR` pairs the two by that name (serving.bundle.check_pairing);
embedding items with it is a one-line error. A full import may declare a space_id too, so that a
vectors-only bundle of vectors it made elsewhere pairs with it.

The rest of towerann never sees the ONNX graphs' own input names. It encodes users and items as
for its own towers (a `FeatureSchema` whose numeric columns pass through unscaled, id vocabularies
where 0 is unknown); `TowerFeeds` turns those canonical arrays into the named inputs each graph
takes, following the mapping in the manifest. So `embed`, `index build`, `serve`, `refresh` and live
item writes run an imported model through the same calls as a trained one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from towerann.artifacts import MANIFEST, load_npy, read_manifest, sha256_file
from towerann.errors import ArtifactError, ConfigError
from towerann.model.schema import FeatureSchema
from towerann.model.vocab import IdVocab

TOWER_KIND = "onnx-import"
DTYPES = {"float32": np.float32, "float64": np.float64, "int64": np.int64, "int32": np.int32, "bool": np.bool_}
USER_SOURCES = ("user_id", "user_numeric", "user_categorical", "session_items", "session_mask")
ITEM_SOURCES = ("item_id", "item_numeric", "item_categorical", "item_category")
FILES = ("user_tower.onnx", "item_tower.onnx", "item_vocab.npy", "user_vocab.npy")
TOWERS = ("user", "item")  # a full import; ("user",): a user tower imported alone
MAX_SPACE_ID = 200


def check_space_id(value: Any, where: str) -> str:
    """A declared vector-space name: a non-empty one-line printable string without surrounding blanks."""
    if (
        not isinstance(value, str)
        or not value
        or value != value.strip()
        or not value.isprintable()
        or len(value) > MAX_SPACE_ID
    ):
        shown = value[:60] if isinstance(value, str) else value
        raise ConfigError(
            f"{where}: a space id is a non-empty name of at most {MAX_SPACE_ID} printable characters without "
            f"leading or trailing blanks, got {shown!r}"
        )
    return value


@dataclass(frozen=True)
class ModelFacts:
    """What pairing a model with a bundle reads of a model directory, from its manifest alone (cheap)."""

    directory: Path
    version: str
    dim: int
    space_id: str | None  # the declared vector space; None: none declared (a trained model, an old import)
    user_only: bool  # a user tower imported alone: no item tower, so it built no index


def model_facts(directory: str | Path) -> ModelFacts:
    """The version, dim, declared space id and towers of a model directory (any kind), checked."""
    directory = Path(directory)
    m = read_manifest(directory, "model", 1)
    where = f"{directory / MANIFEST}"
    version, dim = m.get("model_version"), m.get("dim")
    if not isinstance(version, str) or not version:
        raise ArtifactError(f"{where}: no model_version")
    if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
        raise ArtifactError(f"{where}: dim must be a positive integer, got {dim!r}")
    towers = _towers(m, where)
    space = m.get("space_id")
    if space is not None:
        try:
            check_space_id(space, f"{where}: space_id")
        except ConfigError as e:
            raise ArtifactError(str(e)) from None
    if towers == ("user",) and space is None:
        raise ArtifactError(f"{where}: a user tower imported alone must declare space_id; import it again")
    return ModelFacts(directory, version, dim, space, towers == ("user",))


def _towers(m: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """The manifest's towers: absent (a trained model, an import before user-only imports) means both."""
    towers = m.get("towers", list(TOWERS))
    if not isinstance(towers, list) or tuple(towers) not in (TOWERS, ("user",)):
        raise ArtifactError(f"{where}: towers must be {list(TOWERS)} or ['user'], got {towers!r}")
    return tuple(towers)


@dataclass(frozen=True)
class Feed:
    """One graph input: its name, dtype and per-row shape, and which canonical array fills it.

    source: one of USER_SOURCES / ITEM_SOURCES; columns: positions in the schema's numeric or
    categorical columns; first/unknown: the graph's index of a vocabulary's first entry and of an
    unknown value (ids, categorical values; unknown also fills empty session slots)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str
    columns: tuple[int, ...] = ()
    first: int = 1
    unknown: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "source": self.source,
            "columns": list(self.columns),
            "first": self.first,
            "unknown": self.unknown,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> Feed:
        return cls(
            d["name"],
            d["dtype"],
            tuple(int(x) for x in d["shape"]),
            d["source"],
            tuple(int(x) for x in d["columns"]),
            int(d["first"]),
            int(d["unknown"]),
        )

    def index(self, codes: np.ndarray) -> np.ndarray:
        """towerann codes (0 = unknown, i + 1 = the vocabulary's i-th entry) -> the graph's indexes."""
        return np.where(codes == 0, self.unknown, codes - 1 + self.first)


@dataclass(frozen=True)
class TowerFeeds:
    """The canonical arrays of one tower -> the named inputs of its ONNX graph."""

    feeds: tuple[Feed, ...]
    output: str

    def user(
        self,
        user_idx: np.ndarray,
        num: np.ndarray,
        cats: np.ndarray,
        hist_idx: np.ndarray,
        hist_cat: np.ndarray,
        mask: np.ndarray,
    ) -> dict[str, np.ndarray]:
        del hist_cat  # no imported input reads it (yet): the graph's own item table knows the categories
        filled = np.asarray(mask) > 0
        arrays = {
            "user_id": lambda f: f.index(user_idx),
            "user_numeric": lambda f: num[:, list(f.columns)],
            "user_categorical": lambda f: f.index(cats[:, f.columns[0]]),
            "session_items": lambda f: np.where(filled, f.index(hist_idx), f.unknown),
            "session_mask": lambda f: filled,
        }
        return self._fill(arrays, len(user_idx))

    def item(self, item_idx: np.ndarray, cat: np.ndarray, num: np.ndarray, attrs: np.ndarray) -> dict[str, np.ndarray]:
        arrays = {
            "item_id": lambda f: f.index(item_idx),
            "item_numeric": lambda f: num[:, list(f.columns)],
            "item_categorical": lambda f: f.index(attrs[:, f.columns[0]]),
            "item_category": lambda f: f.index(cat),
        }
        return self._fill(arrays, len(item_idx))

    def _fill(self, arrays: Mapping[str, Callable[[Feed], np.ndarray]], n: int) -> dict[str, np.ndarray]:
        return {
            f.name: np.ascontiguousarray(arrays[f.source](f), dtype=DTYPES[f.dtype]).reshape(n, *f.shape)
            for f in self.feeds
        }

    def to_json(self) -> dict[str, Any]:
        return {"output": self.output, "inputs": [f.to_json() for f in self.feeds]}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> TowerFeeds:
        return cls(tuple(Feed.from_json(f) for f in d["inputs"]), d["output"])


def onnx_session(path: Path, threads: int = 0) -> Any:
    """An ONNX Runtime session on CPU (threads=0: ONNX Runtime's choice); ArtifactError if it will not load."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, NoSuchFile...)
        detail = " ".join(str(e).split())[:300]
        raise ArtifactError(f"{path}: not a loadable ONNX graph ({type(e).__name__}: {detail})") from e


class OnnxTower:
    """Runs one imported tower: feeds -> [n, dim] float32, L2-normalised here when the model says so."""

    def __init__(self, path: Path, side: str, feeds: TowerFeeds, dim: int, normalize: bool, threads: int = 0):
        self.path, self.side, self.feeds, self.dim, self.normalize = path, side, feeds, dim, normalize
        self.session = onnx_session(path, threads)

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        out = np.asarray(self.session.run([self.feeds.output], inputs)[0], dtype=np.float32)
        out = out.reshape(len(out), -1)
        if out.shape[1] != self.dim:
            raise ConfigError(
                f"{self.side} tower output {self.feeds.output!r} gives vectors of dim {out.shape[1]}; "
                f"the model's dim is {self.dim}"
            )
        if self.normalize:  # metric "cosine": the graph's raw outputs, normalised, rank by cosine
            out = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out


class OnnxItemTower(nn.Module):
    """The imported item tower behind the call the embed runner makes of `model.net.item_tower`
    (canonical tensors in, a tensor out), run by ONNX Runtime on CPU."""

    def __init__(self, tower: OnnxTower):
        super().__init__()
        self.tower = tower

    def forward(
        self, item_idx: torch.Tensor, cat: torch.Tensor, num: torch.Tensor, attrs: torch.Tensor
    ) -> torch.Tensor:
        arrays = (t.detach().cpu().numpy() for t in (item_idx, cat, num, attrs))
        return torch.from_numpy(self.tower.run(self.tower.feeds.item(*arrays)))


@dataclass
class ImportedConfig:
    """The parts of a TowerConfig that the serving side reads."""

    dim: int
    history_len: int


@dataclass
class ImportedModel:
    """Same interface as TwoTowerModel where towerann calls it: schema, vocabularies, cfg, version,
    dim, metric, encode_items, encode_users, net.item_tower; the user tower runs from `user_runner`."""

    directory: Path
    schema: FeatureSchema
    item_vocab: IdVocab
    user_vocab: IdVocab
    cfg: ImportedConfig
    user_feeds: TowerFeeds
    item_feeds: TowerFeeds | None  # None: a user tower imported alone (its items' vectors come from elsewhere)
    normalize: bool
    version: str
    info: dict[str, Any] = field(default_factory=dict)
    metric: str = "ip"
    tower_kind: str = TOWER_KIND
    space_id: str | None = None  # the declared vector space (serving.bundle.check_pairing)

    def __post_init__(self) -> None:
        self._item_tower: OnnxTower | None = None
        self._user_tower: OnnxTower | None = None

    @property
    def dim(self) -> int:
        return self.cfg.dim

    @property
    def net(self) -> Any:
        """What the embed runner drives (`net.item_tower(...)`)."""
        return _Net(OnnxItemTower(self.item_tower()))

    @property
    def user_only(self) -> bool:
        """A user tower imported alone: it makes queries, never item vectors."""
        return self.item_feeds is None

    def item_tower(self) -> OnnxTower:
        if self.item_feeds is None:
            raise ConfigError(
                f"model {self.version} ({self.directory}) is a user tower imported alone (space "
                f"{self.space_id!r}): it embeds no items; publish the item vectors made elsewhere with "
                f"`towerann refresh --vectors FILE --space-id {self.space_id}` and serve them with --model"
            )
        if self._item_tower is None:
            self._item_tower = OnnxTower(
                self.directory / "item_tower.onnx", "item", self.item_feeds, self.dim, self.normalize
            )
        return self._item_tower

    def user_tower(self) -> OnnxTower:
        if self._user_tower is None:  # one request at a time: one thread beats a pool for a single row
            self._user_tower = OnnxTower(
                self.directory / "user_tower.onnx", "user", self.user_feeds, self.dim, self.normalize, threads=1
            )
        return self._user_tower

    def user_runner(self) -> Callable[..., np.ndarray]:
        """UserEncoder's runner: the six canonical user arrays -> [n, dim]."""
        tower = self.user_tower()
        return lambda *arrays: tower.run(self.user_feeds.user(*arrays))

    def encode_items(self, frame: pd.DataFrame, batch_size: int = 8192) -> np.ndarray:
        """Catalog rows -> f32 vectors [n, dim] (live item writes, refresh checks)."""
        tower = self.item_tower()
        assert self.item_feeds is not None  # item_tower() refused a user tower imported alone
        out = np.empty((len(frame), self.dim), np.float32)
        for s in range(0, len(frame), batch_size):
            part = frame.iloc[s : s + batch_size]
            cat, num, attrs = self.schema.encode_item_features(part)
            idx = self.item_vocab.encode(part["item_id"].to_numpy())
            out[s : s + len(part)] = tower.run(self.item_feeds.item(idx, cat, num, attrs))
        return out

    def encode_users(
        self,
        user_keys: np.ndarray,
        static_num: np.ndarray,
        static_cat: np.ndarray,
        hist_idx: np.ndarray,
        hist_cat: np.ndarray,
        hist_mask: np.ndarray,
        batch_size: int = 4096,
    ) -> np.ndarray:
        """Bulk user vectors (import checks, index tuning); hist_idx are item-vocab codes (0 = unknown)."""
        tower = self.user_tower()
        user_idx = self.user_vocab.encode(user_keys)
        out = np.empty((len(user_idx), self.dim), np.float32)
        for s in range(0, len(user_idx), batch_size):
            sl = slice(s, s + batch_size)
            out[sl] = tower.run(
                self.user_feeds.user(
                    user_idx[sl],
                    static_num[sl],
                    static_cat[sl],
                    hist_idx[sl],
                    hist_cat[sl],
                    np.asarray(hist_mask[sl], np.float32),
                )
            )
        return out

    @classmethod
    def from_manifest(cls, directory: Path, m: Mapping[str, Any]) -> ImportedModel:
        where = f"{directory / MANIFEST}"
        towers = _towers(m, where)
        try:
            sums = m["checksums"]
            mapping = m["mapping"]
            if (mapping["item"] is None) != (towers == ("user",)):
                raise ValueError(f"towers {list(towers)} disagree with the item mapping")
            space = m.get("space_id")
            model = cls(
                directory,
                FeatureSchema.from_json(m["schema"]),
                IdVocab(load_npy(directory / "item_vocab.npy", sums["item_vocab.npy"])),
                IdVocab(load_npy(directory / "user_vocab.npy", sums["user_vocab.npy"])),
                ImportedConfig(int(m["dim"]), int(m["schema"]["history_len"])),
                TowerFeeds.from_json(mapping["user"]),
                None if mapping["item"] is None else TowerFeeds.from_json(mapping["item"]),
                bool(mapping["normalize"]),
                m["model_version"],
                m.get("info", {}),
                space_id=None if space is None else check_space_id(space, f"{where}: space_id"),
            )
            graphs = [(directory / f"{side}_tower.onnx", sums[f"{side}_tower.onnx"]) for side in towers]
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise ArtifactError(f"{where}: incomplete imported-model manifest ({e})") from e
        if model.user_only and model.space_id is None:
            raise ArtifactError(f"{where}: a user tower imported alone must declare space_id; import it again")
        if m.get("metric") != "ip":
            raise ArtifactError(f"{directory}/manifest.json: metric {m.get('metric')!r}; towerann serves 'ip'")
        for path, want in graphs:
            if not path.is_file() or sha256_file(path) != want:
                raise ArtifactError(
                    f"{path}: missing or checksum mismatch (corrupted or replaced); import the model again"
                )
        return model


@dataclass
class _Net:
    item_tower: nn.Module
