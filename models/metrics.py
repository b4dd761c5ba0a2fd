"""Offline metrics: AUC, normalized entropy (NE) and retrieval recall@k, pure numpy."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.floating]


def auc(labels: FloatArray, scores: FloatArray) -> float:
    """ROC AUC by the rank-sum formula, ties counted half; nan with one class only."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    positives = labels.sum()
    negatives = labels.size - positives
    if positives == 0 or negatives == 0:
        return float("nan")
    order = np.argsort(scores, kind="stable")
    sorted_scores = scores[order]
    ranks = np.empty(scores.size, dtype=np.float64)
    # average rank within each group of tied scores
    _, starts, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = starts + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    return float(
        (ranks[labels > 0].sum() - positives * (positives + 1) / 2) / (positives * negatives)
    )


def normalized_entropy(labels: FloatArray, probabilities: FloatArray, eps: float = 1e-7) -> float:
    """Log loss divided by the entropy of the base rate (1.0 = no better than the CTR)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probabilities, dtype=np.float64).ravel(), eps, 1 - eps)
    logloss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
    base = float(np.clip(y.mean(), eps, 1 - eps))
    entropy = -(base * np.log(base) + (1 - base) * np.log(1 - base))
    return float(logloss / entropy)


def recall_at_k(scores: FloatArray, targets: npt.NDArray[np.int64], k: int) -> float:
    """Share of rows whose target column is among the row's top-k scores ([rows, items])."""
    scores = np.asarray(scores)
    k = min(k, scores.shape[1])
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float(np.mean(np.any(top == targets[:, None], axis=1)))


def auc_standard_error(auc_value: float, positives: int, negatives: int) -> float:
    """Standard error of an AUC estimate (Hanley & McNeil, 1982); nan without both classes."""
    if positives <= 0 or negatives <= 0:
        return float("nan")
    a = auc_value
    q1, q2 = a / (2 - a), 2 * a * a / (1 + a)
    variance = (a * (1 - a) + (positives - 1) * (q1 - a * a) + (negatives - 1) * (q2 - a * a)) / (
        positives * negatives
    )
    return float(np.sqrt(max(variance, 0.0)))
