"""`towerann train`, `towerann eval` and `towerann model import|queries`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from towerann.artifacts import write_json_atomic
from towerann.errors import ConfigError


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train the two-tower model on a dataset directory",
        description="Train user and item towers with in-batch softmax + logQ correction; "
        "early stopping on validation recall. Writes a model directory (JSON manifest, npz weights, "
        "ONNX user tower).",
    )
    p.add_argument("--data", required=True, help="dataset directory (items/users/interactions.parquet)")
    p.add_argument("--out", required=True, help="model directory to write, e.g. models/NAME")
    p.add_argument("--dim", type=int, default=128, help="output vector dimension (default 128)")
    p.add_argument("--history", type=int, default=20, help="session history length N (default 20)")
    p.add_argument("--epochs", type=int, default=30, help="maximum epochs (default 30)")
    p.add_argument(
        "--batch-size",
        type=int,
        default=512,
        help="interactions per step; the batch's other items are each example's negatives (default %(default)s)",
    )
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (default %(default)s)")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.1,
        help="softmax temperature: user . item scores are divided by it (default %(default)s)",
    )
    p.add_argument(
        "--patience", type=int, default=5, help="epochs without validation gain before stopping (default %(default)s)"
    )
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="time budget for data preparation, training and validation (not start-up or the save): no step "
        "starts that would leave too little for itself and the validation after it, so the last epoch may "
        "end early; the best epoch is kept (default: no budget)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seed of initialisation, shuffling and dropout (default %(default)s)"
    )
    p.add_argument(
        "--search",
        action="store_true",
        help="choose temperature, learning rate, logQ weight, embedding size, weight decay and dim on the validation "
        "split (greedy, starting from the settings given); the trials go into the manifest",
    )
    p.add_argument(
        "--search-budget-s",
        type=float,
        default=300.0,
        help="with --search: no trial starts that would end past this many seconds (default 300)",
    )
    p.add_argument("--search-trials", type=int, default=10, help="with --search: at most this many trials (default 10)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads, 0 = torch's choice (default %(default)s: on 2 shared, busy cores `train --epochs 2` "
        "on `data synth --items 20000 --users 5000` took 14 s with 1 thread, 104 s with 2, median of 3)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    p.set_defaults(func=run_train)

    e = sub.add_parser(
        "eval",
        help="recall@K / NDCG@10 of a model vs popularity and ALS",
        description="Exact retrieval over the whole catalog on the held-out (newest) interactions "
        "of each user; the two-tower model beside a popularity baseline and implicit's ALS.",
    )
    e.add_argument("--data", required=True, help="dataset directory the model was trained on")
    e.add_argument("--model", required=True, help="model directory")
    e.add_argument("--json", dest="json_out", default=None, help="write the results as JSON here")
    e.add_argument("--no-baselines", action="store_true", help="skip popularity and ALS")
    e.add_argument(
        "--tune-als",
        action="store_true",
        help="also report ALS with factors/regularisation/alpha chosen on the validation split",
    )
    e.add_argument(
        "--session",
        action="store_true",
        help="the value of real-time clicks instead: next-item recall@10/100 with the earlier held-out "
        "clicks in the session vs the offline history only, and the share of a newly clicked "
        "category in the top 100 after 0-10 clicks (deterministic for --seed)",
    )
    e.add_argument("--users", type=int, default=2000, help="--session: held-out users replayed (default 2000)")
    e.add_argument("--seed", type=int, default=0, help="--session: seed of the sampled users (default 0)")
    e.set_defaults(func=run_eval)

    m = sub.add_parser(
        "model",
        help="model directories: import towers trained elsewhere, write a dataset's tuning queries",
        description="Model directories besides `towerann train`: import a pair of ONNX towers trained "
        "elsewhere, or write the user-tower queries that `index build` and `index tune` tune on.",
    )
    msub = m.add_subparsers(dest="model_command", metavar="SUBCOMMAND", required=True)
    i = msub.add_parser(
        "import",
        help="ONNX user + item towers (or a user tower alone) and a TOML schema -> a towerann model directory",
        description="Check a pair of ONNX towers against a TOML schema (inputs, dtypes, shapes, the "
        "output dim and norm) and a sample of a dataset (do users' own history items outscore random "
        "ones?), then write a model directory that embed, index build, serve and refresh take. "
        "A user tower alone (no --item-tower) needs --space-id: it answers user_id requests on a "
        "vectors-only bundle of that space (`refresh --vectors FILE --space-id S`, then `serve --model DIR`).",
    )
    i.add_argument("--schema", required=True, help="TOML schema of the towers' inputs (see towerann.model.onnx_import)")
    i.add_argument("--user-tower", required=True, help="user tower, ONNX")
    i.add_argument(
        "--item-tower",
        default=None,
        help="item tower, ONNX (leave out to import the user tower alone, with --space-id)",
    )
    i.add_argument(
        "--space-id",
        default=None,
        metavar="NAME",
        help="the vector space the towers' vectors live in: a vectors-only bundle published with "
        "`refresh --vectors FILE --space-id NAME` pairs with this model at `serve --model`; required "
        "without --item-tower (default: none declared)",
    )
    i.add_argument("--data", required=True, help="dataset directory (items/users/interactions.parquet) to check on")
    i.add_argument("--out", required=True, help="model directory to write")
    i.add_argument(
        "--min-space-auc",
        type=float,
        default=None,
        help="share of (own history item, random item) pairs the own item must win (default 0.6)",
    )
    i.add_argument("--overwrite", action="store_true", help="replace an existing model directory")
    i.set_defaults(func=run_import)

    q = msub.add_parser(
        "queries",
        help="user-tower query vectors of a dataset's held-out users (.npy), to tune an index on",
        description="The user tower's vectors of the held-out (test) users of a dataset, each at the moment "
        "its held-out period starts: what serving sends, so what an index is tuned and checked on "
        "(`towerann index build --queries`, `towerann index tune --queries`). Written atomically.",
    )
    q.add_argument("--data", required=True, help="dataset directory (items/users/interactions.parquet)")
    q.add_argument("--model", required=True, help="model directory whose user tower makes the queries")
    q.add_argument("--out", required=True, help="the .npy file to write (float32 [n, dim])")
    q.add_argument("--n", type=int, default=2000, help="at most this many users, a seeded sample (default 2000)")
    q.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    q.add_argument(
        "--vectors",
        default=None,
        help="vectors directory the queries will tune an index of: refuse a model other than the one that embedded it",
    )
    q.set_defaults(func=run_queries)


def run_import(args: argparse.Namespace) -> int:
    from towerann.model.onnx_import import MIN_SPACE_AUC, import_model

    if args.item_tower is None and args.min_space_auc is not None:
        raise ConfigError("--min-space-auc scores a user tower against an item tower: it needs --item-tower")
    r = import_model(
        args.schema,
        args.user_tower,
        args.item_tower,
        args.data,
        args.out,
        name=Path(args.out).name,
        overwrite=args.overwrite,
        min_space_auc=MIN_SPACE_AUC if args.min_space_auc is None else args.min_space_auc,
        space_id=args.space_id,
    )
    if args.item_tower is None:
        print(
            f"imported user tower {r['model_version']} -> {r['out']} for vector space {r['space_id']!r} "
            f"({r['sample_users']} sample users); serve it with a vectors-only bundle of that space: "
            f"towerann serve --index ROOT --model {r['out']}"
        )
        return 0
    space = f", vector space {r['space_id']!r}" if r["space_id"] is not None else ""
    print(
        f"imported model {r['model_version']} -> {r['out']}: own history items outscore random ones in "
        f"{r['history_auc']:.0%} of pairs ({r['sample_users']} sample users){space}"
    )
    return 0


def run_queries(args: argparse.Namespace) -> int:
    from towerann.model.evaluate import write_heldout_queries

    version = None
    if args.vectors is not None:
        from towerann.data.vectors_dir import vectors_model_version

        version = vectors_model_version(args.vectors)
    q = write_heldout_queries(args.model, args.data, args.out, args.n, args.seed, vectors_model_version=version)
    print(
        f"wrote {args.out}: {len(q)} x {q.shape[1]} user-tower queries of {args.data}'s held-out users ({args.model})"
    )
    return 0


def run_train(args: argparse.Namespace) -> int:
    from towerann.model.towers import TowerConfig
    from towerann.model.train import TrainConfig, summary, train

    if args.threads < 0:
        raise ConfigError(f"--threads {args.threads}: give 1 or more, or 0 for torch's choice")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    tower = TowerConfig(dim=args.dim, history_len=args.history)
    cfg = TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        temperature=args.temperature,
        patience=args.patience,
        seed=args.seed,
        max_seconds=args.max_seconds,
    )
    if args.search:
        from towerann.model.hparam_search import SearchConfig, search

        model = search(args.data, tower, cfg, SearchConfig(args.search_budget_s, args.search_trials))
        model.save(args.out, name=Path(args.out).name, overwrite=args.overwrite)
        found = model.info["search"]
        print(
            f"search: {len(found['trials'])} trials in {found['seconds']} s (stopped by {found['stopped_by']}); "
            f"chosen {found['chosen']}"
        )
    else:
        model = train(args.data, args.out, tower, cfg, name=Path(args.out).name, overwrite=args.overwrite)
    s = summary(model)
    print(
        f"model {s['model_version']} -> {args.out}: best epoch {s['best_epoch']}, "
        f"val recall@{cfg.eval_k} {s[f'val_recall@{cfg.eval_k}']:.4f}, {s['train_seconds']} s"
    )
    return 0


def run_session_eval(args: argparse.Namespace) -> int:
    from towerann.model.session_eval import evaluate_session

    result = evaluate_session(args.data, args.model, max_users=args.users, seed=args.seed)
    if args.json_out:
        write_json_atomic(args.json_out, result)
    ni, shift = result["next_item"], result["interest_shift"]
    print(
        f"next item ({ni['next_items']} held-out items of {ni['users']} users): "
        + "; ".join(
            f"{name.replace('_', ' ')} recall@10 {ni[name]['recall@10']:.4f} recall@100 {ni[name]['recall@100']:.4f}"
            for name in ("with_session", "without_session")
        )
    )
    print(
        f"share of a newly clicked category in the top {shift['k']} after 0..{len(shift['share_by_clicks']) - 1} "
        f"clicks: {shift['share_by_clicks']}; past 20% after {shift['clicks_to_20pct']}, past 50% after "
        f"{shift['clicks_to_50pct']} clicks"
    )
    if args.json_out:
        print(f"wrote {args.json_out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from towerann.model.evaluate import evaluate

    if args.session:
        return run_session_eval(args)
    result = evaluate(args.data, args.model, baselines=not args.no_baselines, tune_als=args.tune_als)
    if args.json_out:
        write_json_atomic(args.json_out, result)
    methods = [m for m in ("two_tower", "popularity", "als", "als_tuned") if m in result]
    keys = [k for k in result["two_tower"] if k != "users"]
    print(f"{'method':<12}" + "".join(f"{k:>12}" for k in keys))
    for m in methods:
        print(f"{m:<12}" + "".join(f"{result[m][k]:>12.4f}" for k in keys))
    if args.json_out:
        print(f"wrote {args.json_out}")
    else:
        print(json.dumps(result, indent=2))
    return 0
