"""A trained two-tower model: towers + feature schema + id vocabularies, saved without pickle.

Artifact directory:
  manifest.json      kind "model": version, dims, metric, tower config, feature schema, checksums
  weights.npz        the state dict (numpy arrays, loaded with allow_pickle=False)
  item_vocab.npy     external item ids of the item-id embedding rows 1..n (0 = unknown)
  user_vocab.npy     external user ids likewise
  user_tower.onnx    the user tower exported for serving (towerann.model.onnx_export; run by model.export)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from towerann.artifacts import MANIFEST, atomic_dir, load_npy, read_manifest, save_npy, sha256_file, write_manifest
from towerann.errors import ArtifactError
from towerann.model.onnx_export import export_user_tower_onnx
from towerann.model.schema import FeatureSchema
from towerann.model.towers import TowerConfig, TowerSizes, TwoTower
from towerann.model.vocab import IdVocab

KIND = "model"
FORMAT_VERSION = 1
METRIC = "ip"  # towers emit L2-normalised vectors: inner product == cosine
# The user tower reads history through the item tower's tables: saved once, restored to both names.
SHARED = {
    "user_tower.item_emb.weight": "item_tower.item_emb.weight",
    "user_tower.cat_emb.weight": "item_tower.cat_emb.weight",
}


@dataclass
class TwoTowerModel:
    schema: FeatureSchema
    item_vocab: IdVocab
    user_vocab: IdVocab
    cfg: TowerConfig
    net: TwoTower
    version: str = "untrained"
    info: dict[str, Any] = field(default_factory=dict)  # training summary, stored in the manifest

    @classmethod
    def create(
        cls, schema: FeatureSchema, item_ids: np.ndarray, user_ids: np.ndarray, cfg: TowerConfig
    ) -> TwoTowerModel:
        item_vocab, user_vocab = IdVocab(item_ids), IdVocab(user_ids)
        sizes = TowerSizes(
            n_items=item_vocab.size,
            n_users=user_vocab.size,
            n_categories=schema.categories.size,
            item_attr_sizes=[c.size for c in schema.item_categorical],
            item_numeric=len(schema.item_numeric),
            user_attr_sizes=[c.size for c in schema.user_categorical],
            user_numeric=len(schema.user_numeric),
        )
        return cls(schema, item_vocab, user_vocab, cfg, TwoTower(cfg, sizes))

    @property
    def dim(self) -> int:
        return self.cfg.dim

    @property
    def metric(self) -> str:
        return METRIC

    # --- item side ------------------------------------------------------------------------

    def item_inputs(self, frame: pd.DataFrame) -> tuple[torch.Tensor, ...]:
        cat, num, attrs = self.schema.encode_item_features(frame)
        idx = self.item_vocab.encode(frame["item_id"].to_numpy())
        return torch.from_numpy(idx), torch.from_numpy(cat), torch.from_numpy(num), torch.from_numpy(attrs)

    @torch.inference_mode()
    def encode_items(self, frame: pd.DataFrame, batch_size: int = 8192) -> np.ndarray:
        """Catalog rows -> L2-normalised f32 vectors [n, dim]."""
        self.net.eval()
        out = np.empty((len(frame), self.dim), np.float32)
        for s in range(0, len(frame), batch_size):
            out[s : s + batch_size] = self.net.item_tower(*self.item_inputs(frame.iloc[s : s + batch_size])).numpy()
        return out

    # --- user side ------------------------------------------------------------------------

    @torch.inference_mode()
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
        """Bulk user vectors (evaluation, tuning). hist_idx are item-vocab indexes (0 = unknown item)."""
        self.net.eval()
        user_idx = self.user_vocab.encode(user_keys)
        out = np.empty((len(user_idx), self.dim), np.float32)
        for s in range(0, len(user_idx), batch_size):
            sl = slice(s, s + batch_size)
            out[sl] = self.net.user_tower(
                torch.from_numpy(user_idx[sl]),
                torch.from_numpy(static_num[sl]),
                torch.from_numpy(static_cat[sl]),
                torch.from_numpy(hist_idx[sl]),
                torch.from_numpy(hist_cat[sl]),
                torch.from_numpy(hist_mask[sl].astype(np.float32)),
            ).numpy()
        return out

    # --- persistence ----------------------------------------------------------------------

    def save(self, out: str | Path, name: str | None = None, overwrite: bool = False) -> Path:
        out = Path(out)
        with atomic_dir(out, overwrite=overwrite) as tmp:
            state = {k: v.detach().cpu().numpy() for k, v in self.net.state_dict().items() if k not in SHARED}
            np.savez(tmp / "weights.npz", **state)
            weights_sha = sha256_file(tmp / "weights.npz")
            self.version = f"{name or out.name}-{weights_sha[:12]}"
            checksums = {
                "weights.npz": weights_sha,
                "item_vocab.npy": save_npy(tmp / "item_vocab.npy", self.item_vocab.ids),
                "user_vocab.npy": save_npy(tmp / "user_vocab.npy", self.user_vocab.ids),
            }
            export_user_tower_onnx(self.net, tmp / "user_tower.onnx")
            checksums["user_tower.onnx"] = sha256_file(tmp / "user_tower.onnx")
            manifest = {
                "kind": KIND,
                "format_version": FORMAT_VERSION,
                "model_version": self.version,
                "dim": self.dim,
                "metric": METRIC,
                "tower_config": self.cfg.to_json(),
                "sizes": self.net.sizes.to_json(),
                "schema": self.schema.to_json(),
                "checksums": checksums,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "info": self.info,
            }
            write_manifest(tmp / MANIFEST, manifest)
        return out

    @classmethod
    def load(cls, directory: str | Path) -> TwoTowerModel:
        """A model directory. One written by `towerann model import` loads as an ImportedModel, which
        answers every call the rest of towerann makes of a model (see towerann.model.imported)."""
        directory = Path(directory)
        m = read_manifest(directory, KIND, FORMAT_VERSION)
        if m.get("tower_kind", "towerann") != "towerann":
            from towerann.model.imported import TOWER_KIND, ImportedModel

            if m["tower_kind"] != TOWER_KIND:
                raise ArtifactError(f"{directory / MANIFEST}: unknown tower_kind {m['tower_kind']!r}")
            return ImportedModel.from_manifest(directory, m)  # type: ignore[return-value]
        try:
            sums = m["checksums"]
            cfg = TowerConfig(**m["tower_config"])
            sizes = TowerSizes(**m["sizes"])
            schema = FeatureSchema.from_json(m["schema"])
        except (KeyError, TypeError) as e:
            raise ArtifactError(f"{directory / MANIFEST}: incomplete model manifest ({e})") from e
        if m.get("metric") != METRIC or m.get("dim") != cfg.dim:
            raise ArtifactError(
                f"{directory / MANIFEST}: metric/dim ({m.get('metric')}, {m.get('dim')}) "
                f"do not match the tower config ({METRIC}, {cfg.dim})"
            )
        weights = directory / "weights.npz"
        if not weights.exists() or sha256_file(weights) != sums["weights.npz"]:
            raise ArtifactError(f"{weights}: missing or checksum mismatch (corrupted or replaced)")
        net = TwoTower(cfg, sizes)
        with np.load(weights, allow_pickle=False) as z:
            state = {k: torch.from_numpy(z[k]) for k in z.files}
        state.update({k: state[src] for k, src in SHARED.items() if src in state})
        try:
            net.load_state_dict(state)
        except RuntimeError as e:
            raise ArtifactError(f"{weights}: weights do not fit the manifest's tower sizes ({e})") from e
        net.eval()
        model = cls(
            schema,
            IdVocab(load_npy(directory / "item_vocab.npy", sums["item_vocab.npy"])),
            IdVocab(load_npy(directory / "user_vocab.npy", sums["user_vocab.npy"])),
            cfg,
            net,
            version=m["model_version"],
            info=m.get("info", {}),
        )
        if model.item_vocab.size != sizes.n_items or model.user_vocab.size != sizes.n_users:
            raise ArtifactError(f"{directory}: vocabulary files do not match the manifest sizes")
        return model


def model_version_of(directory: str | Path) -> str:
    """The version string of a saved model, from its manifest alone (cheap)."""
    return read_manifest(directory, KIND, FORMAT_VERSION)["model_version"]
