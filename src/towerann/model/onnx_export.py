"""The user tower as an ONNX graph: what a model directory carries as user_tower.onnx for serving.

`TwoTowerModel.save` writes it; `UserEncoder` (towerann.model.export) runs it, or runs the same
module in torch or TorchScript.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn

from towerann.model.towers import TwoTower

INPUT_NAMES = ["user_idx", "numeric", "attrs", "hist_idx", "hist_cat", "hist_mask"]


class UserTowerForExport(nn.Module):
    """The user tower alone, with the six inputs of INPUT_NAMES in that order."""

    def __init__(self, net: TwoTower):
        super().__init__()
        self.tower = net.user_tower

    def forward(
        self,
        user_idx: torch.Tensor,
        numeric: torch.Tensor,
        attrs: torch.Tensor,
        hist_idx: torch.Tensor,
        hist_cat: torch.Tensor,
        hist_mask: torch.Tensor,
    ) -> torch.Tensor:
        return self.tower(user_idx, numeric, attrs, hist_idx, hist_cat, hist_mask)


def example_inputs(net: TwoTower, n: int = 1) -> tuple[torch.Tensor, ...]:
    """Inputs of the user tower's shapes and dtypes for `n` users (zeros; a full history)."""
    N = net.cfg.history_len
    return (
        torch.zeros(n, dtype=torch.int64),
        torch.zeros(n, net.sizes.user_numeric, dtype=torch.float32),
        torch.zeros(n, len(net.sizes.user_attr_sizes), dtype=torch.int64),
        torch.zeros(n, N, dtype=torch.int64),
        torch.zeros(n, N, dtype=torch.int64),
        torch.ones(n, N, dtype=torch.float32),
    )


def export_user_tower_onnx(net: TwoTower, path: Path) -> None:
    """Write the user tower of `net` to `path` as ONNX (opset 17), the batch dimension dynamic."""
    module = UserTowerForExport(net).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            example_inputs(net),
            str(path),
            input_names=INPUT_NAMES,
            output_names=["vector"],
            dynamic_axes={name: {0: "n"} for name in INPUT_NAMES} | {"vector": {0: "n"}},
            opset_version=17,
            dynamo=False,
        )
