"""Model subcommands of ``userembed``: train, bench-model, export-world.

``service/cli.py`` calls :func:`add_model_commands`; torch is imported only inside
the commands, so the serving roles never load it.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def add_model_commands(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register the model subcommands on the ``userembed`` subparsers."""
    train = sub.add_parser(
        "train",
        help="train the SUM user model on the synthetic world (or --logs) and publish it",
        description="Train user tower + mix tower, report held-out AUC/NE, export the user "
        "tower to ONNX (parity-checked) and publish it to the registry.",
    )
    data = train.add_argument_group("data")
    data.add_argument(
        "--dataset",
        choices=("world", "movielens-1m"),
        default="world",
        help="world: the synthetic world (or --logs); movielens-1m: next-item retrieval on "
        "MovieLens-1M against popularity and SASRec (the --ml-* flags, docs/movielens.md)",
    )
    data.add_argument("--logs", type=Path, help="train on an event log (.parquet or .jsonl)")
    data.add_argument("--users", type=int, default=2_000, help="world users (default 2000)")
    data.add_argument("--items", type=int, default=5_000, help="world items (default 5000)")
    data.add_argument("--categories", type=int, default=50)
    data.add_argument("--days", type=int, default=14, help="simulated days (default 14)")
    data.add_argument("--history-length", type=int, default=50, help="L, last events per user")
    data.add_argument("--item-buckets", type=int, default=10_007)
    data.add_argument("--category-buckets", type=int, default=1_009)
    model = train.add_argument_group("model")
    model.add_argument("--embed-dim", type=int, default=32)
    model.add_argument("--heads", type=int, default=2)
    model.add_argument("--layers", type=int, default=1, help="self-attention blocks")
    model.add_argument("--cross-layers", type=int, default=2)
    model.add_argument("--mlp", default="256,192", help="pyramid widths, comma-separated")
    model.add_argument("--output-dim", type=int, default=128)
    model.add_argument("--dropout", type=float, default=0.1)
    fit = train.add_argument_group("training")
    fit.add_argument("--epochs", type=int, default=8)
    fit.add_argument("--batch-size", type=int, default=256)
    fit.add_argument("--lr", type=float, default=1e-3)
    fit.add_argument("--weight-decay", type=float, default=1e-4)
    fit.add_argument(
        "--retrieval-weight",
        type=float,
        default=0.3,
        help="weight of the catalogue-softmax retrieval loss next to the click/like BCE "
        "(0 = impressions only)",
    )
    fit.add_argument("--eval-every", type=int, default=100, help="steps between evaluations")
    fit.add_argument("--patience", type=int, default=3, help="evaluations without improvement")
    fit.add_argument("--max-steps", type=int)
    fit.add_argument("--seed", type=int, default=0)
    fit.add_argument("--threads", type=int, default=2)
    fit.add_argument("--no-progress", action="store_true")
    ml = train.add_argument_group("movielens-1m (with --dataset movielens-1m)")
    ml.add_argument("--ml-out", type=Path, default=Path("var/movielens"), help="artefacts")
    ml.add_argument("--ml-max-users", type=int, help="only the first N users of the file")
    ml.add_argument("--ml-history-length", type=int, default=200)
    ml.add_argument("--ml-embed-dim", type=int, default=64)
    ml.add_argument("--ml-layers", type=int, default=1, help="self-attention blocks")
    ml.add_argument("--ml-output-dim", type=int, default=64)
    ml.add_argument("--ml-dropout", type=float, default=0.2)
    ml.add_argument("--ml-cuts-per-user", type=int, default=8, help="SUM examples/user/epoch")
    ml.add_argument(
        "--ml-targets-per-cut",
        type=int,
        default=8,
        help="SUM: rank the next K items from each cut (dense objective, default 8; "
        "1 = the next item only)",
    )
    ml.add_argument("--ml-epochs", type=int, default=200, help="max epochs of each model")
    ml.add_argument("--ml-patience", type=int, default=5, help="epochs without better NDCG@10")
    ml.add_argument(
        "--ml-budget-min", type=float, help="stop each model after the epoch past this time"
    )
    ml.add_argument("--ml-no-sasrec", action="store_true", help="skip the SASRec baseline")
    ml.add_argument(
        "--ml-sasrec-from",
        type=Path,
        help="reuse the SASRec baseline of an earlier run's --ml-out (same split) instead of "
        "training it again",
    )
    out = train.add_argument_group("output")
    out.add_argument(
        "--registry",
        help="registry directory or object-store URL (s3://bucket/prefix; default: settings)",
    )
    out.add_argument(
        "--model",
        default="default",
        help="the model to publish a version of (default: 'default'; another name is "
        "served beside it, <registry>/_models/<name>)",
    )
    out.add_argument("--version", help="version name (default sum-<utc timestamp>)")
    out.add_argument("--parent", default="auto", help="parent version ('auto' = CURRENT, 'none')")
    out.add_argument("--no-current", action="store_true", help="publish without making CURRENT")
    out.add_argument("--no-publish", action="store_true", help="train and report only")
    out.add_argument("--fp16", action="store_true", help="also export an fp16 graph (for GPU)")
    out.add_argument(
        "--report",
        action="store_true",
        help="also train the ablations, compare with popularity, recall@50, benchmark",
    )
    train.set_defaults(func=cmd_train)

    bench = sub.add_parser(
        "bench-model", help="user-tower users/s: ONNX Runtime vs torch eager (CPU)"
    )
    bench.add_argument("--batches", default="1,64,512")
    bench.add_argument("--seconds", type=float, default=2.0, help="per measurement")
    bench.add_argument("--threads", type=int, default=2)
    bench.add_argument("--history-length", type=int, default=50)
    bench.set_defaults(func=cmd_bench_model)

    retrieval = sub.add_parser(
        "evaluate-retrieval",
        help="print the MovieLens-1M table recomputed from the eval*.npz artefacts",
    )
    retrieval.add_argument("--dir", type=Path, default=Path("var/movielens"))
    retrieval.set_defaults(func=cmd_evaluate_retrieval)

    world = sub.add_parser(
        "export-world", help="write the synthetic world's events as JSON Lines (train --logs)"
    )
    world.add_argument("path", type=Path)
    world.add_argument("--users", type=int, default=2_000)
    world.add_argument("--days", type=int, default=14)
    world.add_argument("--seed", type=int, default=0)
    world.set_defaults(func=cmd_export_world)


def run_config_from_args(args: argparse.Namespace) -> object:
    """The RunConfig the flags describe (imported lazily: it pulls in torch)."""
    from models.dataset import DataConfig
    from models.pipeline import RunConfig
    from models.train import TrainConfig
    from models.user_tower import TowerConfig
    from models.world import WorldConfig

    world = WorldConfig(
        users=args.users,
        items=args.items,
        categories=args.categories,
        days=args.days,
        seed=args.seed,
    )
    return RunConfig(
        data=DataConfig(
            world=world,
            logs=args.logs,
            history_length=args.history_length,
            item_buckets=args.item_buckets,
            category_buckets=args.category_buckets,
        ),
        tower=TowerConfig(
            embed_dim=args.embed_dim,
            heads=args.heads,
            layers=args.layers,
            cross_layers=args.cross_layers,
            mlp=tuple(int(w) for w in args.mlp.split(",") if w),
            output_dim=args.output_dim,
            dropout=args.dropout,
        ),
        train=TrainConfig(
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            weight_decay=args.weight_decay,
            retrieval_weight=args.retrieval_weight,
            eval_every=args.eval_every,
            patience=args.patience,
            max_steps=args.max_steps,
            seed=args.seed,
            threads=args.threads,
            progress=not args.no_progress,
        ),
        fp16=args.fp16,
    )


def cmd_train(args: argparse.Namespace) -> None:
    if args.dataset == "movielens-1m":
        cmd_train_movielens(args)
        return
    from models.bench import bench_tower, format_bench, sample_tensors
    from models.pipeline import RunConfig, publish_run, run_training
    from models.registry_target import publishing
    from models.report import format_report, quality_report

    config = run_config_from_args(args)
    assert isinstance(config, RunConfig)
    run = run_training(config)
    r = run.result
    print(
        f"trained on {run.data.source}: sessions train={len(run.data.train)} "
        f"valid={len(run.data.valid)} test={len(run.data.test)}  steps={r.steps} "
        f"early_stop={r.stopped_early}  {run.seconds:.0f}s"
    )
    print(f"loss first={r.losses[0]:.4f} last(avg 50)={sum(r.losses[-50:]) / 50:.4f}")
    print("test " + "  ".join(f"{k}={v:.4f}" for k, v in run.test_metrics.items()))
    print(
        f"export: onnx {len(run.exported.onnx_bytes) / 1e6:.2f} MB, parity max|diff|="
        f"{run.exported.parity_max_abs_diff:.2e} on {run.exported.parity_rows} held-out users"
        + (
            f", fp16 max|diff|={run.exported.fp16_max_abs_diff:.2e}"
            if run.exported.fp16_max_abs_diff is not None
            else ""
        )
        + (f" ({run.exported.fp16_note})" if run.exported.fp16_note else "")
    )
    if args.report:
        print("\nquality on the same held-out sessions (the future 10% of the data):")
        print(format_report(quality_report(run.data, r, config.tower, config.train)))
        print("\nuser-tower inference, CPU, same run (GPU numbers still owed: no GPU lent):")
        sample = sample_tensors(run.data.test)
        print(format_bench(bench_tower(r.model.user_tower, sample, threads=args.threads)))
    if args.no_publish:
        return
    version = args.version or time.strftime("sum-%Y%m%dT%H%M%SZ", time.gmtime())
    parent = None if args.parent == "none" else args.parent
    with publishing(args.registry, args.model, parent=parent) as target:
        current = not args.no_current
        artifact = publish_run(run, target.root, version, parent, make_current=current)
        where = target.done(artifact, make_current=current)
    alignment = artifact.manifest.alignment
    print(
        f"published {artifact.version} to {where}"
        + (
            f" (parent {alignment.parent_version}: mean cosine to parent "
            f"{alignment.mean_cosine_before:.3f} -> {alignment.mean_cosine_after:.3f} aligned)"
            if alignment
            else ""
        )
    )


def cmd_train_movielens(args: argparse.Namespace) -> None:
    from models.fit import FitConfig
    from models.movielens_run import (
        MovieLensConfig,
        format_table,
        publish_movielens,
        run_movielens,
        write_artifacts,
    )
    from models.registry_target import publishing
    from models.sasrec import SASRecConfig
    from models.sum_retrieval import SumRetrievalConfig
    from models.user_tower import TowerConfig

    budget = None if args.ml_budget_min is None else args.ml_budget_min * 60
    fit = FitConfig(max_epochs=args.ml_epochs, patience=args.ml_patience, time_budget_s=budget)
    config = MovieLensConfig(
        max_users=args.ml_max_users,
        history_length=args.ml_history_length,
        tower=TowerConfig(
            embed_dim=args.ml_embed_dim,
            heads=1,
            layers=args.ml_layers,
            mlp=(4 * args.ml_embed_dim,),
            output_dim=args.ml_output_dim,
            dropout=args.ml_dropout,
        ),
        sum=SumRetrievalConfig(
            cuts_per_user=args.ml_cuts_per_user,
            targets_per_cut=args.ml_targets_per_cut,
            batch_size=args.batch_size,
            seed=args.seed,
        ),
        sum_fit=fit,
        sasrec=None if args.ml_no_sasrec else SASRecConfig(seed=args.seed),
        sasrec_fit=fit,
        sasrec_from=args.ml_sasrec_from,
        threads=args.threads,
    )
    run = run_movielens(config)
    write_artifacts(run, args.ml_out)
    print(
        f"MovieLens-1M: {len(run.split.users)} users, {run.split.num_items} items, "
        f"{int(run.split.indptr[-1])} ratings; SUM {run.sum_fit.epochs} epochs "
        f"({run.sum_fit.stopped_by}), export parity max|diff|={run.parity_max_abs_diff:.1e}"
    )
    print(format_table(run.table, run.seconds))
    print(f"artefacts in {args.ml_out}")
    if args.no_publish:
        return
    version = args.version or time.strftime("sum-ml1m-%Y%m%dT%H%M%SZ", time.gmtime())
    with publishing(args.registry, args.model) as target:
        current = not args.no_current
        artifact = publish_movielens(run, target.root, version, make_current=current)
        where = target.done(artifact, make_current=current)
    print(f"published {artifact.version} to {where}")


def cmd_evaluate_retrieval(args: argparse.Namespace) -> None:
    from models.movielens_run import format_table, table_from_artifacts

    table, seconds = table_from_artifacts(args.dir)
    print(format_table(table, seconds))


def cmd_bench_model(args: argparse.Namespace) -> None:
    import torch

    from models.bench import bench_tower, format_bench
    from models.examples import build_examples
    from models.user_tower import UserTower
    from models.world import World, WorldConfig
    from service.core.tensors import InputSchema

    torch.manual_seed(0)
    schema = InputSchema(history_length=args.history_length, item_buckets=10_007)
    examples = build_examples(World(WorldConfig(users=300, days=7)).simulate(), schema)
    tower = UserTower(schema)
    batches = [int(b) for b in args.batches.split(",")]
    print("user-tower inference, CPU (GPU numbers still owed: no GPU lent to this task)")
    sample = {k: v[-512:] for k, v in examples.features.items()}
    print(format_bench(bench_tower(tower, sample, batches, args.seconds, args.threads)))


def cmd_export_world(args: argparse.Namespace) -> None:
    from models.logs import write_jsonl
    from models.world import World, WorldConfig

    events = World(WorldConfig(users=args.users, days=args.days, seed=args.seed)).simulate()
    write_jsonl(events, args.path)
    print(f"wrote {len(events)} events to {args.path}")
