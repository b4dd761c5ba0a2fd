"""Epoch loop shared by the next-item models: early stopping on validation NDCG@10 only."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

log = logging.getLogger(__name__)
SELECT_ON = "ndcg@10"


@dataclass(frozen=True, slots=True)
class FitConfig:
    max_epochs: int = 200
    patience: int = 5  # epochs without a better validation NDCG@10
    time_budget_s: float | None = None  # stop after the epoch that crosses it


@dataclass
class FitResult:
    best: dict[str, float]  # validation metrics of the kept epoch
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch
    epochs: int = 0
    seconds: float = 0.0
    stopped_by: str = "max_epochs"


def fit(
    model: nn.Module,
    train_epoch: Callable[[int], float],
    validate: Callable[[], dict[str, float]],
    config: FitConfig,
    name: str,
) -> FitResult:
    """Run epochs until validation NDCG@10 stops improving (or the budget runs out);
    leave ``model`` with the state of its best epoch."""
    start = time.perf_counter()
    result = FitResult(best={})
    best_state, best, bad = copy.deepcopy(model.state_dict()), -1.0, 0
    for epoch in range(1, config.max_epochs + 1):
        loss = train_epoch(epoch)
        metrics = validate()
        elapsed = time.perf_counter() - start
        row = {"epoch": float(epoch), "seconds": elapsed, "loss": loss}
        row.update({f"valid_{k}": v for k, v in metrics.items()})
        result.history.append(row)
        result.epochs = epoch
        log.info("event=fit model=%s %s", name, " ".join(f"{k}={v:.4f}" for k, v in row.items()))
        if metrics[SELECT_ON] > best + 1e-5:
            best, bad, result.best = metrics[SELECT_ON], 0, metrics
            best_state = copy.deepcopy(model.state_dict())
        else:
            bad += 1
            if bad >= config.patience:
                result.stopped_by = "early_stopping"
                break
        if config.time_budget_s is not None and elapsed >= config.time_budget_s:
            result.stopped_by = "time_budget"
            break
    model.load_state_dict(best_state)
    model.eval()
    result.seconds = time.perf_counter() - start
    return result
