"""Training examples from an event stream: the same events, states and tensors as serving.

Events are replayed per user through the service's own ``apply_events``; a session
(events closer than ``session_gap_ms``) becomes one example: the user's feature
state *before* the session, assembled at the session start by the service's own
``assemble``, and the session's viewed items labelled clicked / liked. The first
clicked item is the next-item target for retrieval metrics. Works the same for the
synthetic world and for real logs.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt

from service.core.events import Event, EventType, SourcedEvent
from service.core.features import FeatureState, apply_events, hash_id
from service.core.tensors import InputSchema, Tensors, assemble, bucket_ids

SESSION_GAP_MS: Final = 30 * 60_000
Int64Array = npt.NDArray[np.int64]
Float32Array = npt.NDArray[np.float32]


def bucket(value: str | int | None, buckets: int) -> int:
    """The id the model sees for an item or category: ``assemble``'s own rule."""
    return int(bucket_ids(np.array([hash_id(value)], dtype=np.int64), buckets)[0])


def shown_pairs(*sets: Examples) -> Int64Array:
    """Distinct (item, category) pairs shown in ``sets``, [N, 2]: a retrieval catalogue."""
    pairs = [
        np.stack([s.items[s.impression_mask > 0], s.categories[s.impression_mask > 0]], axis=1)
        for s in sets
    ]
    return np.unique(np.concatenate(pairs), axis=0).reshape(-1, 2)


@dataclass(frozen=True, slots=True)
class Examples:
    """S sessions with up to K impressions each; arrays are row-aligned."""

    features: Tensors  # assemble() output, [S, ...]
    items: Int64Array  # [S, K] bucketed item ids, 0 = no impression
    categories: Int64Array  # [S, K]
    impression_mask: Float32Array  # [S, K]
    clicks: Float32Array  # [S, K]
    likes: Float32Array  # [S, K]
    next_item: Int64Array  # [S] first clicked item (bucketed), 0 = none
    times: Int64Array  # [S] session start, epoch ms
    users: list[str]
    states: list[FeatureState]  # the states behind ``features`` (for other schemas)

    def __len__(self) -> int:
        return int(self.times.shape[0])

    def take(self, rows: Int64Array) -> Examples:
        return Examples(
            features={k: v[rows] for k, v in self.features.items()},
            items=self.items[rows],
            categories=self.categories[rows],
            impression_mask=self.impression_mask[rows],
            clicks=self.clicks[rows],
            likes=self.likes[rows],
            next_item=self.next_item[rows],
            times=self.times[rows],
            users=[self.users[i] for i in rows.tolist()],
            states=[self.states[i] for i in rows.tolist()],
        )

    def split_by_time(self, *fractions: float) -> list[Examples]:
        """Consecutive time slices (e.g. 0.8, 0.1, 0.1): validate on the future only."""
        order = np.argsort(self.times, kind="stable")
        bounds = np.cumsum([0.0, *fractions]) / sum(fractions) * len(order)
        cuts = [round(float(b)) for b in bounds]
        return [self.take(order[a:b]) for a, b in itertools.pairwise(cuts)]


def _sessions(events: list[Event], gap_ms: int) -> list[list[Event]]:
    sessions: list[list[Event]] = []
    last = None
    for event in events:
        if last is None or event.ts - last > gap_ms:
            sessions.append([])
        sessions[-1].append(event)
        last = event.ts
    return sessions


def build_examples(
    events: Sequence[Event],
    schema: InputSchema,
    *,
    history_length: int | None = None,
    max_impressions: int = 10,
    session_gap_ms: int = SESSION_GAP_MS,
) -> Examples:
    """Replay ``events`` (any order) into session examples; see the module docstring."""
    length = history_length or schema.history_length
    by_user: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_user[event.user_id].append(event)

    states: list[FeatureState] = []
    times: list[int] = []
    users: list[str] = []
    rows: list[tuple[list[Event], set[str], set[str]]] = []
    offset = 0
    for user_id, history in by_user.items():
        history.sort(key=lambda e: e.ts)
        state = FeatureState.empty()
        for session in _sessions(history, session_gap_ms):
            first_views: dict[str, Event] = {}
            for e in session:
                if e.type is EventType.VIEW and len(first_views) < max_impressions:
                    first_views.setdefault(str(e.item_id), e)
            if first_views:
                clicked = {str(e.item_id) for e in session if e.type is EventType.CLICK}
                liked = {str(e.item_id) for e in session if e.type is EventType.LIKE}
                states.append(state)
                times.append(session[0].ts)
                users.append(user_id)
                rows.append((list(first_views.values()), clicked, liked))
            sourced = [SourcedEvent(e, 0, offset + i) for i, e in enumerate(session)]
            offset += len(session)
            state, _ = apply_events(state, sourced, length)

    n, k = len(rows), max_impressions
    items = np.zeros((n, k), dtype=np.int64)
    categories = np.zeros((n, k), dtype=np.int64)
    mask = np.zeros((n, k), dtype=np.float32)
    clicks = np.zeros((n, k), dtype=np.float32)
    likes = np.zeros((n, k), dtype=np.float32)
    next_item = np.zeros(n, dtype=np.int64)
    for r, (views, clicked, liked) in enumerate(rows):
        for j, view in enumerate(views):
            key = str(view.item_id)
            items[r, j] = bucket(view.item_id, schema.item_buckets)
            categories[r, j] = bucket(view.category, schema.category_buckets)
            mask[r, j] = 1.0
            clicks[r, j] = float(key in clicked)
            likes[r, j] = float(key in liked)
            if key in clicked and next_item[r] == 0:
                next_item[r] = items[r, j]
    return Examples(
        features=assemble_at(states, times, schema),
        items=items,
        categories=categories,
        impression_mask=mask,
        clicks=clicks,
        likes=likes,
        next_item=next_item,
        times=np.asarray(times, dtype=np.int64),
        users=users,
        states=states,
    )


def assemble_at(
    states: Sequence[FeatureState], times: Sequence[int], schema: InputSchema
) -> Tensors:
    """``assemble`` with a 'now' per row (training asks at each session's start)."""
    parts = [assemble([s], t, schema) for s, t in zip(states, times, strict=True)]
    names = schema.inputs()
    if not parts:
        return assemble([], 0, schema)
    return {name: np.concatenate([p[name] for p in parts]) for name in names}
