"""The two-tower model: its towers (PyTorch), feature schema and id vocabularies, training with early
stopping and a small settings search, offline evaluation beside popularity and ALS, the user tower for
serving (ONNX), and towers trained elsewhere imported as ONNX graphs.

    model = train("data/", "models/m1")               # train.py; TwoTowerModel.load("models/m1") later
    evaluate("data/", "models/m1")                    # evaluate.py: recall@K, NDCG@10 vs the baselines
    write_heldout_queries("models/m1", "data/", "q.npy")  # tuning queries for `index build --queries`
    UserEncoder(model, "models/m1").encode("u42", {}, [("item7", 3)])  # export.py: one request

`train`, `evaluate` and `prepare` are modules of the package, so their functions of the same name are
imported from them. The names below are loaded from their modules on first use: importing the package
imports neither torch nor the other modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from towerann.lazy import lazy_names

if TYPE_CHECKING:
    from towerann.model.evaluate import heldout_user_queries, tune_als, write_heldout_queries
    from towerann.model.export import UserEncoder
    from towerann.model.hparam_search import SearchConfig, search
    from towerann.model.imported import ImportedModel
    from towerann.model.model import TwoTowerModel, model_version_of
    from towerann.model.onnx_import import import_model
    from towerann.model.schema import FeatureSchema
    from towerann.model.session_eval import evaluate_session
    from towerann.model.towers import TowerConfig
    from towerann.model.train import TrainConfig
    from towerann.model.vocab import IdVocab

__all__ = [
    "FeatureSchema",
    "IdVocab",
    "ImportedModel",
    "SearchConfig",
    "TowerConfig",
    "TrainConfig",
    "TwoTowerModel",
    "UserEncoder",
    "evaluate_session",
    "heldout_user_queries",
    "import_model",
    "model_version_of",
    "search",
    "tune_als",
    "write_heldout_queries",
]

_MODULE_OF = {
    "heldout_user_queries": "evaluate",
    "tune_als": "evaluate",
    "write_heldout_queries": "evaluate",
    "UserEncoder": "export",
    "SearchConfig": "hparam_search",
    "search": "hparam_search",
    "ImportedModel": "imported",
    "TwoTowerModel": "model",
    "model_version_of": "model",
    "import_model": "onnx_import",
    "FeatureSchema": "schema",
    "evaluate_session": "session_eval",
    "TowerConfig": "towers",
    "TrainConfig": "train",
    "IdVocab": "vocab",
}

if not TYPE_CHECKING:  # the type checker reads the imports above instead
    __getattr__ = lazy_names(__name__, _MODULE_OF)
