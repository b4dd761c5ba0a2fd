"""The Store seam: feature states, embedding records and the dirty queue.

Two implementations behave identically (one contract test suite runs on both):
:class:`RedisStore` for production and :class:`MemoryStore`, the embedded default.
Every operation is in bulk: one Redis round trip per call, never one per user.

Keys: ``uf:{uid}`` feature state, ``ue:{uid}`` embedding record; the dirty
queue, a sorted set of user ids scored by the time they became dirty; its leases
(``userembed:leased``, scored by expiry, with ``userembed:lease`` holding
``token:dirty_at`` per user); and the activity index ``userembed:active`` (last
time each user had events), from which a new model re-embeds the most active first.
"""

from __future__ import annotations

import heapq
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final, Protocol, cast

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from service.clock import now_ms
from service.embeddings import (
    EmbeddingDecodeError,
    EmbeddingRecord,
    decode_embedding,
    encode_embedding,
)
from service.features import (
    VERSION_OFFSET,
    VERSION_SIZE,
    FeatureDecodeError,
    FeatureState,
    decode_features,
    encode_features,
    encoded_version,
)

log = logging.getLogger(__name__)

DIRTY_KEY: Final = "userembed:dirty"
LEASED_KEY: Final = "userembed:leased"
LEASE_INFO_KEY: Final = "userembed:lease"
ACTIVE_KEY: Final = "userembed:active"
_RECLAIM_PER_CALL: Final = 1000


def feature_key(user_id: str) -> str:
    return f"uf:{user_id}"


def embedding_key(user_id: str) -> str:
    return f"ue:{user_id}"


class StoreUnavailable(RuntimeError):
    """The backing store did not answer in time or refused the connection."""


@dataclass(frozen=True, slots=True)
class DirtyStats:
    depth: int
    oldest_ms: int | None
    leased: int = 0


class Store(Protocol):
    """What every role needs from shared state; all calls are bulk."""

    async def get_features(self, user_ids: Sequence[str]) -> list[FeatureState | None]: ...

    async def put_features(
        self,
        states: Mapping[str, FeatureState],
        dirty_at_ms: int | None = None,
        expected_versions: Mapping[str, int] | None = None,
    ) -> list[str]:
        """Write states and, when ``dirty_at_ms`` is given, mark those users dirty, atomically.

        With ``expected_versions`` (0 = no record yet) this is a compare-and-set per
        user: a user whose stored version differs is neither written nor marked, and
        is returned as a conflict. Without it every state is written; returns [].
        """

    async def get_embeddings(self, user_ids: Sequence[str]) -> list[EmbeddingRecord | None]: ...

    async def put_embeddings(self, records: Mapping[str, EmbeddingRecord]) -> None: ...

    async def mark_dirty(self, dirty_at_ms: Mapping[str, int]) -> None:
        """Queue users for recomputation; a user already queued keeps its older time."""

    async def pop_dirty(self, limit: int) -> list[tuple[str, int]]:
        """Remove and return up to ``limit`` (user_id, dirty_at_ms), oldest first, with no
        lease (for tools and tests; workers use :meth:`claim_dirty`)."""

    async def claim_dirty(
        self, limit: int, *, token: str, now_ms: int, lease_ms: int
    ) -> list[tuple[str, int]]:
        """Lease up to ``limit`` (user_id, dirty_at_ms), oldest first, to ``token``.

        Leases that expired by ``now_ms`` first go back to the queue with their
        original dirty times, so users of a worker that died are not lost.
        """

    async def release_claim(
        self, token: str, user_ids: Sequence[str], requeue: Mapping[str, int] | None = None
    ) -> None:
        """End ``token``'s leases on ``user_ids`` (a lease re-taken by another token is
        left alone); ``requeue`` puts users back in the queue in the same step."""

    async def active_users(self, start: int, count: int) -> list[str]:
        """Users by most recent activity (events), most recent first."""

    async def trim_active(self, keep: int) -> None:
        """Forget all but the ``keep`` most recently active users."""

    async def claim_job(self, name: str, ttl_ms: int) -> bool:
        """True for exactly one caller per ``name`` until ``ttl_ms`` passes."""

    async def dirty_stats(self) -> DirtyStats: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


def _features_or_none(raw: bytes | None, user_id: str) -> FeatureState | None:
    """Decode a stored state; an unreadable one is logged and treated as absent,
    so the next update rewrites it instead of wedging the user forever."""
    if raw is None:
        return None
    try:
        return decode_features(raw)
    except FeatureDecodeError as exc:
        log.warning("event=unreadable_features key=%s reason=%r", feature_key(user_id), str(exc))
        return None


def _embedding_or_none(raw: bytes | None, user_id: str) -> EmbeddingRecord | None:
    if raw is None:
        return None
    try:
        return decode_embedding(raw)
    except EmbeddingDecodeError as exc:
        log.warning("event=unreadable_embedding key=%s reason=%r", embedding_key(user_id), str(exc))
        return None


class MemoryStore:
    """In-process store with the same semantics as Redis (records kept as encoded bytes)."""

    def __init__(self) -> None:
        self._features: dict[str, bytes] = {}
        self._embeddings: dict[str, bytes] = {}
        self._dirty: dict[str, int] = {}
        # (dirty_at_ms, user_id): ties break by user id, as in a Redis sorted set.
        # Entries whose time no longer matches self._dirty are stale and skipped.
        self._heap: list[tuple[int, str]] = []
        self._leases: dict[str, tuple[str, int, int]] = {}  # user -> token, dirty_at, expiry
        self._active: dict[str, int] = {}
        self._jobs: dict[str, int] = {}

    async def get_features(self, user_ids: Sequence[str]) -> list[FeatureState | None]:
        return [_features_or_none(self._features.get(u), u) for u in user_ids]

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

    async def get_embeddings(self, user_ids: Sequence[str]) -> list[EmbeddingRecord | None]:
        return [_embedding_or_none(self._embeddings.get(u), u) for u in user_ids]

    async def put_embeddings(self, records: Mapping[str, EmbeddingRecord]) -> None:
        for user_id, record in records.items():
            self._embeddings[user_id] = encode_embedding(record)

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
        for user_id in expired[:_RECLAIM_PER_CALL]:
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

    async def active_users(self, start: int, count: int) -> list[str]:
        ranked = sorted(self._active.items(), key=lambda kv: (-kv[1], kv[0]))
        return [user_id for user_id, _ in ranked[start : start + count]]

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

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None


@contextmanager
def _unavailable_on_redis_errors() -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise StoreUnavailable(f"redis unavailable: {exc}") from exc
    except RedisError as exc:
        raise StoreUnavailable(f"redis error: {exc}") from exc


# KEYS[1] = dirty queue, KEYS[2] = activity index, KEYS[2 + i] = feature key of user i.
# ARGV[1] = dirty time ('' = do not mark); then per user: expected version bytes
# ('' = no record), the new record, the user id. Returns the users not written.
_CAS_FEATURES_LUA: Final = f"""
local conflicts = {{}}
local first, last = {VERSION_OFFSET}, {VERSION_OFFSET + VERSION_SIZE - 1}
for i = 3, #KEYS do
  local base = 1 + (i - 3) * 3
  local stored = redis.call('GETRANGE', KEYS[i], first, last)
  if stored == ARGV[base + 1] then
    redis.call('SET', KEYS[i], ARGV[base + 2])
    if ARGV[1] ~= '' then
      redis.call('ZADD', KEYS[1], 'LT', ARGV[1], ARGV[base + 3])
      redis.call('ZADD', KEYS[2], 'GT', ARGV[1], ARGV[base + 3])
    end
  else
    conflicts[#conflicts + 1] = ARGV[base + 3]
  end
end
return conflicts
"""


# KEYS: queue, leases (scored by expiry), lease info (user -> 'token:dirty_at').
# ARGV: now, lease expiry, limit, token. Expired leases are requeued with their
# original dirty time first; then up to `limit` oldest users are popped and leased.
_CLAIM_LUA: Final = f"""
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1],
                           'LIMIT', 0, {_RECLAIM_PER_CALL})
for _, user in ipairs(expired) do
  local info = redis.call('HGET', KEYS[3], user)
  local at = info and string.match(info, ':(%d+)$') or ARGV[1]
  redis.call('ZADD', KEYS[1], 'LT', at, user)
  redis.call('ZREM', KEYS[2], user)
  redis.call('HDEL', KEYS[3], user)
end
local popped = redis.call('ZPOPMIN', KEYS[1], ARGV[3])
for i = 1, #popped, 2 do
  redis.call('ZADD', KEYS[2], ARGV[2], popped[i])
  redis.call('HSET', KEYS[3], popped[i], ARGV[4] .. ':' .. popped[i + 1])
end
return popped
"""

# KEYS: queue, leases, lease info. ARGV: token, n, then n users to release, then
# (user, dirty_at) pairs to requeue. A lease another token holds now is kept.
_RELEASE_LUA: Final = """
local prefix = ARGV[1] .. ':'
local n = tonumber(ARGV[2])
for i = 3, 2 + n do
  local info = redis.call('HGET', KEYS[3], ARGV[i])
  if info and string.sub(info, 1, #prefix) == prefix then
    redis.call('ZREM', KEYS[2], ARGV[i])
    redis.call('HDEL', KEYS[3], ARGV[i])
  end
end
for i = 3 + n, #ARGV, 2 do
  redis.call('ZADD', KEYS[1], 'LT', ARGV[i + 1], ARGV[i])
end
return n
"""


def _stored_version(record: bytes) -> bytes:
    """The version bytes of a stored record, as Redis GETRANGE would return them."""
    return record[VERSION_OFFSET : VERSION_OFFSET + VERSION_SIZE]


class RedisStore:
    """Redis implementation: MGET for reads, one pipeline per bulk write, bounded timeouts."""

    def __init__(self, url: str, timeout_ms: int = 250) -> None:
        timeout = timeout_ms / 1000
        self._redis = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(ExponentialBackoff(cap=timeout / 4, base=0.002), retries=1),
            decode_responses=False,
        )
        self._cas_script = self._redis.register_script(_CAS_FEATURES_LUA)
        self._claim_script = self._redis.register_script(_CLAIM_LUA)
        self._release_script = self._redis.register_script(_RELEASE_LUA)

    async def get_features(self, user_ids: Sequence[str]) -> list[FeatureState | None]:
        if not user_ids:
            return []
        with _unavailable_on_redis_errors():
            raws = cast(list[bytes | None], await self._redis.mget(map(feature_key, user_ids)))
        return [_features_or_none(raw, u) for raw, u in zip(raws, user_ids, strict=True)]

    async def put_features(
        self,
        states: Mapping[str, FeatureState],
        dirty_at_ms: int | None = None,
        expected_versions: Mapping[str, int] | None = None,
    ) -> list[str]:
        if not states:
            return []
        if expected_versions is not None:
            return await self._compare_and_set_features(states, dirty_at_ms, expected_versions)
        with _unavailable_on_redis_errors():
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.mset({feature_key(u): encode_features(s) for u, s in states.items()})
                if dirty_at_ms is not None:
                    pipe.zadd(DIRTY_KEY, dict.fromkeys(states, dirty_at_ms), lt=True)
                    pipe.zadd(ACTIVE_KEY, dict.fromkeys(states, dirty_at_ms), gt=True)
                await pipe.execute()
        return []

    async def _compare_and_set_features(
        self,
        states: Mapping[str, FeatureState],
        dirty_at_ms: int | None,
        expected_versions: Mapping[str, int],
    ) -> list[str]:
        user_ids = list(states)
        args: list[bytes | str] = ["" if dirty_at_ms is None else str(dirty_at_ms)]
        for user_id in user_ids:
            args += [
                encoded_version(expected_versions[user_id]),
                encode_features(states[user_id]),
                user_id,
            ]
        keys = [DIRTY_KEY, ACTIVE_KEY, *map(feature_key, user_ids)]
        with _unavailable_on_redis_errors():
            conflicts = await self._cas_script(keys=keys, args=args)
        return [bytes(c).decode() for c in conflicts]

    async def get_embeddings(self, user_ids: Sequence[str]) -> list[EmbeddingRecord | None]:
        if not user_ids:
            return []
        with _unavailable_on_redis_errors():
            raws = cast(list[bytes | None], await self._redis.mget(map(embedding_key, user_ids)))
        return [_embedding_or_none(raw, u) for raw, u in zip(raws, user_ids, strict=True)]

    async def put_embeddings(self, records: Mapping[str, EmbeddingRecord]) -> None:
        if not records:
            return
        with _unavailable_on_redis_errors():
            await self._redis.mset(
                {embedding_key(u): encode_embedding(r) for u, r in records.items()}
            )

    async def mark_dirty(self, dirty_at_ms: Mapping[str, int]) -> None:
        if not dirty_at_ms:
            return
        with _unavailable_on_redis_errors():
            # LT: add new members, and only ever lower an existing score (keep the oldest).
            await self._redis.zadd(DIRTY_KEY, dict(dirty_at_ms), lt=True)

    async def pop_dirty(self, limit: int) -> list[tuple[str, int]]:
        with _unavailable_on_redis_errors():
            popped = cast(list[tuple[bytes, float]], await self._redis.zpopmin(DIRTY_KEY, limit))
        return [(member.decode(), int(score)) for member, score in popped]

    async def claim_dirty(
        self, limit: int, *, token: str, now_ms: int, lease_ms: int
    ) -> list[tuple[str, int]]:
        keys = [DIRTY_KEY, LEASED_KEY, LEASE_INFO_KEY]
        args: list[str | int] = [now_ms, now_ms + lease_ms, limit, token]
        with _unavailable_on_redis_errors():
            flat = cast(list[bytes], await self._claim_script(keys=keys, args=args))
        return [(flat[i].decode(), int(float(flat[i + 1]))) for i in range(0, len(flat), 2)]

    async def release_claim(
        self, token: str, user_ids: Sequence[str], requeue: Mapping[str, int] | None = None
    ) -> None:
        if not user_ids and not requeue:
            return
        args: list[str | int] = [token, len(user_ids), *user_ids]
        for user_id, at in (requeue or {}).items():
            args += [user_id, at]
        with _unavailable_on_redis_errors():
            await self._release_script(keys=[DIRTY_KEY, LEASED_KEY, LEASE_INFO_KEY], args=args)

    async def active_users(self, start: int, count: int) -> list[str]:
        with _unavailable_on_redis_errors():
            found = cast(
                list[bytes], await self._redis.zrevrange(ACTIVE_KEY, start, start + count - 1)
            )
        return [u.decode() for u in found]

    async def trim_active(self, keep: int) -> None:
        with _unavailable_on_redis_errors():
            await self._redis.zremrangebyrank(ACTIVE_KEY, 0, -(keep + 1))

    async def claim_job(self, name: str, ttl_ms: int) -> bool:
        with _unavailable_on_redis_errors():
            return bool(await self._redis.set(f"userembed:job:{name}", 1, nx=True, px=ttl_ms))

    async def dirty_stats(self) -> DirtyStats:
        with _unavailable_on_redis_errors():
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zcard(DIRTY_KEY)
                pipe.zrange(DIRTY_KEY, 0, 0, withscores=True)
                pipe.zcard(LEASED_KEY)
                depth, oldest, leased = await pipe.execute()
        return DirtyStats(int(depth), int(oldest[0][1]) if oldest else None, int(leased))

    async def ping(self) -> None:
        with _unavailable_on_redis_errors():
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()


def open_store(redis_url: str, timeout_ms: int = 250) -> Store:
    """The store named by ``redis_url``: ``memory://`` is the embedded default."""
    if redis_url.startswith("memory://"):
        return MemoryStore()
    return RedisStore(redis_url, timeout_ms)
