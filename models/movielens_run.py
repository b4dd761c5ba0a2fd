"""``userembed train --dataset movielens-1m``: the SUM tower, popularity and SASRec on
the same leave-one-out split of ML-1M, the test split scored once, the tower
published to the registry and the artefacts written for anyone to recompute.

Artefacts (``out``): ``eval.npz`` (the SUM tower's test users as the worker embeds
them: ONNX Runtime on the feature states the service's updater builds from the
replayed events), ``eval-sasrec.npz``, ``results.json`` (table, validation curves,
wall times) and ``hr10.png`` (validation HR@10 per epoch).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch

from models.export import cold_start_embedding, export_user_tower
from models.fit import FitConfig, FitResult
from models.movielens import Split, load_split
from models.registry import ModelArtifact, publish
from models.retrieval_eval import EvalSet
from models.sasrec import SASRecConfig, train_sasrec, user_embeddings
from models.sum_retrieval import SumRetrievalConfig, replayed_states, train_sum
from models.user_tower import TowerConfig
from service.core.clock import now_ms
from service.core.tensors import InputSchema, assemble
from service.worker.runtime import OnnxModelRuntime

log = logging.getLogger(__name__)
DATASET: Final = "movielens-1m"
# Klenitskiy & Vasilev, RecSys 2023, ML-1M, full ranking, leave-one-out, seen filtered.
PUBLISHED: Final = {
    "SASRec, one-negative BCE (published)": {"hr@10": 0.2500, "ndcg@10": 0.1341},
    "BERT4Rec (published)": {"hr@10": 0.2843, "ndcg@10": 0.1537},
    "SASRec, full cross-entropy (published)": {"hr@10": 0.3152, "ndcg@10": 0.1821},
}
COLUMNS: Final = ("hr@10", "ndcg@10", "hr@20", "ndcg@20")


@dataclass(frozen=True, slots=True)
class MovieLensConfig:
    max_users: int | None = None  # the first N users of the file (tests, quick runs)
    history_length: int = 200
    # 100,003 buckets: 129 of the 3,416 titles share a history bucket with another
    item_buckets: int = 100_003
    category_buckets: int = 1_009
    tower: TowerConfig = field(
        default_factory=lambda: TowerConfig(
            embed_dim=64, heads=1, layers=1, mlp=(256,), output_dim=64, dropout=0.2
        )
    )
    sum: SumRetrievalConfig = field(default_factory=SumRetrievalConfig)
    sum_fit: FitConfig = field(default_factory=FitConfig)
    sasrec: SASRecConfig | None = field(default_factory=SASRecConfig)  # None: skip it
    sasrec_fit: FitConfig = field(default_factory=FitConfig)
    # the SASRec of an earlier run on the same split (its eval-sasrec.npz and history)
    # instead of training it again
    sasrec_from: Path | None = None
    threads: int = 1

    @property
    def schema(self) -> InputSchema:
        return InputSchema(
            history_length=self.history_length,
            item_buckets=self.item_buckets,
            category_buckets=self.category_buckets,
        )


@dataclass
class MovieLensRun:
    config: MovieLensConfig
    split: Split
    sum_eval: EvalSet
    sum_fit: FitResult
    onnx_bytes: bytes
    parity_max_abs_diff: float
    cold_start: list[float]
    table: dict[str, dict[str, float]]
    seconds: dict[str, float]
    sasrec_eval: EvalSet | None = None
    sasrec_fit: FitResult | None = None


def held_out_eval(split: Split, users: np.ndarray, items: np.ndarray) -> EvalSet:
    indptr, seen = split.seen("test")
    return EvalSet(
        user_embeddings=users.astype(np.float32),
        item_embeddings=items.astype(np.float32),
        targets=split.targets("test"),
        seen_indptr=indptr,
        seen_indices=seen,
        user_ids=[split.ratings.user_ids[u] for u in split.users],
        item_ids=list(split.ratings.item_ids),
    )


def run_movielens(config: MovieLensConfig) -> MovieLensRun:
    """Load, split, train the baselines and the tower, score the test split once."""
    torch.set_num_threads(max(1, config.threads))
    start = time.perf_counter()
    split = load_split(config.max_users)
    seconds = {"load": time.perf_counter() - start}
    table: dict[str, dict[str, float]] = {}
    sasrec_eval = sasrec_fit = None
    if config.sasrec_from is not None:
        sasrec_eval, sasrec_fit = earlier_sasrec(config.sasrec_from, split)
        seconds["sasrec"] = sasrec_fit.seconds  # of the earlier run
    elif config.sasrec is not None:
        began = time.perf_counter()
        train_indptr, train_items = split.seen("train")
        model, sasrec_fit = train_sasrec(
            split.num_items,
            train_indptr,
            train_items,
            split.targets("valid"),
            config.sasrec,
            config.sasrec_fit,
        )
        test_indptr, test_items = split.seen("test")
        vectors = user_embeddings(model, test_indptr, test_items)
        items = model.item_embeddings().detach().numpy()
        sasrec_eval = held_out_eval(split, vectors, items)
        seconds["sasrec"] = time.perf_counter() - began
    began = time.perf_counter()
    schema = config.schema
    model_now = now_ms()
    sum_model, sum_fit = train_sum(
        split, schema, config.tower, config.sum, config.sum_fit, model_now
    )
    tower = sum_model.user_tower.eval()
    seconds["sum_train"] = time.perf_counter() - began
    began = time.perf_counter()
    states = replayed_states(split, "test", schema.history_length)
    tensors = assemble(states, now_ms(), schema)
    exported = export_user_tower(tower, {k: v[:512] for k, v in tensors.items()})
    runtime = OnnxModelRuntime(exported.onnx_bytes, version="eval", schema=schema, prefer_gpu=False)
    served = runtime.infer(tensors)
    sum_eval = held_out_eval(split, served, sum_model.items.weight.detach().numpy())
    seconds["sum_export_and_test"] = time.perf_counter() - began
    table["SUM user tower (ours)"] = sum_eval.metrics()
    table["popularity"] = sum_eval.popularity_metrics()
    if sasrec_eval is not None:
        table["SASRec, full cross-entropy (ours)"] = sasrec_eval.metrics()
    seconds["total"] = time.perf_counter() - start
    return MovieLensRun(
        config=config,
        split=split,
        sum_eval=sum_eval,
        sum_fit=sum_fit,
        onnx_bytes=exported.onnx_bytes,
        parity_max_abs_diff=exported.parity_max_abs_diff,
        cold_start=cold_start_embedding(served),
        table=table,
        seconds=seconds,
        sasrec_eval=sasrec_eval,
        sasrec_fit=sasrec_fit,
    )


def earlier_sasrec(directory: Path, split: Split) -> tuple[EvalSet, FitResult]:
    """An earlier run's SASRec: its test embeddings and validation history, checked to
    be of the same split (users, items and held-out targets)."""
    evaluated = EvalSet.load(directory / "eval-sasrec.npz")
    same = held_out_eval(split, evaluated.user_embeddings, evaluated.item_embeddings)
    if (
        evaluated.user_ids != same.user_ids
        or evaluated.item_ids != same.item_ids
        or not np.array_equal(evaluated.targets, same.targets)
    ):
        raise ValueError(f"{directory}/eval-sasrec.npz is of another split: retrain SASRec")
    results = json.loads((directory / "results.json").read_text())
    history = results["history"]["sasrec"]
    fitted = FitResult(
        best=max(history, key=lambda row: row["valid_ndcg@10"]),
        history=history,
        epochs=len(history),
        seconds=results["seconds"].get("sasrec", 0.0),
        stopped_by=results["stopped_by"]["sasrec"],
    )
    return evaluated, fitted


def publish_movielens(
    run: MovieLensRun, registry: Path, version: str, make_current: bool = True
) -> ModelArtifact:
    """Publish the tower (no parent: its schema and space are its own)."""
    metrics = {f"test_{k}": v for k, v in run.table["SUM user tower (ours)"].items()}
    metrics.update({f"valid_{k}": v for k, v in run.sum_fit.best.items()})
    metrics["train_seconds"] = round(run.seconds["sum_train"], 1)
    return publish(
        registry,
        version=version,
        onnx_bytes=run.onnx_bytes,
        schema=run.config.schema,
        output_dim=run.config.tower.output_dim,
        cold_start_embedding=run.cold_start,
        kind="sum",
        training_metrics=metrics,
        details={
            "source": DATASET
            if run.config.max_users is None
            else f"{DATASET}[:{run.config.max_users}]",
            "tower": run.config.tower.to_dict(),
            "train": asdict(run.config.sum),
            "epochs": run.sum_fit.epochs,
            "stopped_by": run.sum_fit.stopped_by,
            "parity_max_abs_diff": run.parity_max_abs_diff,
        },
        extra_files={"items.npy": _npy(run.sum_eval.item_embeddings)},
        make_current=make_current,
    )


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array.astype(np.float32), allow_pickle=False)
    return buffer.getvalue()


def write_artifacts(run: MovieLensRun, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    run.sum_eval.save(out / "eval.npz")
    if run.sasrec_eval is not None:
        run.sasrec_eval.save(out / "eval-sasrec.npz")
    results: dict[str, Any] = {
        "dataset": DATASET,
        "users": len(run.split.users),
        "items": run.split.num_items,
        "ratings": int(run.split.indptr[-1]),
        "table": run.table,
        "seconds": run.seconds,
        "history": {"sum": run.sum_fit.history},
        "stopped_by": {"sum": run.sum_fit.stopped_by},
        "threads": run.config.threads,
    }
    if run.sasrec_fit is not None:
        results["history"]["sasrec"] = run.sasrec_fit.history
        results["stopped_by"]["sasrec"] = run.sasrec_fit.stopped_by
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_hr10(results["history"], out / "hr10.png")


def plot_hr10(history: dict[str, list[dict[str, float]]], path: Path) -> None:
    """Validation HR@10 against training minutes (epochs of the two models differ in cost)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 3.8))
    for name, rows in history.items():
        minutes = [r["seconds"] / 60 for r in rows]
        axis.plot(minutes, [r["valid_hr@10"] for r in rows], marker=".", label=name)
    for label, row in PUBLISHED.items():
        axis.axhline(row["hr@10"], linestyle=":", linewidth=0.8, color="grey")
        axis.text(
            0.01,
            row["hr@10"],
            f"{label}: test",
            transform=axis.get_yaxis_transform(),
            fontsize=6,
            color="grey",
            va="bottom",
        )
    axis.set_xlabel("training minutes (2 shared cores)")
    axis.set_ylabel("validation HR@10")
    axis.set_title("MovieLens-1M, full ranking, leave-one-out")
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def format_table(table: dict[str, dict[str, float]], seconds: dict[str, float] | None) -> str:
    """The results next to the published rows (which report @10 only)."""
    rows = {**table, **PUBLISHED}
    width = max(len(name) for name in rows)
    lines = [f"{'model':<{width}}  " + "  ".join(f"{c:>8}" for c in COLUMNS)]
    for name, row in rows.items():
        cells = (f"{row[c]:8.4f}" if c in row else f"{'-':>8}" for c in COLUMNS)
        lines.append(f"{name:<{width}}  " + "  ".join(cells))
    if seconds:
        lines.append("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in seconds.items()))
    return "\n".join(lines)


def table_from_artifacts(out: Path) -> tuple[dict[str, dict[str, float]], dict[str, float] | None]:
    """Recompute the table from the ``eval*.npz`` files (wall times from results.json)."""
    ours = EvalSet.load(out / "eval.npz")
    table = {"SUM user tower (ours)": ours.metrics(), "popularity": ours.popularity_metrics()}
    if (out / "eval-sasrec.npz").exists():
        table["SASRec, full cross-entropy (ours)"] = EvalSet.load(out / "eval-sasrec.npz").metrics()
    results = out / "results.json"
    seconds = json.loads(results.read_text())["seconds"] if results.exists() else None
    return table, seconds
