"""The production store on Redis: MGET for reads, one pipeline or Lua script per bulk write."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Final, cast

import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from service.core.embeddings import EmbeddingRecord, encode_embedding
from service.core.features import (
    VERSION_OFFSET,
    VERSION_SIZE,
    FeatureState,
    encode_features,
    encoded_version,
)
from service.store.keys import (
    ACTIVE_KEY,
    DIRTY_KEY,
    LEASE_INFO_KEY,
    LEASED_KEY,
    embedding_key,
    feature_key,
)
from service.store.protocol import RECLAIM_PER_CALL, DirtyStats, StoreUnavailable
from service.store.records import embedding_or_none, features_or_none


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
                           'LIMIT', 0, {RECLAIM_PER_CALL})
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
        return [features_or_none(raw, u) for raw, u in zip(raws, user_ids, strict=True)]

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
        return [embedding_or_none(raw, u) for raw, u in zip(raws, user_ids, strict=True)]

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
