"""The user tower for serving: one request -> one vector, in microseconds.

Measured on the 2-core machine (see `towerann bench tower`): ONNX Runtime on one thread beats
TorchScript and plain torch for a single request, so the model directory carries the user tower
as ONNX and `UserEncoder` runs it; plain torch stays as the fallback (`runtime="torch"`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from towerann.errors import ArtifactError, ConfigError
from towerann.model.onnx_export import INPUT_NAMES, UserTowerForExport, example_inputs

if TYPE_CHECKING:
    from towerann.model.model import TwoTowerModel

RUNTIMES = ("onnx", "torchscript", "torch")


class UserEncoder:
    """Request-time user tower: (user id, static features, history newest first) -> f32 [dim]."""

    def __init__(self, model: TwoTowerModel, model_dir: str | Path | None = None, runtime: str = "onnx"):
        if runtime not in RUNTIMES:
            raise ConfigError(f"unknown user-tower runtime {runtime!r}; choose one of {', '.join(RUNTIMES)}")
        self.model = model
        self.model_version = model.version  # stamped on every answer: the tower that made the query
        self.schema = model.schema
        self.N = model.cfg.history_len
        self.runtime = runtime
        # the tower alone on assembled inputs (those of `inputs()`): [n, dim]; `towerann bench tower` times it
        self.run: Callable[..., np.ndarray] = self._make_runner(runtime, model_dir)

    def _make_runner(self, runtime: str, model_dir: str | Path | None) -> Any:
        if getattr(self.model, "tower_kind", None) == "onnx-import":
            if runtime != "onnx":
                raise ConfigError(
                    f"an imported model's towers are ONNX graphs; runtime {runtime!r} cannot run them "
                    "(use the onnx runtime)"
                )
            return self.model.user_runner()  # type: ignore[attr-defined]
        if runtime == "onnx":
            import onnxruntime as ort

            if model_dir is None:
                raise ConfigError("the onnx runtime needs the model directory (user_tower.onnx)")
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            path = Path(model_dir) / "user_tower.onnx"
            try:
                sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime raises its own types (InvalidProtobuf, Fail, NoSuchFile...)
                detail = " ".join(str(e).split())[:300]
                raise ArtifactError(
                    f"{path}: not a loadable ONNX user tower ({type(e).__name__}: {detail}); "
                    "retrain or re-save the model (towerann model train), or republish the bundle"
                ) from e
            names = {i.name for i in sess.get_inputs()}
            # The exporter drops an input the graph never reads (no categorical user features: no "attrs"),
            # so the arrays are fed by name, and only those the graph has.
            if not names <= set(INPUT_NAMES):
                raise ArtifactError(f"{path}: inputs {sorted(names)} are not a towerann user tower's {INPUT_NAMES}")

            def run_onnx(*arrays: np.ndarray) -> np.ndarray:
                return sess.run(None, {n: a for n, a in zip(INPUT_NAMES, arrays) if n in names})[0]

            return run_onnx
        module: nn.Module = UserTowerForExport(self.model.net).eval()
        if runtime == "torchscript":
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = torch.jit.trace(module, example_inputs(self.model.net))

        def run_torch(*arrays: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return module(*(torch.from_numpy(a) for a in arrays)).numpy()

        return run_torch

    def inputs(
        self, user_id: str, static: Mapping[str, Any], history: Sequence[tuple[str, int]]
    ) -> tuple[np.ndarray, ...]:
        """Assemble one request's tower inputs. `history` is (item id, category code), newest first."""
        num, cats = self.schema.encode_user_static([static])
        hist_idx = np.zeros((1, self.N), np.int64)
        hist_cat = np.zeros((1, self.N), np.int64)
        mask = np.zeros((1, self.N), np.float32)
        vocab = self.model.item_vocab
        for j, (item, cat) in enumerate(history[: self.N]):
            hist_idx[0, j] = vocab.encode_one(item)
            hist_cat[0, j] = cat
            mask[0, j] = 1.0
        user_idx = np.array([self.model.user_vocab.encode_one(user_id)], np.int64)
        return user_idx, num, cats, hist_idx, hist_cat, mask

    def encode(self, user_id: str, static: Mapping[str, Any], history: Sequence[tuple[str, int]]) -> np.ndarray:
        return self.run(*self.inputs(user_id, static, history))[0]
