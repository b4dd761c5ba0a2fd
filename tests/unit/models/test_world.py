from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from models.logs import load_events, write_jsonl
from models.world import DAY_MS, World, WorldConfig
from service.core.events import EventType, validate_event

SMALL = WorldConfig(users=20, items=100, categories=5, days=2, seed=11)


def test_same_seed_same_events_and_other_seed_differs() -> None:
    first, second = World(SMALL).simulate(), World(SMALL).simulate()
    assert first == second and len(first) > 100
    other = World(WorldConfig(users=20, items=100, categories=5, days=2, seed=12)).simulate()
    assert other != first


def test_events_follow_the_contract_and_time_order() -> None:
    events = World(SMALL).simulate()
    now = SMALL.start_ms + SMALL.days * DAY_MS
    for event in events:
        validate_event(event, now)
    assert [e.ts for e in events] == sorted(e.ts for e in events)
    assert {e.user_id for e in events} <= {f"u{i}" for i in range(SMALL.users)}
    kinds = {e.type for e in events}
    assert {EventType.VIEW, EventType.CLICK} <= kinds


def test_live_traffic_has_the_synthetic_traffic_signature() -> None:
    world = World(SMALL)
    batch = world.events(500, now_ms=1_760_000_000_000)
    assert len(batch) == 500
    assert all(e.ts == 1_760_000_000_000 for e in batch)
    assert {e.user_id for e in batch} <= {f"u{i}" for i in range(SMALL.users)}
    assert world.events(0, 1_760_000_000_000) == []


def test_interests_drift_and_clicks_follow_affinity() -> None:
    world = World(WorldConfig(users=200, items=500, categories=10, seed=5))
    users = np.arange(200, dtype=np.int64)
    before = world.interests.copy()
    world.advance(users, world.config.start_ms + 3 * DAY_MS)
    cosines = np.einsum("nd,nd->n", before, world.interests)
    assert np.all(cosines < 1.0) and np.mean(cosines) > 0.3  # moved, but still related
    # the ground truth: an item along the user's interest beats one against it
    aligned = np.argmax(world.interests @ world.item_vectors.T, axis=1)
    opposed = np.argmin(world.interests @ world.item_vectors.T, axis=1)
    assert np.all(world.click_probability(users, aligned) > world.click_probability(users, opposed))


def test_logs_round_trip_through_jsonl_and_parquet(tmp_path: Path) -> None:
    events = World(SMALL).simulate()[:200]
    write_jsonl(events, tmp_path / "events.jsonl")
    assert load_events(tmp_path / "events.jsonl") == events
    rows = [
        {
            "event_id": e.event_id,
            "user_id": e.user_id,
            "ts": e.ts,
            "type": str(e.type),
            "item_id": str(e.item_id),
            "category": e.category,
        }
        for e in events
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "events.parquet")
    assert load_events(tmp_path / "events.parquet") == events


def test_bad_log_rows_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(
        '{"event_id": "e1", "user_id": "a b", "ts": 1760000000000, '
        '"type": "view", "item_id": "i1"}\n'
    )
    with pytest.raises(ValueError, match="row 1: invalid user_id"):
        load_events(path)
    with pytest.raises(ValueError, match="unknown log format"):
        load_events(tmp_path / "events.csv")
