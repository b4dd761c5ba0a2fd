"""Events to feature states: the event-source seam and the bulk feature updater.

The updater is the same whatever the source: group a batch by user, read the
affected states in one bulk read, apply the events (pure), write states and dirty
marks in one atomic write. Only after that write may the source commit the batch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from service.clock import Clock, now_ms
from service.events import Event, SourcedEvent
from service.features import FeatureState, apply_events
from service.metrics import INGEST_BATCH_SECONDS, INGEST_EVENTS
from service.store import Store

log = logging.getLogger(__name__)


class EventSource(Protocol):
    """Where events come from (Kafka in production, in-process in the demo)."""

    async def next_batch(self, max_events: int, timeout_s: float) -> list[SourcedEvent]:
        """Up to ``max_events`` events in log order; empty when none came within the timeout."""

    async def commit(self) -> None:
        """Mark everything returned so far as processed (its effect is durable)."""


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
        by_user: dict[str, list[SourcedEvent]] = defaultdict(list)
        for sourced in batch:
            by_user[sourced.event.user_id].append(sourced)
        user_ids = list(by_user)
        states = await self._store.get_features(user_ids)
        changed: dict[str, FeatureState] = {}
        applied = 0
        for user_id, state in zip(user_ids, states, strict=True):
            updated, count = apply_events(
                state or FeatureState.empty(), by_user[user_id], self._history_length
            )
            if count:
                changed[user_id] = updated
                applied += count
        await self._store.put_features(changed, dirty_at_ms=self._clock())
        duplicates = len(batch) - applied
        self.applied_total += applied
        INGEST_EVENTS.labels("applied").inc(applied)
        INGEST_EVENTS.labels("duplicate").inc(duplicates)
        return BatchResult(applied=applied, duplicates=duplicates, users=len(changed))


class InProcessEventSource:
    """A single in-memory partition: events get consecutive offsets as they are published."""

    def __init__(self, max_pending: int = 1_000_000) -> None:
        self._queue: asyncio.Queue[SourcedEvent] = asyncio.Queue(max_pending)
        self._next_offset = 0

    async def publish(self, events: Sequence[Event]) -> None:
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


async def run_ingest(
    source: EventSource,
    updater: FeatureUpdater,
    stop: asyncio.Event,
    *,
    max_events: int = 2000,
    max_wait_s: float = 0.05,
) -> None:
    """Consume until ``stop`` is set; commit each batch only after it was applied."""
    while not stop.is_set():
        batch = await source.next_batch(max_events, max_wait_s)
        if not batch:
            continue
        started = time.perf_counter()
        await updater.apply(batch)
        await source.commit()
        INGEST_BATCH_SECONDS.observe(time.perf_counter() - started)
