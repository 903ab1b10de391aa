"""Training: sampled softmax over mixed negatives with logQ correction, early stopping on recall.

Each training example is one interaction: the user (id, static features, the previous N items)
against the item clicked. The negatives are the batch's other items plus `uniform_negatives`
catalog items drawn uniformly, shared by the batch (mixed negative sampling, Yang et al., 2020).
In-batch negatives alone are drawn by popularity: an item with few or no training clicks is
seldom or never a negative, so nothing teaches the model to score it down, and such items crowd
the top of the ranking (on the dense-users regime of `bench model`, a tenth of every top 100 were
items without a training click). Each candidate's logit is corrected by the log of its expected
count among the candidates (Yi et al., 2019, for the mixture: batch x popularity + uniform share),
so the loss estimates the full softmax. Accidental hits (the positive item elsewhere among the
candidates) are masked.
Every epoch the model is scored on the validation period by exact recall@K; training stops when
that has not improved for `patience` epochs and the best weights are kept. From the first epoch that
does not improve on, the weights scored (and kept) are a moving average of about the last
`average_epochs` epochs' steps (stochastic weight averaging, started on the plateau): there the last
step's weights wander from epoch to epoch by more than the epochs differ, so the best-scoring epoch
would be partly luck, a luck the test split does not share. Before the plateau (a short run that
improves every epoch) the last step's weights are scored, as an average would lag behind them.

A time budget (`max_seconds`, counted from the start, data preparation included) is kept within about
one step: before each step, training stops when what is left of the budget would not cover that step and
the validation after it (as long as the previous ones took); the epoch cut short is validated like any
other. Only the first validation's length is not known in advance.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from towerann.errors import DataError
from towerann.model.evaluate import held_out, metrics, subsample, two_tower_topk
from towerann.model.model import TwoTowerModel
from towerann.model.prepare import TRAIN, VALID, Prepared, build_schema, prepare
from towerann.model.towers import TowerConfig

log = logging.getLogger(__name__)
clock = time.perf_counter  # the time budget's clock (a test substitutes a fake one)
VALID_SCORES = 2e10  # validation users x items scored per epoch, at most (1M items: 20k users)


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 512
    lr: float = 3e-3
    weight_decay: float = 0.0
    temperature: float = 0.1
    logq_weight: float = 1.0  # share of the logQ correction applied: 1 = full (Yi et al.), 0 = none; lower
    # values keep some popularity in the scores, which held-out clicks (popularity-biased) reward
    patience: int = 5  # validation recall on a few hundred users moves by ~0.005 from epoch to epoch: a shorter
    # patience stopped regularised runs (weight_decay 1e-2) on a plateau at epoch 3 that peaked at epoch 19
    eval_k: int = 100
    id_dropout: float = 0.1  # how often the user id is hidden, so the cold-start path is trained
    item_id_dropout: float = 0.1  # how often a positive item's id is hidden: new items (unknown ids, added
    # live) are then embedded from their content - category and attributes - instead of an untrained row
    average_epochs: float = 1.0  # from the first epoch without a better validation recall on, the weights validated
    # and kept are a moving average over about this many epochs of steps; 0 = always the last step's
    uniform_negatives: int = 512  # catalog items drawn uniformly per step as extra negatives (0: in-batch only)
    seed: int = 0
    max_item_vocab: int = 1_000_000
    max_seconds: float | None = None  # time budget: stop within it (mid-epoch if need be), keeping the best epoch


def _stopped(progress: bool | None, why: str) -> None:
    """Say why training stopped before its last epoch (the epoch bars close as each epoch ends)."""
    if progress is not False:
        print(f"stopped early: {why}", flush=True)


def corrected_logits(
    scores: torch.Tensor,
    items: torch.Tensor,
    cand: torch.Tensor,
    share: torch.Tensor,
    uniform_share: float,
    temperature: float,
    logq_weight: float,
) -> torch.Tensor:
    """Sampled-softmax logits [B, C] of a step: user . candidate `scores` over the temperature, less
    logq_weight x log(each candidate's expected count among the C) - B x its share of the training clicks
    (in-batch) + uniform_share (the uniform draws) - with accidental hits masked. cand[:B] are the batch's
    positives (`items`, row i's at column i), cand[B:] the uniform draws; catalog rows index `share`."""
    b = len(items)
    log_q = torch.log(b * share[cand] + uniform_share).to(scores.dtype)  # > 0: in-batch items all have clicks
    logits = scores / temperature - logq_weight * log_q.unsqueeze(0)
    same = items.unsqueeze(1) == cand.unsqueeze(0)
    same[:, :b] &= ~torch.eye(b, dtype=torch.bool)
    return logits.masked_fill(same, -torch.inf)


def item_vocabulary(p: Prepared, max_items: int) -> np.ndarray:
    """Items with training interactions, most frequent first, capped at max_items."""
    rows = p.item_row[p.split == TRAIN]
    counts = np.bincount(rows, minlength=len(p.items))
    order = np.argsort(-counts, kind="stable")
    order = order[counts[order] > 0][:max_items]
    return p.items["item_id"].to_numpy()[order]


def train(
    data: str | Path,
    out: str | Path | None = None,
    tower: TowerConfig | None = None,
    cfg: TrainConfig | None = None,
    name: str | None = None,
    overwrite: bool = False,
    progress: bool | None = None,
) -> TwoTowerModel:
    tower = tower or TowerConfig()
    cfg = cfg or TrainConfig()
    t0 = clock()
    model = fit(prepare(data, tower.history_len), str(data), tower, cfg, progress, t0)
    if out is not None:
        model.save(out, name=name, overwrite=overwrite)
    return model


def fit(
    p: Prepared, data: str, tower: TowerConfig, cfg: TrainConfig, progress: bool | None = None, t0: float | None = None
) -> TwoTowerModel:
    """Train on the TRAIN split of prepared data, early-stopping on VALID; the test split is never read."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    t0 = clock() if t0 is None else t0
    budget = _Budget(t0, cfg.max_seconds)
    train_rows = np.flatnonzero(p.split == TRAIN)
    if len(train_rows) < 2:
        raise DataError(f"{data}: fewer than 2 training interactions; nothing to learn from")
    schema = build_schema(p, tower.history_len)
    users_with_train = np.unique(p.user_key[train_rows])
    model = TwoTowerModel.create(schema, item_vocabulary(p, cfg.max_item_vocab), users_with_train, tower)
    net = model.net

    # Encoded once: catalog features by catalog row, user features by user row.
    item_idx, item_cat, item_num, item_attrs = (t for t in model.item_inputs(p.items))
    user_num, user_cat = schema.encode_user_frame(p.users)
    user_idx_all = torch.from_numpy(model.user_vocab.encode(p.user_key))
    known = torch.from_numpy(p.user_row >= 0)
    urow = torch.from_numpy(np.maximum(p.user_row, 0))
    user_num_t, user_cat_t = torch.from_numpy(user_num), torch.from_numpy(user_cat)
    hist = torch.from_numpy(p.hist_rows)
    hist_mask_all = (hist >= 0).float()
    hist_idx_all = torch.where(hist >= 0, item_idx[hist.clamp(min=0)], 0)
    hist_cat_all = torch.where(hist >= 0, item_cat[hist.clamp(min=0)], 0)
    pos_rows = torch.from_numpy(p.item_row.copy())

    counts = np.bincount(p.item_row[train_rows], minlength=len(p.items)).astype(np.float64)
    share = torch.from_numpy(counts / counts.sum())  # of the positives, hence of the in-batch candidates
    uniform_share = cfg.uniform_negatives / len(p.items)

    # Scoring every validation user against a huge catalog each epoch would cost more than the epoch
    # (20k users x 10M items): a sample of users keeps it to ~2e10 scores.
    valid = subsample(held_out(p, VALID), max(1000, int(VALID_SCORES // max(len(p.items), 1))), cfg.seed)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    best, best_state, best_epoch, history = -1.0, None, -1, []
    averaged = _Average(list(net.parameters()), cfg.average_epochs * len(train_rows) / cfg.batch_size)
    for epoch in range(cfg.epochs):
        net.train()
        order = torch.from_numpy(rng.permutation(train_rows))
        total, steps, cut = 0.0, 0, False
        batches = range(0, len(order), cfg.batch_size)
        for s in tqdm(
            batches,
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            unit="batch",
            disable=True if progress is False else None,
            leave=False,
        ):
            # the first step of all always runs: a model is trained, however short the budget
            if (epoch or steps) and budget.spent():
                cut = True
                break
            budget.step_started()
            rows = order[s : s + cfg.batch_size]
            if len(rows) < 2:
                continue
            items = pos_rows[rows]
            uidx = user_idx_all[rows]
            uidx = torch.where(torch.rand(len(rows)) < cfg.id_dropout, 0, uidx)
            ur = urow[rows]
            k = known[rows].unsqueeze(1)
            u = net.user_tower(
                uidx,
                user_num_t[ur] * k,
                user_cat_t[ur] * k,
                hist_idx_all[rows],
                hist_cat_all[rows],
                hist_mask_all[rows],
            )
            iidx = torch.where(torch.rand(len(rows)) < cfg.item_id_dropout, 0, item_idx[items])
            v = net.item_tower(iidx, item_cat[items], item_num[items], item_attrs[items])
            cand = items
            if cfg.uniform_negatives:  # catalog rows, encoded as served (their ids never hidden)
                extra = torch.randint(len(p.items), (cfg.uniform_negatives,))
                cand = torch.cat([items, extra])
                v = torch.cat([v, net.item_tower(item_idx[extra], item_cat[extra], item_num[extra], item_attrs[extra])])
            logits = corrected_logits(u @ v.T, items, cand, share, uniform_share, cfg.temperature, cfg.logq_weight)
            loss = F.cross_entropy(logits, torch.arange(len(rows)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            averaged.update()
            total += float(loss.detach())
            steps += 1
            budget.step_ended()
        if cut and not steps:  # no time for a step of this epoch: the weights are the last validated ones
            log.info("time budget of %.0f s reached before epoch %d", cfg.max_seconds, epoch + 1)
            break
        budget.validation_started()
        averaged.swap()  # the averaged weights are scored, and kept if best; training goes on from its own
        val = (
            metrics(two_tower_topk(model, p, valid, cfg.eval_k), valid.targets, (cfg.eval_k,))
            if len(valid.rows)
            else {}
        )
        budget.validation_ended()
        score = val.get(f"recall@{cfg.eval_k}", -total)
        history.append(
            {
                "epoch": epoch + 1,
                "loss": total / max(steps, 1),
                f"val_recall@{cfg.eval_k}": score,
                "steps": steps,
                **({"averaged": True} if averaged.values is not None else {}),
                **({"cut_by_time_budget": True} if cut else {}),
            }
        )
        log.info("epoch %d loss %.4f val recall@%d %.4f", epoch + 1, total / max(steps, 1), cfg.eval_k, score)
        if progress is not False:
            print(
                f"epoch {epoch + 1}: loss {total / max(steps, 1):.4f}  val recall@{cfg.eval_k} {score:.4f}", flush=True
            )
        improved = score > best
        if improved:
            best, best_state, best_epoch = score, copy.deepcopy(net.state_dict()), epoch + 1
        averaged.swap()
        if not improved:
            averaged.start()  # the first plateau: from now on the average is validated
        if not improved and epoch + 1 - best_epoch >= cfg.patience:
            _stopped(progress, f"no better validation recall for {cfg.patience} epochs; keeping epoch {best_epoch}")
            break
        if cut or budget.spent():
            log.info("time budget of %.0f s reached in epoch %d", cfg.max_seconds, epoch + 1)
            _stopped(progress, f"time budget of {cfg.max_seconds:.0f} s reached; keeping epoch {best_epoch}")
            break
    if best_state is not None:
        net.load_state_dict(best_state)
    net.eval()
    model.info = {
        "dataset": str(data),
        "train_interactions": int(len(train_rows)),
        "items_in_vocab": len(model.item_vocab),
        "users_in_vocab": len(model.user_vocab),
        "best_epoch": best_epoch,
        f"val_recall@{cfg.eval_k}": best,
        "epochs": history,
        "train_seconds": round(clock() - t0, 1),
        "torch_threads": torch.get_num_threads(),
        "train_config": dict(cfg.__dict__),
    }
    return model


class _Average:
    """Weight averaging from the first plateau on (stochastic weight averaging, Izmailov et al., 2018): once
    started, an exponential moving average of the parameters over about `steps` optimizer steps (a plain
    mean of the steps until there are that many). Before `start` (and when steps is 0) it does nothing."""

    def __init__(self, params: list[torch.nn.Parameter], steps: float):
        self.params, self.steps, self.n = params, steps, 0
        self.values: list[torch.Tensor] | None = None

    def start(self) -> None:
        if self.values is None and self.steps > 0:
            self.values, self.n = [q.detach().clone() for q in self.params], 0

    def update(self) -> None:
        if self.values is None:
            return
        self.n += 1
        w = max(1.0 / max(self.steps, 1.0), 1.0 / self.n)
        with torch.no_grad():
            for a, q in zip(self.values, self.params):
                a.lerp_(q, w)

    def swap(self) -> None:
        """Exchange the live weights and the average (twice: back as they were)."""
        if self.values is None:
            return
        with torch.no_grad():
            for a, q in zip(self.values, self.params):
                live = q.detach().clone()
                q.copy_(a)
                a.copy_(live)


class _Budget:
    """What is left of the time budget: enough for one more step and the validation after it? The step
    and validation lengths are the longest seen so far (the first validation's is unknown: 0)."""

    def __init__(self, t0: float, seconds: float | None):
        self.deadline = None if seconds is None else t0 + seconds
        self.step_s = self.validation_s = 0.0
        self._since = t0

    def spent(self) -> bool:
        return self.deadline is not None and clock() + self.step_s + self.validation_s > self.deadline

    def step_started(self) -> None:
        if self.deadline is not None:
            self._since = clock()

    def step_ended(self) -> None:
        if self.deadline is not None:
            self.step_s = max(self.step_s, clock() - self._since)

    def validation_started(self) -> None:
        self.step_started()

    def validation_ended(self) -> None:
        if self.deadline is not None:
            self.validation_s = max(self.validation_s, clock() - self._since)


def summary(model: TwoTowerModel) -> dict[str, Any]:
    return {"model_version": model.version, **{k: v for k, v in model.info.items() if k != "epochs"}}
