"""Full-ranking next-item evaluation (HR@K, NDCG@K) and the ``eval.npz`` artefact.

Every item is ranked by ``user . item``; the user's own input items (its training
part) are filtered out, except the target itself. The rank of the target is the
number of other unfiltered items that score higher, plus those that tie with it
and have a lower item index (a stable sort by descending score). HR@K is the share
of users with rank < K, NDCG@K the mean of 1/log2(rank + 2) over those users (one
relevant item, so the ideal DCG is 1).

``eval.npz`` holds what anyone needs to recompute the table with numpy alone:
``user_embeddings`` [U, D] (float32), ``item_embeddings`` [I, D], ``targets`` [U]
(held-out item index), ``seen_indptr`` [U+1] and ``seen_indices`` (CSR of each
user's training items), ``user_ids`` [U] and ``item_ids`` [I] (strings of the source
file).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]
KS = (10, 20)


def target_ranks(
    scores: npt.NDArray[np.floating],
    targets: IntArray,
    seen_indptr: IntArray,
    seen_indices: IntArray,
) -> IntArray:
    """0-based rank of each row's target among its unfiltered items ([users, items])."""
    scores = np.array(scores, dtype=np.float64)  # a copy: filtering writes into it
    users = np.arange(len(targets))
    target_scores = scores[users, targets]
    rows = np.repeat(users, np.diff(seen_indptr))
    scores[rows, seen_indices] = -np.inf
    scores[users, targets] = target_scores  # the target competes even if seen before
    higher = (scores > target_scores[:, None]).sum(axis=1)
    ties = scores == target_scores[:, None]
    before = np.arange(scores.shape[1])[None, :] < targets[:, None]
    ties_before = (ties & before).sum(axis=1)
    ranks: IntArray = (higher + ties_before).astype(np.int64)
    return ranks


def metrics_from_ranks(ranks: IntArray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.mean()) if len(ranks) else float("nan")
        gains = np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)
        out[f"ndcg@{k}"] = float(gains.mean()) if len(ranks) else float("nan")
    return out


def ranks_by_embeddings(
    users: FloatArray,
    items: FloatArray,
    targets: IntArray,
    seen_indptr: IntArray,
    seen_indices: IntArray,
    chunk: int = 512,
) -> IntArray:
    """Target ranks under ``users @ items.T``, a chunk of users at a time."""
    out = []
    for start in range(0, len(targets), chunk):
        stop = min(start + chunk, len(targets))
        lo, hi = seen_indptr[start], seen_indptr[stop]
        scores = users[start:stop].astype(np.float64) @ items.astype(np.float64).T
        out.append(
            target_ranks(
                scores, targets[start:stop], seen_indptr[start : stop + 1] - lo, seen_indices[lo:hi]
            )
        )
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def popularity_scores(seen_indices: IntArray, num_items: int) -> FloatArray:
    """Item scores of the popularity baseline: how often each item is a training item."""
    return np.bincount(seen_indices, minlength=num_items).astype(np.float32)


@dataclass(frozen=True, slots=True)
class EvalSet:
    """The contents of ``eval.npz`` (see the module docstring)."""

    user_embeddings: FloatArray
    item_embeddings: FloatArray
    targets: IntArray
    seen_indptr: IntArray
    seen_indices: IntArray
    user_ids: list[str]
    item_ids: list[str]

    def ranks(self) -> IntArray:
        return ranks_by_embeddings(
            self.user_embeddings,
            self.item_embeddings,
            self.targets,
            self.seen_indptr,
            self.seen_indices,
        )

    def metrics(self) -> dict[str, float]:
        return metrics_from_ranks(self.ranks())

    def popularity_metrics(self) -> dict[str, float]:
        items = popularity_scores(self.seen_indices, len(self.item_ids))[:, None]
        users = np.ones((len(self.targets), 1), dtype=np.float32)
        return metrics_from_ranks(
            ranks_by_embeddings(users, items, self.targets, self.seen_indptr, self.seen_indices)
        )

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path,
            user_embeddings=self.user_embeddings.astype(np.float32),
            item_embeddings=self.item_embeddings.astype(np.float32),
            targets=self.targets.astype(np.int64),
            seen_indptr=self.seen_indptr.astype(np.int64),
            seen_indices=self.seen_indices.astype(np.int64),
            user_ids=np.asarray(self.user_ids, dtype=np.str_),
            item_ids=np.asarray(self.item_ids, dtype=np.str_),
        )

    @classmethod
    def load(cls, path: Path) -> EvalSet:
        with np.load(path, allow_pickle=False) as data:
            return cls(
                user_embeddings=data["user_embeddings"],
                item_embeddings=data["item_embeddings"],
                targets=data["targets"],
                seen_indptr=data["seen_indptr"],
                seen_indices=data["seen_indices"],
                user_ids=[str(u) for u in data["user_ids"]],
                item_ids=[str(i) for i in data["item_ids"]],
            )
