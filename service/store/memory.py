"""The embedded default store: in-process, with the same semantics as Redis."""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence

from service.core.clock import now_ms
from service.core.embeddings import EmbeddingRecord, StoredEmbedding, encode_embedding
from service.core.features import (
    VERSION_OFFSET,
    VERSION_SIZE,
    FeatureState,
    encode_features,
    encoded_version,
)
from service.core.model_names import DEFAULT_MODEL
from service.store.protocol import RECLAIM_PER_CALL, DirtyStats, ModelRecords
from service.store.records import embedding_or_none, features_or_none, stored_records


def _stored_version(record: bytes) -> bytes:
    """The version bytes of a stored record, as Redis GETRANGE would return them."""
    return record[VERSION_OFFSET : VERSION_OFFSET + VERSION_SIZE]


class MemoryStore:
    """In-process store with the same semantics as Redis (records kept as encoded bytes)."""

    def __init__(self) -> None:
        self._features: dict[str, bytes] = {}
        self._embeddings: dict[tuple[str, str], bytes] = {}  # (model, user) -> record
        self._dirty: dict[str, int] = {}
        # (dirty_at_ms, user_id): ties break by user id, as in a Redis sorted set.
        # Entries whose time no longer matches self._dirty are stale and skipped.
        self._heap: list[tuple[int, str]] = []
        self._leases: dict[str, tuple[str, int, int]] = {}  # user -> token, dirty_at, expiry
        self._active: dict[str, int] = {}
        self._jobs: dict[str, int] = {}

    async def get_features(self, user_ids: Sequence[str]) -> list[FeatureState | None]:
        return [features_or_none(self._features.get(u), u) for u in user_ids]

    async def put_features(
        self,
        states: Mapping[str, FeatureState],
        dirty_at_ms: int | None = None,
        expected_versions: Mapping[str, int] | None = None,
    ) -> list[str]:
        conflicts = []
        written = []
        for user_id, state in states.items():
            if expected_versions is not None:
                stored = self._features.get(user_id, b"")
                if _stored_version(stored) != encoded_version(expected_versions[user_id]):
                    conflicts.append(user_id)
                    continue
            self._features[user_id] = encode_features(state)
            written.append(user_id)
        if dirty_at_ms is not None:
            self._mark(dict.fromkeys(written, dirty_at_ms))
            for user_id in written:
                self._active[user_id] = max(self._active.get(user_id, 0), dirty_at_ms)
        return conflicts

    async def get_embeddings(
        self, user_ids: Sequence[str], model: str = DEFAULT_MODEL, *, columns: bool = False
    ) -> Sequence[StoredEmbedding | None]:
        raws = [self._embeddings.get((model, u)) for u in user_ids]
        return stored_records(raws, user_ids, columns=columns)

    async def get_model_embeddings(
        self, user_ids: Sequence[str], models: Sequence[str]
    ) -> list[list[StoredEmbedding | None]]:
        return [list(await self.get_embeddings(user_ids, model)) for model in models]

    async def put_embeddings(
        self, records: Mapping[str, EmbeddingRecord], model: str = DEFAULT_MODEL
    ) -> None:
        for user_id, record in records.items():
            self._embeddings[model, user_id] = encode_embedding(record)

    async def get_features_and_embeddings(
        self, user_ids: Sequence[str], models: Sequence[str] = (DEFAULT_MODEL,)
    ) -> tuple[list[FeatureState | None], list[list[EmbeddingRecord | None]]]:
        records = [
            [embedding_or_none(self._embeddings.get((model, u)), u) for u in user_ids]
            for model in models
        ]
        return await self.get_features(user_ids), records

    async def write_and_release(
        self, token: str, records: ModelRecords, claimed: Mapping[str, int]
    ) -> None:
        held = [u for u, at in claimed.items() if self._leases.get(u, ("",))[:2] == (token, at)]
        for model, by_user in records.items():
            await self.put_embeddings({u: by_user[u] for u in held if u in by_user}, model)
        await self.release_claim(token, held)

    async def mark_dirty(self, dirty_at_ms: Mapping[str, int]) -> None:
        self._mark(dirty_at_ms)

    def _mark(self, dirty_at_ms: Mapping[str, int]) -> None:
        for user_id, at in dirty_at_ms.items():
            current = self._dirty.get(user_id)
            if current is None or at < current:
                self._dirty[user_id] = at
                heapq.heappush(self._heap, (at, user_id))

    def _drop_stale_top(self) -> None:
        while self._heap and self._dirty.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)

    async def pop_dirty(self, limit: int) -> list[tuple[str, int]]:
        popped: list[tuple[str, int]] = []
        while len(popped) < limit:
            self._drop_stale_top()
            if not self._heap:
                break
            at, user_id = heapq.heappop(self._heap)
            del self._dirty[user_id]
            popped.append((user_id, at))
        return popped

    async def claim_dirty(
        self, limit: int, *, token: str, now_ms: int, lease_ms: int
    ) -> list[tuple[str, int]]:
        expired = [u for u, (_, _, expiry) in self._leases.items() if expiry <= now_ms]
        for user_id in expired[:RECLAIM_PER_CALL]:
            _, at, _ = self._leases.pop(user_id)
            self._mark({user_id: at})
        claimed = await self.pop_dirty(limit)
        for user_id, at in claimed:
            self._leases[user_id] = (token, at, now_ms + lease_ms)
        return claimed

    async def release_claim(
        self, token: str, user_ids: Sequence[str], requeue: Mapping[str, int] | None = None
    ) -> None:
        for user_id in user_ids:
            lease = self._leases.get(user_id)
            if lease is not None and lease[0] == token:
                del self._leases[user_id]
        if requeue:
            self._mark(requeue)

    async def active_users(self, cursor: int, count: int) -> tuple[list[str], int]:
        ranked = sorted(self._active.items(), key=lambda kv: (-kv[1], kv[0]))
        end = cursor + count
        return [user_id for user_id, _ in ranked[cursor:end]], (end if end < len(ranked) else 0)

    async def trim_active(self, keep: int) -> None:
        if len(self._active) > keep:
            self._active = dict(sorted(self._active.items(), key=lambda kv: -kv[1])[:keep])

    async def claim_job(self, name: str, ttl_ms: int) -> bool:
        now = now_ms()
        if self._jobs.get(name, 0) > now:
            return False
        self._jobs[name] = now + ttl_ms
        return True

    async def dirty_stats(self) -> DirtyStats:
        self._drop_stale_top()
        oldest = self._heap[0][0] if self._heap else None
        return DirtyStats(len(self._dirty), oldest, len(self._leases))

    async def open(self) -> None:
        return None

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
