"""Full-ranking HR@K / NDCG@K on hand-computed cases, seen-item filtering, eval.npz."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from models.retrieval_eval import (
    EvalSet,
    metrics_from_ranks,
    popularity_scores,
    ranks_by_embeddings,
    target_ranks,
)
from models.sasrec import SASRec, SASRecConfig, left_padded

NONE = np.zeros(0, dtype=np.int64)


def ranks(scores: list[list[float]], targets: list[int], seen: list[list[int]]) -> list[int]:
    indptr = np.cumsum([0, *(len(s) for s in seen)]).astype(np.int64)
    flat = np.asarray([i for s in seen for i in s], dtype=np.int64)
    found: list[int] = target_ranks(np.asarray(scores), np.asarray(targets), indptr, flat).tolist()
    return found


def test_rank_counts_the_items_scoring_higher() -> None:
    assert ranks([[0.1, 0.9, 0.5, 0.3]], [2], [[]]) == [1]
    assert ranks([[0.1, 0.9, 0.5, 0.3]], [1], [[]]) == [0]
    assert ranks([[0.1, 0.9, 0.5, 0.3]], [0], [[]]) == [3]


def test_ties_go_to_the_lower_item_index() -> None:
    assert ranks([[0.5, 0.5, 0.5]], [0], [[]]) == [0]
    assert ranks([[0.5, 0.5, 0.5]], [2], [[]]) == [2]
    assert ranks([[0.7, 0.5, 0.5]], [2], [[]]) == [2]


def test_seen_items_are_filtered_but_the_target_always_competes() -> None:
    # items 1 and 3 outscore the target 2; item 1 is a training item of the user
    assert ranks([[0.1, 0.9, 0.5, 0.8]], [2], [[1]]) == [1]
    assert ranks([[0.1, 0.9, 0.5, 0.8]], [2], [[1, 3]]) == [0]
    assert ranks([[0.1, 0.9, 0.5, 0.8]], [2], [[2, 1]]) == [1]  # the target itself stays
    # per user: the second user's seen list does not filter the first user's items
    assert ranks([[0.9, 0.1], [0.9, 0.1]], [1, 1], [[], [0]]) == [1, 0]


def test_hr_and_ndcg_by_hand() -> None:
    got = metrics_from_ranks(np.array([0, 1, 10, 25]))
    assert got["hr@10"] == pytest.approx(2 / 4)
    assert got["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert got["hr@20"] == pytest.approx(3 / 4)
    assert got["ndcg@20"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(12)) / 4)


def test_ranking_by_embeddings_in_chunks_equals_the_dense_scores() -> None:
    rng = np.random.default_rng(0)
    users, items = rng.normal(size=(7, 4)).astype(np.float32), rng.normal(size=(9, 4))
    targets = rng.integers(0, 9, size=7)
    seen = [list(rng.choice(9, size=3, replace=False)) for _ in range(7)]
    indptr = np.cumsum([0, *(len(s) for s in seen)]).astype(np.int64)
    flat = np.asarray([i for s in seen for i in s], dtype=np.int64)
    chunked = ranks_by_embeddings(users, items.astype(np.float32), targets, indptr, flat, chunk=3)
    dense = target_ranks(users.astype(np.float64) @ items.T, targets, indptr, flat)
    assert chunked.tolist() == dense.tolist()


def test_popularity_counts_training_items() -> None:
    assert popularity_scores(np.array([2, 0, 2, 2]), 4).tolist() == [1.0, 0.0, 3.0, 0.0]


def test_eval_npz_round_trip_and_recompute_with_numpy_alone(tmp_path: Path) -> None:
    # two users, three items; user a: scores 1, 3, 2 -> target 2 is 2nd, or 1st with item
    # 1 seen; user b: scores -1, -3, -2 -> target 1 is last (3rd), 2nd with item 0 seen
    evals = EvalSet(
        user_embeddings=np.array([[1.0], [-1.0]], dtype=np.float32),
        item_embeddings=np.array([[1.0], [3.0], [2.0]], dtype=np.float32),
        targets=np.array([2, 1]),
        seen_indptr=np.array([0, 1, 2]),
        seen_indices=np.array([1, 0]),
        user_ids=["1m_1", "1m_2"],
        item_ids=["A (1990)", "B (1991)", "C (1992)"],
    )
    evals.save(tmp_path / "eval.npz")
    data = np.load(tmp_path / "eval.npz", allow_pickle=False)
    assert data["user_ids"].tolist() == ["1m_1", "1m_2"]
    assert data["item_ids"].tolist() == ["A (1990)", "B (1991)", "C (1992)"]
    loaded = EvalSet.load(tmp_path / "eval.npz")
    assert loaded.ranks().tolist() == [0, 1]
    got = loaded.metrics()
    assert got["hr@10"] == 1.0
    assert got["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3)) / 2)
    # popularity: items 0 and 1 once each, item 2 never. a's target 2 is behind item 0
    # (item 1 filtered): rank 1; b's target 1 beats item 2 (item 0 filtered): rank 0
    assert evals.popularity_metrics()["ndcg@10"] == pytest.approx((1 / math.log2(3) + 1) / 2)


def test_sasrec_handles_padding_and_empty_histories() -> None:
    torch.manual_seed(0)
    model = SASRec(5, SASRecConfig(hidden=8, max_length=4)).eval()
    batch = left_padded(
        np.array([0, 0, 2, 7]), np.array([0, 1, 2, 3, 4, 0, 1]), np.array([0, 1, 2]), 4
    )
    assert batch.tolist() == [[0, 0, 0, 0], [0, 0, 1, 2], [4, 5, 1, 2]]
    with torch.no_grad():
        hidden = model(torch.as_tensor(batch))
    assert hidden.shape == (3, 4, 8) and bool(torch.isfinite(hidden).all())
    # causal: no position sees a later item
    with torch.no_grad():
        one = model(torch.as_tensor([[4, 5, 1, 2]]))[0]
        other = model(torch.as_tensor([[4, 5, 1, 3]]))[0]
    assert torch.allclose(one[:-1], other[:-1]) and not torch.allclose(one[-1], other[-1])
