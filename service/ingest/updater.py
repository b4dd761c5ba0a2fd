"""Events to feature states: the event-source seam, the bulk feature updater, and the
consume loop shared by Kafka ingest and the embedded demo.

Per batch: group by user, read the affected states in one bulk read, apply the
events (pure), then write states and dirty marks in one atomic compare-and-set.
Only after that write succeeded does the source commit the batch's offsets.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from service.core.clock import Clock, now_ms, sleep_unless_stopped
from service.core.events import Event, SourcedEvent
from service.core.features import FeatureState, apply_events
from service.metrics import (
    INGEST_BATCH_SECONDS,
    INGEST_BATCH_SIZE,
    INGEST_CONFLICTS,
    INGEST_EVENTS,
    INGEST_RETRIES,
)
from service.store.protocol import Store, StoreUnavailable

log = logging.getLogger(__name__)

# Compare-and-set rounds before a user's state is overwritten regardless: only an
# unreadable stored record (or a pathological write race) needs the last round.
MAX_CAS_ROUNDS = 3


class SourceUnavailable(RuntimeError):
    """The event source (e.g. Kafka) could not complete an operation; retry later."""


class EventSource(Protocol):
    """Where events come from (Kafka in production, in-process in the demo)."""

    async def next_batch(self, max_events: int, timeout_s: float) -> list[SourcedEvent]:
        """Up to ``max_events`` valid events in log order (invalid ones are the source's
        business, e.g. its dead-letter topic); empty when none came within the timeout."""

    async def commit(self) -> None:
        """Mark everything returned so far as processed: its effect is durable.
        Raises :class:`SourceUnavailable` when that is not possible right now."""

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class BatchResult:
    applied: int
    duplicates: int
    users: int


class FeatureUpdater:
    """Applies event batches to the store, exactly once in effect per (partition, offset)."""

    def __init__(self, store: Store, history_length: int, clock: Clock = now_ms) -> None:
        self._store = store
        self._history_length = history_length
        self._clock = clock
        self.applied_total = 0

    async def apply(self, batch: Sequence[SourcedEvent]) -> BatchResult:
        """Apply ``batch``; raises :class:`StoreUnavailable` with nothing half-written."""
        by_user: dict[str, list[SourcedEvent]] = defaultdict(list)
        for sourced in batch:
            by_user[sourced.event.user_id].append(sourced)
        pending, applied, users = list(by_user), 0, 0
        for round_ in range(1, MAX_CAS_ROUNDS + 1):
            states = await self._store.get_features(pending)
            changed: dict[str, FeatureState] = {}
            expected: dict[str, int] = {}
            counts: dict[str, int] = {}
            for user_id, state in zip(pending, states, strict=True):
                base = state or FeatureState.empty()
                updated, count = apply_events(base, by_user[user_id], self._history_length)
                if count:
                    changed[user_id] = updated
                    expected[user_id] = base.version
                    counts[user_id] = count
            last_round = round_ == MAX_CAS_ROUNDS
            conflicts = await self._store.put_features(
                changed,
                dirty_at_ms=self._clock(),
                expected_versions=None if last_round else expected,
            )
            lost = set(conflicts)
            applied += sum(c for u, c in counts.items() if u not in lost)
            users += len(changed) - len(lost)
            if not conflicts:
                break
            INGEST_CONFLICTS.inc(len(conflicts))
            log.info("event=feature_write_conflict users=%d round=%d", len(conflicts), round_)
            pending = conflicts
        duplicates = len(batch) - applied
        self.applied_total += applied
        INGEST_EVENTS.labels("applied").inc(applied)
        INGEST_EVENTS.labels("duplicate").inc(duplicates)
        return BatchResult(applied=applied, duplicates=duplicates, users=users)


class InProcessEventSource:
    """A single in-memory partition: events get consecutive offsets as they are published."""

    def __init__(self, max_pending: int = 1_000_000) -> None:
        self._queue: asyncio.Queue[SourcedEvent] = asyncio.Queue(max_pending)
        self._next_offset = 0

    async def send(self, events: Sequence[Event]) -> None:
        for event in events:
            await self._queue.put(SourcedEvent(event, partition=0, offset=self._next_offset))
            self._next_offset += 1

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def next_batch(self, max_events: int, timeout_s: float) -> list[SourcedEvent]:
        try:
            first = await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            return []
        batch = [first]
        while len(batch) < max_events and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        return batch

    async def commit(self) -> None:
        return None

    async def close(self) -> None:
        return None


async def retry_until_done(
    operation: Callable[[], Awaitable[object]],
    stop: asyncio.Event,
    what: str,
    max_backoff_s: float,
) -> bool:
    """Run ``operation`` until it succeeds, backing off on outages; False if stopped first."""
    backoff = 0.05
    while True:
        try:
            await operation()
            return True
        except (StoreUnavailable, SourceUnavailable) as exc:
            INGEST_RETRIES.labels(what).inc()
            log.warning(
                "event=ingest_retry what=%s retry_in_s=%.2f reason=%r", what, backoff, str(exc)
            )
        if await sleep_unless_stopped(stop, backoff):
            return False
        backoff = min(backoff * 2, max_backoff_s)


async def run_ingest(
    source: EventSource,
    updater: FeatureUpdater,
    stop: asyncio.Event,
    *,
    max_events: int = 2000,
    max_wait_s: float = 0.05,
    max_backoff_s: float = 5.0,
) -> None:
    """Consume until ``stop`` is set. A batch is committed only after it was applied; on
    stop during an outage the batch is left uncommitted, to be redelivered and skipped
    or applied by whoever consumes next."""
    while not stop.is_set():
        batch = await source.next_batch(max_events, max_wait_s)
        started = time.perf_counter()
        if batch:
            INGEST_BATCH_SIZE.observe(len(batch))
            apply = functools.partial(updater.apply, batch)
            if not await retry_until_done(apply, stop, "store", max_backoff_s):
                return
        if not await retry_until_done(source.commit, stop, "commit", max_backoff_s):
            return
        if batch:
            INGEST_BATCH_SECONDS.observe(time.perf_counter() - started)
