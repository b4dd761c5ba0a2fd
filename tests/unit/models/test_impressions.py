"""Impression logs and the replay of 'the embedding as served at time t'."""

from __future__ import annotations

import numpy as np

from models.examples import bucket
from models.impressions import embed_as_of, impressions_from_events
from models.world import World, WorldConfig
from service.core.events import Event, EventType, SourcedEvent
from service.core.features import FeatureState, apply_events
from service.core.tensors import InputSchema, Tensors, assemble

SCHEMA = InputSchema(history_length=8, item_buckets=101, category_buckets=11)


def _event(n: int, user: str, ts: int, kind: EventType, item: str) -> Event:
    return Event(event_id=f"e{n}", user_id=user, ts=ts, type=kind, item_id=item, category="c1")


def test_a_view_is_clicked_only_by_a_click_on_the_same_item_within_the_window() -> None:
    events = [
        _event(0, "a", 1_000, EventType.VIEW, "i1"),
        _event(1, "a", 1_800, EventType.CLICK, "i1"),
        _event(2, "a", 2_000, EventType.VIEW, "i2"),
        _event(3, "b", 2_500, EventType.CLICK, "i2"),  # another user's click
        _event(4, "a", 3_000, EventType.VIEW, "i3"),
        _event(5, "a", 3_000 + 61_000, EventType.CLICK, "i3"),  # too late
    ]
    log = impressions_from_events(events, SCHEMA)
    assert log.clicked.tolist() == [1.0, 0.0, 0.0]
    assert log.times.tolist() == [1_000, 2_000, 3_000]
    assert log.items.tolist() == [bucket(i, SCHEMA.item_buckets) for i in ("i1", "i2", "i3")]
    assert [log.user_ids[u] for u in log.users] == ["a", "a", "a"]


def _raw_inputs(tensors: Tensors) -> np.ndarray:
    """A deterministic 'model': the assembled inputs themselves, flattened."""
    parts = [
        np.asarray(tensors[k], dtype=np.float32).reshape(len(tensors["mask"]), -1)
        for k in sorted(tensors)
    ]
    return np.concatenate(parts, axis=1)


def test_embed_as_of_equals_replaying_every_event_before_the_query_time() -> None:
    events = World(WorldConfig(users=12, items=200, categories=5, days=2, seed=3)).simulate()
    rng = np.random.default_rng(0)
    picks = rng.choice(len(events), size=40, replace=False)
    users = [events[i].user_id for i in picks]
    times = np.array([events[i].ts + int(rng.integers(-5_000, 5_000)) for i in picks])
    got = embed_as_of(events, users, times, SCHEMA, {"raw": _raw_inputs}, chunk=7)["raw"]
    for row, (user, at) in enumerate(zip(users, times.tolist(), strict=True)):
        before = [e for e in events if e.user_id == user and e.ts < at]
        before.sort(key=lambda e: e.ts)
        state, _ = apply_events(
            FeatureState.empty(), [SourcedEvent(e, 0, i) for i, e in enumerate(before)], 8
        )
        expected = _raw_inputs(assemble([state], at, SCHEMA))[0]
        np.testing.assert_allclose(got[row], expected, rtol=1e-6, atol=1e-6)
