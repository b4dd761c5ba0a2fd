from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.dataset import Dataset
from models.metrics import auc, auc_standard_error, normalized_entropy, recall_at_k
from models.train import (
    ExampleTensors,
    TrainConfig,
    TrainResult,
    evaluate_probs,
    predict,
    train,
)
from tests.unit.models.conftest import TINY_TOWER


def test_loss_goes_down_and_history_is_recorded(tiny_trained: TrainResult) -> None:
    losses = tiny_trained.losses
    assert len(losses) >= 10
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert tiny_trained.history and "valid_click_auc" in tiny_trained.history[0]


def test_the_returned_model_is_the_evaluation_kept_as_best(
    tiny_trained: TrainResult, tiny_data: Dataset
) -> None:
    """``valid`` is the history's lowest click NE, and the model returned is that very
    state: evaluating it again gives the same numbers."""
    best = min(tiny_trained.history, key=lambda h: h["valid_click_ne"])
    assert tiny_trained.valid == best
    again = evaluate_probs(
        predict(tiny_trained.model, ExampleTensors(tiny_data.valid)), tiny_data.valid, "valid_"
    )
    assert again == pytest.approx({k: v for k, v in best.items() if k != "step"}, abs=1e-6)


def test_same_seed_same_weights(tiny_data: Dataset) -> None:
    config = TrainConfig(max_steps=3, batch_size=16, eval_every=3, progress=False, seed=4)

    def weights() -> torch.Tensor:
        result = train(tiny_data.train, tiny_data.valid, tiny_data.schema, TINY_TOWER, config)
        return torch.cat([p.detach().flatten() for p in result.model.parameters()])

    torch.testing.assert_close(weights(), weights(), rtol=0, atol=0)


def test_early_stopping_keeps_the_best_evaluation(tiny_data: Dataset) -> None:
    config = TrainConfig(
        epochs=50, batch_size=16, eval_every=2, patience=1, lr=0.05, progress=False
    )
    result = train(tiny_data.train, tiny_data.valid, tiny_data.schema, TINY_TOWER, config)
    assert result.stopped_early
    best = min(h["valid_click_ne"] for h in result.history)
    assert result.valid["valid_click_ne"] == best


def test_metrics_on_known_cases() -> None:
    labels = np.array([0, 0, 1, 1], dtype=np.float64)
    assert auc(labels, np.array([0.1, 0.2, 0.3, 0.4])) == 1.0
    assert auc(labels, np.array([0.5, 0.5, 0.5, 0.5])) == 0.5
    assert normalized_entropy(labels, np.full(4, 0.5)) == np.float64(1.0)
    assert normalized_entropy(labels, np.array([0.01, 0.01, 0.99, 0.99])) < 0.05
    scores = np.array([[0.9, 0.1, 0.5], [0.1, 0.9, 0.5]])
    assert recall_at_k(scores, np.array([0, 0]), k=1) == 0.5
    assert recall_at_k(scores, np.array([2, 2]), k=2) == 1.0


def test_auc_standard_error_matches_the_exact_null_variance_and_shrinks_with_data() -> None:
    # at AUC 0.5 Hanley-McNeil equals the exact Mann-Whitney variance (n1 + n2 + 1) / (12 n1 n2)
    for n1, n2 in ((10, 30), (800, 2100)):
        expected = ((n1 + n2 + 1) / (12 * n1 * n2)) ** 0.5
        assert auc_standard_error(0.5, n1, n2) == pytest.approx(expected, rel=1e-12)
    assert auc_standard_error(0.74, 8_000, 21_000) < auc_standard_error(0.74, 800, 2_100)
    assert math.isnan(auc_standard_error(0.7, 0, 10))
