"""Order and conflicts of the ingest updater and its consume loop.

The guarantees under test: a batch is committed only after its write succeeded (never
during an outage, never when stopped mid-outage); a user whose stored version moved
between read and write is re-applied from the new state, neither lost nor doubled; the
last compare-and-set round writes unconditionally. Metrics are counted as deltas
around the action: the registry is shared by the whole test session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence

import numpy as np
import pytest
from prometheus_client import REGISTRY

import service.ingest.updater as updater_module
from service.core.events import EventType, SourcedEvent
from service.core.features import HALF_LIVES_MS, FeatureState, apply_events, hash_id
from service.ingest.updater import (
    MAX_CAS_ROUNDS,
    BatchResult,
    FeatureUpdater,
    InProcessEventSource,
    SourceUnavailable,
    retry_until_done,
    run_ingest,
)
from service.store.memory import MemoryStore
from service.store.protocol import StoreUnavailable
from tests.helpers import BASE_TS, event, log_of, sourced

HOUR = 3_600_000
L = 10
CLOCK_MS = BASE_TS + 10 * HOUR


def clock() -> int:
    return CLOCK_MS


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


class Metrics:
    """Snapshot of the ingest counters; ``delta()`` is what changed since."""

    NAMES: tuple[tuple[str, dict[str, str] | None], ...] = (
        ("userembed_ingest_write_conflicts_total", None),
        ("userembed_ingest_events_total", {"outcome": "applied"}),
        ("userembed_ingest_events_total", {"outcome": "duplicate"}),
        ("userembed_ingest_retries_total", {"operation": "store"}),
        ("userembed_ingest_retries_total", {"operation": "commit"}),
        ("userembed_ingest_batch_size_events_count", None),
        ("userembed_ingest_batch_size_events_sum", None),
        ("userembed_ingest_batch_seconds_count", None),
    )
    KEYS = (
        "conflicts",
        "applied",
        "duplicate",
        "store_retries",
        "commit_retries",
        "batches",
        "batched_events",
        "timed_batches",
    )

    def __init__(self) -> None:
        self._before = self._now()

    def _now(self) -> dict[str, float]:
        return {k: sample(n, lab) for k, (n, lab) in zip(self.KEYS, self.NAMES, strict=True)}

    def delta(self) -> dict[str, float]:
        now = self._now()
        return {k: now[k] - self._before[k] for k in self.KEYS if now[k] != self._before[k]}


class RecordingStore(MemoryStore):
    """The in-memory store, recording every feature write (and failing on request)."""

    def __init__(self, log: list[str] | None = None) -> None:
        super().__init__()
        self.log = log if log is not None else []
        self.failures_left = 0  # put_features calls that raise StoreUnavailable first
        self.expected_seen: list[Mapping[str, int] | None] = []
        self.on_outage: asyncio.Event | None = None  # set once failures_left reaches 0 in vain

    async def put_features(
        self,
        states: Mapping[str, FeatureState],
        dirty_at_ms: int | None = None,
        expected_versions: Mapping[str, int] | None = None,
    ) -> list[str]:
        self.expected_seen.append(None if expected_versions is None else dict(expected_versions))
        if self.failures_left:
            self.failures_left -= 1
            self.log.append("write failed")
            raise StoreUnavailable("store down (test)")
        conflicts = await super().put_features(states, dirty_at_ms, expected_versions)
        self.log.append(f"write {sorted(set(states) - set(conflicts))}")
        return conflicts


class RecordingSource:
    """An EventSource over fixed batches, recording next_batch and commit; sets ``stop``
    once it has handed out every batch and one empty poll."""

    def __init__(
        self, batches: list[list[SourcedEvent]], stop: asyncio.Event, log: list[str]
    ) -> None:
        self._batches = list(batches)
        self._stop = stop
        self.log = log
        self.commits = 0
        self.commit_failures_left = 0

    async def next_batch(self, max_events: int, timeout_s: float) -> list[SourcedEvent]:
        if not self._batches:
            self.log.append("next []")
            self._stop.set()
            return []
        batch = self._batches.pop(0)
        self.log.append(f"next {len(batch)}")
        return batch

    async def commit(self) -> None:
        if self.commit_failures_left:
            self.commit_failures_left -= 1
            self.log.append("commit failed")
            raise SourceUnavailable("broker down (test)")
        self.commits += 1
        self.log.append("commit")

    async def close(self) -> None:
        return None


def expected_counters(events: Sequence[tuple[int, EventType]]) -> np.ndarray:
    """The closed form of the decayed counters at the newest event's time."""
    reference = max(ts for ts, _ in events)
    counters = np.zeros((len(EventType), len(HALF_LIVES_MS)), dtype=np.float64)
    for ts, type_ in events:
        counters[type_.code] += np.exp2(-(reference - ts) / np.asarray(HALF_LIVES_MS))
    return counters.astype(np.float32)


@pytest.fixture(autouse=True)
def no_real_sleep(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Backoffs are recorded instead of slept (the stop event still ends a wait)."""
    slept: list[float] = []

    async def sleep(stop: asyncio.Event, seconds: float) -> bool:
        slept.append(seconds)
        await asyncio.sleep(0)
        return stop.is_set()

    monkeypatch.setattr(updater_module, "sleep_unless_stopped", sleep)
    return slept


# -- the updater alone ------------------------------------------------------------------


async def test_a_batch_is_grouped_by_user_and_written_once() -> None:
    store = RecordingStore()
    batch = log_of(
        [
            event("u1", BASE_TS, item_id=1),
            event("u2", BASE_TS + 1, item_id=2),
            event("u1", BASE_TS + 2, item_id=3),
        ]
    )
    updater = FeatureUpdater(store, L, clock=clock)
    metrics = Metrics()
    result = await updater.apply(batch)
    assert result == BatchResult(applied=3, duplicates=0, users=2)
    assert updater.applied_total == 3
    assert store.log == ["write ['u1', 'u2']"]
    assert store.expected_seen == [{"u1": 0, "u2": 0}]
    u1, u2 = await store.get_features(["u1", "u2"])
    assert u1 is not None and u2 is not None
    assert u1.item_hashes.tolist() == [hash_id(1), hash_id(3)]
    assert (u1.version, u1.offset, u2.version, u2.offset) == (1, 2, 1, 1)
    assert sorted(await store.pop_dirty(10)) == [("u1", CLOCK_MS), ("u2", CLOCK_MS)]
    assert metrics.delta() == {"applied": 3}


async def test_a_redelivered_batch_counts_as_duplicates_and_writes_nothing() -> None:
    store = RecordingStore()
    updater = FeatureUpdater(store, L, clock=clock)
    batch = log_of([event("u1", BASE_TS), event("u2", BASE_TS + 1)])
    await updater.apply(batch)
    state_before = await store.get_features(["u1", "u2"])
    metrics = Metrics()
    again = await updater.apply(batch)
    assert again == BatchResult(applied=0, duplicates=2, users=0)
    assert updater.applied_total == 2
    after = await store.get_features(["u1", "u2"])
    assert [s.version for s in after if s] == [s.version for s in state_before if s] == [1, 1]
    assert metrics.delta() == {"duplicate": 2}


async def test_a_partly_redelivered_batch_applies_and_counts_only_the_new_events() -> None:
    store = RecordingStore()
    updater = FeatureUpdater(store, L, clock=clock)
    batch = log_of([event("u1", BASE_TS + i, item_id=i) for i in range(4)])
    await updater.apply(batch[:3])
    metrics = Metrics()
    result = await updater.apply(batch)
    assert result == BatchResult(applied=1, duplicates=3, users=1)
    assert store.expected_seen[-1] == {"u1": 1}
    (state,) = await store.get_features(["u1"])
    assert state is not None and (state.version, state.num_events, state.offset) == (2, 4, 3)
    assert metrics.delta() == {"applied": 1, "duplicate": 3}


async def test_a_store_outage_raises_and_leaves_nothing_written() -> None:
    store = RecordingStore()
    store.failures_left = 1
    updater = FeatureUpdater(store, L, clock=clock)
    with pytest.raises(StoreUnavailable):
        await updater.apply(log_of([event("u1")]))
    assert await store.get_features(["u1"]) == [None]
    assert updater.applied_total == 0


# -- (b) a version that moves between read and write ------------------------------------


class InterloperStore(RecordingStore):
    """Before the first feature write, another writer applies ``event`` for ``user``."""

    def __init__(self, user: str, interloper: SourcedEvent) -> None:
        super().__init__()
        self._pending: tuple[str, SourcedEvent] | None = (user, interloper)

    async def put_features(
        self,
        states: Mapping[str, FeatureState],
        dirty_at_ms: int | None = None,
        expected_versions: Mapping[str, int] | None = None,
    ) -> list[str]:
        if self._pending is not None:
            user, interloper = self._pending
            self._pending = None
            (current,) = await self.get_features([user])
            moved, _ = apply_events(current or FeatureState.empty(), [interloper], L)
            await MemoryStore.put_features(self, {user: moved}, dirty_at_ms=1)
            self.log.append(f"interloper {user} v{moved.version}")
        return await super().put_features(states, dirty_at_ms, expected_versions)


async def test_a_conflict_is_reapplied_on_the_next_round_not_lost_and_not_doubled() -> None:
    store = InterloperStore("u1", sourced(event("u1", BASE_TS + 3, EventType.LIKE, 30), 0, 1))
    updater = FeatureUpdater(store, L, clock=clock)
    await MemoryStore.put_features(
        store, {"u1": apply_events(FeatureState.empty(), log_of([event("u1", BASE_TS)]), L)[0]}
    )
    batch = log_of(
        [
            event("u1", BASE_TS + 1, EventType.VIEW, 10),
            event("u2", BASE_TS + 2, EventType.VIEW, 20),
            event("u1", BASE_TS + 4, EventType.SHARE, 40),
        ],
        first_offset=1,
    )
    metrics = Metrics()
    result = await updater.apply(batch)

    assert result == BatchResult(applied=3, duplicates=0, users=2)
    assert store.log == ["interloper u1 v2", "write ['u2']", "write ['u1']"]
    assert store.expected_seen == [{"u1": 1, "u2": 0}, {"u1": 2}]
    (u1,) = await store.get_features(["u1"])
    assert u1 is not None
    # all four events exactly once, merged by time: ours (partition 0) and the interloper's
    assert u1.item_hashes.tolist() == [hash_id(i) for i in ("i1", 10, 30, 40)]
    assert u1.timestamps.tolist() == [BASE_TS + i for i in (0, 1, 3, 4)]
    assert u1.types.tolist() == [
        t.code for t in (EventType.CLICK, EventType.VIEW, EventType.LIKE, EventType.SHARE)
    ]
    np.testing.assert_allclose(  # float32 state re-read twice: equal up to its rounding
        u1.counters,
        expected_counters(
            [
                (BASE_TS, EventType.CLICK),
                (BASE_TS + 1, EventType.VIEW),
                (BASE_TS + 3, EventType.LIKE),
                (BASE_TS + 4, EventType.SHARE),
            ]
        ),
    )
    assert (u1.version, u1.partition, u1.offset, u1.last_event_ms) == (3, 0, 3, BASE_TS + 4)
    assert metrics.delta() == {"conflicts": 1, "applied": 3}


# -- (c) the forced last round ------------------------------------------------------------


class AlwaysConflictingStore(RecordingStore):
    """Every conditional write conflicts for every user (and writes nothing)."""

    async def put_features(
        self,
        states: Mapping[str, FeatureState],
        dirty_at_ms: int | None = None,
        expected_versions: Mapping[str, int] | None = None,
    ) -> list[str]:
        if expected_versions is not None:
            self.expected_seen.append(dict(expected_versions))
            self.log.append("conflict")
            return list(states)
        return await super().put_features(states, dirty_at_ms, expected_versions)


async def test_the_last_round_writes_unconditionally_and_correctly() -> None:
    assert MAX_CAS_ROUNDS == 3
    store = AlwaysConflictingStore()
    updater = FeatureUpdater(store, L, clock=clock)
    batch = log_of(
        [
            event("u1", BASE_TS, EventType.CLICK, 1),
            event("u2", BASE_TS + HOUR, EventType.LIKE, 2),
            event("u1", BASE_TS + HOUR, EventType.VIEW, 3),
        ]
    )
    metrics = Metrics()
    result = await updater.apply(batch)
    assert result == BatchResult(applied=3, duplicates=0, users=2)
    assert updater.applied_total == 3
    assert store.expected_seen == [{"u1": 0, "u2": 0}, {"u1": 0, "u2": 0}, None]
    assert store.log == ["conflict", "conflict", "write ['u1', 'u2']"]
    u1, u2 = await store.get_features(["u1", "u2"])
    assert u1 is not None and u2 is not None
    assert (u1.version, u1.num_events, u1.offset, u2.version, u2.offset) == (1, 2, 2, 1, 1)
    np.testing.assert_array_equal(
        u1.counters,
        expected_counters([(BASE_TS, EventType.CLICK), (BASE_TS + HOUR, EventType.VIEW)]),
    )
    assert sorted(await store.pop_dirty(10)) == [("u1", CLOCK_MS), ("u2", CLOCK_MS)]
    assert metrics.delta() == {"conflicts": 4, "applied": 3}


# -- (d) without the compare-and-set a concurrent writer's update is lost --------------


class _Plain:
    """``store`` without RacingStore's hook (the racer must not race itself)."""

    def __init__(self, store: MemoryStore) -> None:
        self._store = store

    async def get_features(self, user_ids: Sequence[str]) -> list[FeatureState | None]:
        return await self._store.get_features(user_ids)

    async def put_features(
        self,
        states: Mapping[str, FeatureState],
        dirty_at_ms: int | None = None,
        expected_versions: Mapping[str, int] | None = None,
    ) -> list[str]:
        return await MemoryStore.put_features(self._store, states, dirty_at_ms, expected_versions)


class RacingStore(MemoryStore):
    """Runs ``racer`` (another updater's whole batch) between the first read and the
    first write of this store's own updater: the classic lost-update interleaving."""

    def __init__(self) -> None:
        super().__init__()
        self.racer: tuple[FeatureUpdater, list[SourcedEvent]] | None = None

    async def put_features(
        self,
        states: Mapping[str, FeatureState],
        dirty_at_ms: int | None = None,
        expected_versions: Mapping[str, int] | None = None,
    ) -> list[str]:
        if self.racer is not None:
            other, batch = self.racer
            self.racer = None
            assert await other.apply(batch) == BatchResult(applied=1, duplicates=0, users=1)
        return await super().put_features(states, dirty_at_ms, expected_versions)


async def test_a_concurrent_writers_update_survives_thanks_to_the_compare_and_set() -> None:
    store = RacingStore()
    partition_0 = FeatureUpdater(store, L, clock=clock)
    partition_1 = FeatureUpdater(_Plain(store), L, clock=clock)  # the same data, no hook
    store.racer = (partition_1, [sourced(event("u1", BASE_TS + 5, item_id="theirs"), 0, 1)])
    metrics = Metrics()
    result = await partition_0.apply(log_of([event("u1", BASE_TS + 1, item_id="ours")]))
    assert result == BatchResult(applied=1, duplicates=0, users=1)
    (state,) = await store.get_features(["u1"])
    assert state is not None
    assert state.item_hashes.tolist() == [hash_id("ours"), hash_id("theirs")]
    assert state.version == 2
    assert metrics.delta() == {"conflicts": 1, "applied": 2}


# -- (a) the loop: commit only after a successful write ----------------------------------


async def test_each_batch_is_committed_only_after_its_write() -> None:
    log: list[str] = []
    stop = asyncio.Event()
    store = RecordingStore(log)
    batches = [
        log_of([event("u1", BASE_TS), event("u2", BASE_TS)]),
        log_of([event("u1", BASE_TS + 1)], first_offset=2),
    ]
    source = RecordingSource(batches, stop, log)
    metrics = Metrics()
    await asyncio.wait_for(run_ingest(source, FeatureUpdater(store, L, clock=clock), stop), 10)
    assert log == [
        "next 2",
        "write ['u1', 'u2']",
        "commit",
        "next 1",
        "write ['u1']",
        "commit",
        "next []",
        "commit",
    ]
    assert metrics.delta() == {
        "applied": 3,
        "batches": 2,
        "batched_events": 3,
        "timed_batches": 2,
    }


async def test_nothing_is_committed_while_the_store_is_unavailable(
    no_real_sleep: list[float],
) -> None:
    log: list[str] = []
    stop = asyncio.Event()
    store = RecordingStore(log)
    store.failures_left = 5
    source = RecordingSource([log_of([event("u1")])], stop, log)
    metrics = Metrics()
    await asyncio.wait_for(
        run_ingest(source, FeatureUpdater(store, L, clock=clock), stop, max_backoff_s=0.3), 10
    )
    assert log == ["next 1", *["write failed"] * 5, "write ['u1']", "commit", "next []", "commit"]
    assert no_real_sleep == [0.05, 0.1, 0.2, 0.3, 0.3]  # doubling, capped at max_backoff_s
    assert metrics.delta() == {
        "store_retries": 5,
        "applied": 1,
        "batches": 1,
        "batched_events": 1,
        "timed_batches": 1,
    }


async def test_a_failed_commit_is_retried_before_the_next_batch() -> None:
    log: list[str] = []
    stop = asyncio.Event()
    source = RecordingSource([log_of([event("u1")])], stop, log)
    source.commit_failures_left = 2
    metrics = Metrics()
    await asyncio.wait_for(
        run_ingest(source, FeatureUpdater(RecordingStore(log), L, clock=clock), stop), 10
    )
    assert log == [
        "next 1",
        "write ['u1']",
        "commit failed",
        "commit failed",
        "commit",
        "next []",
        "commit",
    ]
    assert metrics.delta()["commit_retries"] == 2


async def test_stop_during_an_outage_leaves_the_batch_uncommitted_for_redelivery() -> None:
    log: list[str] = []
    stop = asyncio.Event()
    store = RecordingStore(log)
    store.failures_left = 10**9
    batch = log_of([event("u1", BASE_TS), event("u1", BASE_TS + 1)])
    source = RecordingSource([batch], asyncio.Event(), log)  # never stops by itself

    async def stop_after_three_failures() -> None:
        while log.count("write failed") < 3:
            await asyncio.sleep(0)
        stop.set()

    metrics = Metrics()
    stopper = asyncio.create_task(stop_after_three_failures())
    await asyncio.wait_for(run_ingest(source, FeatureUpdater(store, L, clock=clock), stop), 10)
    await stopper
    assert source.commits == 0
    assert "commit" not in log
    assert await store.get_features(["u1"]) == [None]
    assert metrics.delta()["store_retries"] == 3
    assert "applied" not in metrics.delta() and "timed_batches" not in metrics.delta()

    # whoever consumes next gets the batch again and applies it exactly once
    store.failures_left = 0
    again = asyncio.Event()
    redelivery = RecordingSource([batch, batch], again, log)
    updater = FeatureUpdater(store, L, clock=clock)
    await asyncio.wait_for(run_ingest(redelivery, updater, again), 10)
    (state,) = await store.get_features(["u1"])
    assert state is not None and (state.num_events, state.version) == (2, 1)
    assert redelivery.commits == 3
    assert updater.applied_total == 2


async def test_stop_while_a_commit_fails_returns_without_committing() -> None:
    log: list[str] = []
    stop = asyncio.Event()
    source = RecordingSource([log_of([event("u1")])], asyncio.Event(), log)
    source.commit_failures_left = 10**9

    async def stop_after_a_failed_commit() -> None:
        while "commit failed" not in log:
            await asyncio.sleep(0)
        stop.set()

    stopper = asyncio.create_task(stop_after_a_failed_commit())
    updater = FeatureUpdater(RecordingStore(log), L, clock=clock)
    await asyncio.wait_for(run_ingest(source, updater, stop), 10)
    await stopper
    assert source.commits == 0
    assert log[:2] == ["next 1", "write ['u1']"]
    assert "next []" not in log  # no further batch was consumed


async def test_a_set_stop_ends_the_loop_before_any_batch() -> None:
    log: list[str] = []
    stop = asyncio.Event()
    stop.set()
    source = RecordingSource([log_of([event("u1")])], stop, log)
    await run_ingest(source, FeatureUpdater(RecordingStore(log), L, clock=clock), stop)
    assert log == []


# -- retry_until_done ---------------------------------------------------------------------


async def test_retry_until_done_backs_off_and_reports_success(no_real_sleep: list[float]) -> None:
    attempts: list[int] = []

    async def flaky() -> None:
        attempts.append(1)
        if len(attempts) <= 6:
            raise (StoreUnavailable if len(attempts) % 2 else SourceUnavailable)("down")

    metrics = Metrics()
    assert await retry_until_done(flaky, asyncio.Event(), "store", max_backoff_s=1.0) is True
    assert len(attempts) == 7
    assert no_real_sleep == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
    assert metrics.delta() == {"store_retries": 6}


async def test_retry_until_done_gives_up_when_stopped_and_lets_other_errors_through() -> None:
    stop = asyncio.Event()
    calls: list[int] = []

    async def down() -> None:
        calls.append(1)
        stop.set()
        raise SourceUnavailable("down")

    assert await retry_until_done(down, stop, "commit", max_backoff_s=1.0) is False
    assert calls == [1]

    async def broken() -> None:
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError, match="a bug"):
        await retry_until_done(broken, asyncio.Event(), "store", max_backoff_s=1.0)


# -- the in-process source ------------------------------------------------------------------


async def test_the_in_process_source_numbers_events_and_batches_what_is_queued() -> None:
    source = InProcessEventSource()
    await source.send([event("u1"), event("u2"), event("u3")])
    assert source.pending == 3
    first = await source.next_batch(2, 0.1)
    assert [(s.partition, s.offset, s.event.user_id) for s in first] == [(0, 0, "u1"), (0, 1, "u2")]
    rest = await source.next_batch(10, 0.1)
    assert [(s.offset, s.event.user_id) for s in rest] == [(2, "u3")]
    assert source.pending == 0
    assert await source.next_batch(10, 0.01) == []
    await source.send([event("u4")])
    assert [s.offset for s in await source.next_batch(10, 0.1)] == [3]
    await source.commit()
    await source.close()


# -- defaults and logs ----------------------------------------------------------------------


class ArgsSource(RecordingSource):
    """Records the arguments of next_batch."""

    def __init__(self, batches: list[list[SourcedEvent]], stop: asyncio.Event) -> None:
        super().__init__(batches, stop, [])
        self.args: list[tuple[int, float]] = []

    async def next_batch(self, max_events: int, timeout_s: float) -> list[SourcedEvent]:
        self.args.append((max_events, timeout_s))
        return await super().next_batch(max_events, timeout_s)


async def test_the_loop_defaults(no_real_sleep: list[float]) -> None:
    stop = asyncio.Event()
    store = RecordingStore()
    store.failures_left = 8
    source = ArgsSource([log_of([event("u1")])], stop)
    before = sample("userembed_ingest_batch_seconds_sum")
    await asyncio.wait_for(run_ingest(source, FeatureUpdater(store, L, clock=clock), stop), 10)
    assert source.args == [(2000, 0.05), (2000, 0.05)]
    assert no_real_sleep == [0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 5.0]  # capped at 5 s
    # a duration, measured around the batch (the sleeps are faked: well under a second)
    assert 0 < sample("userembed_ingest_batch_seconds_sum") - before < 1


async def test_retries_and_conflicts_are_logged_as_key_value_events(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="service.ingest.updater")
    attempts: list[int] = []

    async def once_down() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise StoreUnavailable("connection refused")

    assert await retry_until_done(once_down, asyncio.Event(), "store", max_backoff_s=1.0)
    store = AlwaysConflictingStore()
    await FeatureUpdater(store, L, clock=clock).apply(log_of([event("u1"), event("u2")]))
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "event=ingest_retry what=store retry_in_s=0.05 reason='connection refused'"),
        ("INFO", "event=feature_write_conflict users=2 round=1"),
        ("INFO", "event=feature_write_conflict users=2 round=2"),
    ]


async def test_a_store_answering_too_few_states_is_an_error_not_a_silent_skip() -> None:
    class ShortStore(RecordingStore):
        async def get_features(self, user_ids: Sequence[str]) -> list[FeatureState | None]:
            return (await super().get_features(user_ids))[:-1]

    store = ShortStore()
    with pytest.raises(ValueError, match="zip"):
        await FeatureUpdater(store, L, clock=clock).apply(log_of([event("u1"), event("u2")]))
    assert store.expected_seen == []


async def test_the_in_process_source_is_bounded() -> None:
    assert InProcessEventSource()._queue.maxsize == 1_000_000
    small = InProcessEventSource(max_pending=2)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(small.send([event("u1"), event("u2"), event("u3")]), 0.05)
    assert small.pending == 2
