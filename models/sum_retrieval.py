"""The SUM user tower trained for next-item retrieval on a leave-one-out split.

The tower is the served one (:class:`~models.user_tower.UserTower`, fed by
``service.core.tensors.assemble`` from feature states), so what is evaluated is what
the worker computes. Its item side is a table of one vector per catalogue item;
items are ranked by ``user . item``. Training examples are cut points in each
user's training sequence: the feature state holding the events before the cut,
and the item at the cut as the target of a full softmax over all items; every
epoch draws ``cuts_per_user`` fresh cuts per user.

Time: feature states are assembled at ``now_ms`` (the training clock). For ML-1M
(2000-2003) every counter has decayed to exactly 0 by then and ages are ~12.2
(log1p of ~2e5 hours) for every event, which is what the worker sees when the
events are replayed today, so the fast training states carry zero counters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.fit import FitConfig, FitResult, fit
from models.movielens import Split, event_type, to_events
from models.retrieval_eval import metrics_from_ranks, ranks_by_embeddings
from models.user_tower import TowerConfig, UserTower, to_torch
from service.core.events import NUM_EVENT_TYPES, SourcedEvent
from service.core.features import NUM_HALF_LIVES, FeatureState, apply_events, hash_id
from service.core.tensors import InputSchema, Tensors, assemble

IntArray = npt.NDArray[np.int64]
_ZERO_COUNTERS = np.zeros((NUM_EVENT_TYPES, NUM_HALF_LIVES), dtype=np.float32)


@dataclass(frozen=True, slots=True)
class SumRetrievalConfig:
    cuts_per_user: int = 8
    targets_per_cut: int = 1  # K: the item at the cut and the K-1 after it
    future_decay: float = 0.8  # weight of the k-th target: future_decay ** k
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    seed: int = 0


class NextItemModel(nn.Module):
    """User tower + one output vector per item, scored by ``scale * user . item``."""

    def __init__(self, schema: InputSchema, tower: TowerConfig, num_items: int) -> None:
        super().__init__()
        self.user_tower = UserTower(schema, tower)
        self.items = nn.Embedding(num_items, tower.output_dim)
        nn.init.normal_(self.items.weight, std=0.1)
        self.scale = nn.Parameter(torch.tensor(10.0))

    def logits(self, users: Tensor) -> Tensor:
        out: Tensor = self.scale * users @ self.items.weight.T
        return out


class Sequences:
    """Each user's rows in time order as feature-state arrays (hashes, type codes, ms)."""

    def __init__(self, split: Split) -> None:
        r = split.ratings
        item_hashes = np.fromiter((hash_id(t) for t in r.item_ids), np.int64, len(r.item_ids))
        genre_hashes = np.fromiter((hash_id(g or None) for g in r.genres), np.int64, len(r.genres))
        types = np.fromiter(
            (event_type(float(x)).code for x in r.ratings), np.uint8, len(r.ratings)
        )
        rows = split.rows
        self.indptr = split.indptr
        self.items = r.items[rows]
        self.item_hashes = item_hashes[self.items]
        self.category_hashes = genre_hashes[self.items]
        self.types = types[rows]
        self.ms = r.seconds[rows] * 1000

    def state(self, user: int, end: int, length: int) -> FeatureState:
        """The user's last ``length`` events before its ``end``-th (counters decayed away)."""
        lo = self.indptr[user]
        stop = lo + end
        start = max(lo, stop - length)
        return FeatureState(
            item_hashes=self.item_hashes[start:stop],
            category_hashes=self.category_hashes[start:stop],
            types=self.types[start:stop],
            timestamps=self.ms[start:stop],
            counters=_ZERO_COUNTERS,
            last_event_ms=int(self.ms[stop - 1]) if stop > start else 0,
            version=1,
            partition=-1,
            offset=-1,
        )


def replayed_states(split: Split, part: str, history_length: int) -> list[FeatureState]:
    """Each user's feature state after the service's own update applied its ``part``
    inputs (``valid``/``test``) in time order: exactly what ingest builds from a replay."""
    indptr, rows = split.inputs(part)
    states = []
    for u in range(len(indptr) - 1):
        events = to_events(split.ratings, rows[indptr[u] : indptr[u + 1]])
        sourced = [SourcedEvent(e, 0, i) for i, e in enumerate(events)]
        states.append(apply_events(FeatureState.empty(), sourced, history_length)[0])
    return states


def future_loss(
    logits: Tensor, items: IntArray, starts: IntArray, ends: IntArray, config: SumRetrievalConfig
) -> Tensor:
    """Cross-entropy of each row's next ``targets_per_cut`` items (``items[start + k]``
    while before ``end``, the end of its training part), the k-th weighted
    ``future_decay ** k``, normalized by the weights present."""
    total = logits.new_zeros(())
    weight = logits.new_zeros(())
    for k in range(config.targets_per_cut):
        present = starts + k < ends
        if not present.any():
            break
        rows = torch.as_tensor(np.flatnonzero(present))
        targets = torch.as_tensor(items[starts[present] + k])
        w = config.future_decay**k
        total = total + w * F.cross_entropy(logits[rows], targets, reduction="sum")
        weight = weight + w * len(rows)
    return total / weight


@torch.no_grad()
def embed(tower: UserTower, tensors: Tensors, batch_size: int = 512) -> npt.NDArray[np.float32]:
    tower.eval()
    inputs = to_torch(dict(tensors))
    out = [
        tower(*(t[start : start + batch_size] for t in inputs)).numpy()
        for start in range(0, len(inputs[0]), batch_size)
    ]
    return np.concatenate(out).astype(np.float32)


def train_sum(
    split: Split,
    schema: InputSchema,
    tower: TowerConfig,
    config: SumRetrievalConfig,
    fit_config: FitConfig,
    now_ms: int,
) -> tuple[NextItemModel, FitResult]:
    """Train on cuts of the training part; early-stop on validation NDCG@10."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = NextItemModel(schema, tower, split.num_items)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=config.lr, weight_decay=config.weight_decay
    )
    seqs = Sequences(split)
    train_lengths = np.diff(split.indptr) - 2
    users = np.flatnonzero(train_lengths >= 2)
    train_indptr, train_items = split.seen("train")
    valid_targets = split.targets("valid")
    length = schema.history_length

    def train_epoch(_: int) -> float:
        model.train()
        user_of = np.repeat(users, config.cuts_per_user)
        cuts = 1 + (rng.random(len(user_of)) * (train_lengths[user_of] - 1)).astype(np.int64)
        order = rng.permutation(len(user_of))
        losses = []
        for batch in np.array_split(order, max(1, -(-len(order) // config.batch_size))):
            states = [
                seqs.state(int(u), int(c), length)
                for u, c in zip(user_of[batch], cuts[batch], strict=True)
            ]
            vectors = model.user_tower(*to_torch(dict(assemble(states, now_ms, schema))))
            loss = future_loss(
                model.logits(vectors),
                seqs.items,
                seqs.indptr[user_of[batch]] + cuts[batch],
                seqs.indptr[user_of[batch]] + train_lengths[user_of[batch]],
                config,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            losses.append(float(loss.detach()))
        return float(np.mean(losses))

    valid_states = [seqs.state(u, int(n), length) for u, n in enumerate(train_lengths)]
    valid_tensors = assemble(valid_states, now_ms, schema)

    def validate() -> dict[str, float]:
        vectors = embed(model.user_tower, valid_tensors)
        items = model.items.weight.detach().numpy()
        ranks = ranks_by_embeddings(vectors, items, valid_targets, train_indptr, train_items)
        return metrics_from_ranks(ranks)

    return model, fit(model, train_epoch, validate, fit_config, "sum")
