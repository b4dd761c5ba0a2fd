"""SOAP's latency-free refresh: the read path asks for recomputation without waiting.

``request`` only records user ids in memory (no I/O on the read path); a background
task flushes them to the dirty queue in one bulk write every few milliseconds (one
ZADD per shard, in one pipeline), backing off while the store fails.
Requests for the same user are coalesced to at most one per ``coalesce_ms``, and
new requests are admitted at most ``max_rate`` per second (a token bucket holding one
second's worth), so a burst of cold users cannot flood the worker's queue. A request
turned away by the rate limit is not remembered: the user's next read asks again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from service.core.clock import Clock, now_ms, sleep_unless_stopped
from service.metrics import API_REFRESH_DROPPED, API_REFRESH_ENQUEUED
from service.store.protocol import Store

log = logging.getLogger(__name__)
_DROPPED_FULL = API_REFRESH_DROPPED.labels("full")
_DROPPED_RATE = API_REFRESH_DROPPED.labels("rate")


class RefreshRequester:
    """Coalescing, rate-limited, bounded buffer of refresh requests in front of the
    dirty queue."""

    def __init__(
        self,
        store: Store,
        coalesce_ms: int,
        *,
        max_rate: float = 1000.0,
        max_pending: int = 100_000,
        flush_interval_s: float = 0.005,
        max_backoff_s: float = 1.0,
        clock: Clock = now_ms,
    ) -> None:
        self._store = store
        self._coalesce_ms = coalesce_ms
        self._max_rate = max_rate
        self._max_pending = max_pending
        self._flush_interval_s = flush_interval_s
        self._max_backoff_s = max(flush_interval_s, max_backoff_s)
        self._clock = clock
        self._pending: dict[str, int] = {}
        self._last_requested: dict[str, int] = {}
        self._tokens = max(1.0, max_rate)
        self._refilled_at = clock()

    def request(self, user_ids: Iterable[str]) -> int:
        """Ask for a refresh of ``user_ids``; return how many were newly requested."""
        now = self._clock()
        self._refill(now)
        added = 0
        for user_id in user_ids:
            last = self._last_requested.get(user_id)
            if last is not None and now - last < self._coalesce_ms:
                continue
            if len(self._pending) >= self._max_pending:
                _DROPPED_FULL.inc()
                continue
            if self._tokens < 1.0:
                _DROPPED_RATE.inc()
                continue
            self._tokens -= 1.0
            self._pending.setdefault(user_id, now)
            self._last_requested[user_id] = now
            added += 1
        if len(self._last_requested) > 4 * self._max_pending:
            self._forget_before(now - self._coalesce_ms)
        return added

    def _refill(self, now: int) -> None:
        elapsed_s = max(0, now - self._refilled_at) / 1000
        self._tokens = min(max(1.0, self._max_rate), self._tokens + elapsed_s * self._max_rate)
        self._refilled_at = now

    def _forget_before(self, cutoff_ms: int) -> None:
        self._last_requested = {u: t for u, t in self._last_requested.items() if t >= cutoff_ms}

    async def flush(self) -> int:
        """Write pending requests to the dirty queue; keep them if the store is down."""
        if not self._pending:
            return 0
        pending, self._pending = self._pending, {}
        try:
            await self._store.mark_dirty(pending)
        except Exception:
            for user_id, at in pending.items():
                self._pending.setdefault(user_id, at)
            raise
        API_REFRESH_ENQUEUED.inc(len(pending))
        return len(pending)

    async def run(self, stop: asyncio.Event) -> None:
        """Flush every ``flush_interval_s``; while the store fails, back off exponentially
        up to ``max_backoff_s`` (pending requests are kept, and logged once per streak)."""
        delay, failures = self._flush_interval_s, 0
        while not stop.is_set():
            try:
                await self.flush()
            except Exception as exc:
                failures += 1
                if failures == 1:
                    log.warning(
                        "event=refresh_flush_failed pending=%d reason=%r (backing off)",
                        len(self._pending),
                        str(exc),
                    )
                delay = min(self._max_backoff_s, delay * 2)
            else:
                if failures:
                    log.info("event=refresh_flush_recovered failures=%d", failures)
                delay, failures = self._flush_interval_s, 0
            await sleep_unless_stopped(stop, delay)
        try:
            await self.flush()
        except Exception as exc:
            log.warning(
                "event=refresh_final_flush_failed dropped=%d reason=%r",
                len(self._pending),
                str(exc),
            )
