"""An optional in-process cache of hot users' embedding records (ERCache-style).

A few users take a large share of reads (Zipf); keeping their records for a short
TTL saves the Redis round trip at the price of serving a record up to ``ttl_ms``
older than Redis has. Only found records are cached: a missing user is re-read, so
its first embedding is served as soon as the worker writes it. Staleness is still
computed at read time from the record's ``computed_at``. The reader keys records by
``(model, user_id)``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Sequence
from itertools import islice

from service.core.embeddings import StoredEmbedding
from service.metrics import API_CACHE_REQUESTS

_HIT = API_CACHE_REQUESTS.labels("hit")
_MISS = API_CACHE_REQUESTS.labels("miss")


class HotCache:
    """A TTL cache bounded to ``max_users`` entries (the oldest insertions go first)."""

    def __init__(
        self,
        ttl_ms: int,
        max_users: int,
        monotonic_ms: Callable[[], float] = lambda: time.monotonic() * 1000,
    ) -> None:
        if ttl_ms <= 0 or max_users < 1:
            raise ValueError(f"need ttl_ms > 0 and max_users >= 1, got {ttl_ms}, {max_users}")
        self._ttl_ms = ttl_ms
        self._max_users = max_users
        self._now = monotonic_ms
        self._entries: dict[Hashable, tuple[float, StoredEmbedding]] = {}
        self.hits = 0
        self.misses = 0

    def get_many(self, user_ids: Sequence[Hashable]) -> list[StoredEmbedding | None]:
        """Cached records (None where absent or expired), counted as hits and misses."""
        now = self._now()
        found: list[StoredEmbedding | None] = []
        for user_id in user_ids:
            entry = self._entries.get(user_id)
            if entry is not None and entry[0] > now:
                found.append(entry[1])
            else:
                found.append(None)
        hits = sum(r is not None for r in found)
        self.hits += hits
        self.misses += len(found) - hits
        _HIT.inc(hits)
        _MISS.inc(len(found) - hits)
        return found

    def put_many(self, records: Sequence[tuple[Hashable, StoredEmbedding]]) -> None:
        expires = self._now() + self._ttl_ms
        entries = self._entries
        for user_id, record in records:
            entries.pop(user_id, None)  # re-insert at the end: eviction order = age
            entries[user_id] = (expires, record)
        overflow = len(entries) - self._max_users
        if overflow > 0:
            for user_id in list(islice(entries, overflow)):
                del entries[user_id]

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def __len__(self) -> int:
        return len(self._entries)
