"""Impression-level logs and embeddings "as served at" any earlier time.

The downstream side of the evaluation: every VIEW is an impression a ranker scored,
labelled clicked when the same user clicked the same item within a minute. For any
(user, time) the user's feature state is replayed through the service's own
``apply_events`` from the events strictly before that time, assembled by the service's
own ``assemble`` and embedded by the served ONNX models, so "the embedding at staleness
s" is exactly what the worker would have written at t - s and the API served since.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from models.examples import assemble_at, bucket
from service.core.events import Event, EventType, SourcedEvent
from service.core.features import FeatureState, apply_events
from service.core.tensors import InputSchema, Tensors

CLICK_WINDOW_MS: Final = 60_000
Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]
Embedder = Callable[[Tensors], Float32Array]


@dataclass(frozen=True, slots=True)
class ImpressionLog:
    """N impressions, row-aligned: who saw which item when, and whether they clicked."""

    users: Int64Array  # index into ``user_ids``
    user_ids: list[str]
    times: Int64Array  # epoch ms of the view
    items: Int64Array  # bucketed item id (the model's vocabulary)
    categories: Int64Array  # bucketed category id
    clicked: Float32Array

    def __len__(self) -> int:
        return int(self.times.shape[0])

    def take(self, rows: Int64Array) -> ImpressionLog:
        return ImpressionLog(
            self.users[rows],
            self.user_ids,
            self.times[rows],
            self.items[rows],
            self.categories[rows],
            self.clicked[rows],
        )

    def between(self, start_ms: int, end_ms: int) -> ImpressionLog:
        """Impressions with start_ms <= time < end_ms."""
        return self.take(np.flatnonzero((self.times >= start_ms) & (self.times < end_ms)))

    def sample(self, limit: int, seed: int = 0) -> ImpressionLog:
        """At most ``limit`` impressions, drawn uniformly, kept in time order."""
        if len(self) <= limit:
            return self
        rows = np.random.default_rng(seed).choice(len(self), size=limit, replace=False)
        return self.take(np.sort(rows))


def impressions_from_events(events: Sequence[Event], schema: InputSchema) -> ImpressionLog:
    """Every VIEW as an impression; clicked if a CLICK on the same item by the same user
    follows within ``CLICK_WINDOW_MS``."""
    clicks: dict[tuple[str, str], list[int]] = defaultdict(list)
    for e in events:
        if e.type is EventType.CLICK:
            clicks[(e.user_id, str(e.item_id))].append(e.ts)
    index: dict[str, int] = {}
    users, times, items, categories, clicked = [], [], [], [], []
    for e in events:
        if e.type is not EventType.VIEW:
            continue
        users.append(index.setdefault(e.user_id, len(index)))
        times.append(e.ts)
        items.append(bucket(e.item_id, schema.item_buckets))
        categories.append(bucket(e.category, schema.category_buckets))
        after = clicks.get((e.user_id, str(e.item_id)), ())
        clicked.append(any(e.ts <= t <= e.ts + CLICK_WINDOW_MS for t in after))
    return ImpressionLog(
        np.asarray(users, dtype=np.int64),
        list(index),
        np.asarray(times, dtype=np.int64),
        np.asarray(items, dtype=np.int64),
        np.asarray(categories, dtype=np.int64),
        np.asarray(clicked, dtype=np.float32),
    )


def embed_as_of(
    events: Sequence[Event],
    user_ids: Sequence[str],
    times: Int64Array,
    schema: InputSchema,
    embedders: dict[str, Embedder],
    *,
    chunk: int = 4096,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Float32Array]:
    """For each query row (user_ids[i], times[i]): the embedding computed at times[i]
    from the user's events strictly before it, by every embedder (all share ``schema``).

    Each user's events are replayed once, in time order, with one ``apply_events`` per
    stretch between consecutive queries; states are embedded in chunks and dropped.
    """
    by_user: dict[str, list[Event]] = defaultdict(list)
    for e in events:
        by_user[e.user_id].append(e)
    queries: dict[str, list[int]] = defaultdict(list)
    for row, user in enumerate(user_ids):
        queries[user].append(row)
    out: dict[str, Float32Array] = {}
    pending_rows: list[int] = []
    pending_states: list[FeatureState] = []

    def flush() -> None:
        if not pending_rows:
            return
        rows = np.asarray(pending_rows, dtype=np.int64)
        tensors = assemble_at(pending_states, times[rows].tolist(), schema)
        for name, embed in embedders.items():
            vectors = embed(tensors)
            if name not in out:
                out[name] = np.zeros((len(user_ids), vectors.shape[1]), dtype=np.float32)
            out[name][rows] = vectors
        if on_progress is not None:
            on_progress(len(pending_rows))
        pending_rows.clear()
        pending_states.clear()

    offset = 0
    for user, rows in queries.items():
        history = sorted(by_user.get(user, ()), key=lambda e: e.ts)
        state, applied = FeatureState.empty(), 0
        for row in sorted(rows, key=lambda r: int(times[r])):
            until = int(times[row])
            upto = applied
            while upto < len(history) and history[upto].ts < until:
                upto += 1
            if upto > applied:
                sourced = [
                    SourcedEvent(e, 0, offset + i) for i, e in enumerate(history[applied:upto])
                ]
                offset += len(sourced)
                state, _ = apply_events(state, sourced, schema.history_length)
                applied = upto
            pending_rows.append(row)
            pending_states.append(state)
            if len(pending_rows) >= chunk:
                flush()
    flush()
    if not out:
        out = {name: np.zeros((0, 0), dtype=np.float32) for name in embedders}
    return out
