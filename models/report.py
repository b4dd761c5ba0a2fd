"""Quality report: the model against a popularity baseline and its own ablations,
on the same held-out (future) sessions, plus next-item retrieval recall@k."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import numpy.typing as npt
import torch

from models.baselines import PopularityBaseline
from models.dataset import Dataset
from models.examples import shown_pairs
from models.metrics import recall_at_k
from models.mix_tower import MixTower
from models.train import ExampleTensors, TrainConfig, TrainResult, evaluate_probs, predict, train
from models.user_tower import INPUT_NAMES, Encoder, TowerConfig


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    metrics: dict[str, float]


@torch.no_grad()
def retrieval_recall(
    model: MixTower | PopularityBaseline, data: Dataset, k: int = 50
) -> tuple[float, int]:
    """recall@k of the first clicked item of each test session among all catalogue items,
    ranked by user embedding . item embedding (or by training clicks for the baseline).
    Returns (recall, number of test sessions with a click)."""
    catalogue, targets, rows = _catalogue(data)
    if rows.size == 0:
        return float("nan"), 0
    scores: npt.NDArray[np.floating]
    if isinstance(model, PopularityBaseline):
        scores = model.retrieval_scores(catalogue[:, 0], rows.size)
    else:
        model.eval()
        features = [torch.as_tensor(data.test.features[n][rows]) for n in INPUT_NAMES]
        users = model.user_tower(*features)
        items = model.item_tower(torch.as_tensor(catalogue[:, 0]), torch.as_tensor(catalogue[:, 1]))
        scores = (users @ items.T).numpy()
    return recall_at_k(scores, targets, k), int(rows.size)


def _catalogue(
    data: Dataset,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """Distinct (item, category) pairs seen anywhere; targets as catalogue indices."""
    catalogue = shown_pairs(data.train, data.valid, data.test)
    index = {int(item): i for i, item in enumerate(catalogue[:, 0])}
    rows = np.flatnonzero(data.test.next_item > 0)
    targets = np.array([index[int(data.test.next_item[r])] for r in rows], dtype=np.int64)
    return catalogue, targets, rows


def quality_report(
    data: Dataset, model: TrainResult, tower: TowerConfig, config: TrainConfig, k: int = 50
) -> list[Row]:
    """Popularity, the model without the sequence encoder (mean-pooled history), the
    model without any history (counters only), and the model: same test data."""
    test = ExampleTensors(data.test)
    popularity = PopularityBaseline(data.train, data.schema.item_buckets)
    rows = [Row("popularity", evaluate_probs(popularity.predict(data.test), data.test))]
    rows[0].metrics[f"recall@{k}"] = retrieval_recall(popularity, data, k)[0]
    variants: list[tuple[str, TrainResult]] = []
    ablations: tuple[tuple[str, Encoder], ...] = (
        ("no-seq-encoder (pool)", "pool"),
        ("no-history (counters)", "none"),
    )
    quiet = replace(config, progress=False)
    for name, encoder in ablations:
        ablated = replace(tower, encoder=encoder)
        variants.append((name, train(data.train, data.valid, data.schema, ablated, quiet)))
    variants.append((f"sum ({tower.encoder})", model))
    for name, result in variants:
        metrics = evaluate_probs(predict(result.model, test), data.test)
        metrics[f"recall@{k}"] = retrieval_recall(result.model, data, k)[0]
        metrics["steps"] = float(result.steps)
        rows.append(Row(name, metrics))
    return rows


def format_report(rows: list[Row], k: int = 50) -> str:
    header = (
        f"{'model':<24} {'click AUC':>9} {'click NE':>9} {'like AUC':>9} {'like NE':>9} "
        f"{f'recall@{k}':>10}"
    )
    lines = [header]
    for row in rows:
        m = row.metrics
        lines.append(
            f"{row.name:<24} {m['click_auc']:>9.4f} {m['click_ne']:>9.4f} "
            f"{m['like_auc']:>9.4f} {m['like_ne']:>9.4f} {m[f'recall@{k}']:>10.4f}"
        )
    return "\n".join(lines)
