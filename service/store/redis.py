"""The production store on Redis or Redis Cluster, one code path for both.

Every key carries its shard's hash tag (:mod:`service.store.keys`), so each Lua script
touches one shard and, on a cluster, one node. Bulk reads are one MGET (split by
slot and sent to every node at once on a cluster); bulk writes are one script call
per group of shards: all shards together on a single node, one shard per call on a
cluster, the calls issued concurrently. A batch that spans shards is atomic per
shard, not across them: every write is idempotent, so a caller that gets
:class:`StoreUnavailable` simply retries the whole batch.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections.abc import Awaitable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, TypeVar, cast

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MovedError, RedisClusterException, RedisError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.core.embeddings import EmbeddingRecord, StoredEmbedding, encode_embedding
from service.core.features import (
    VERSION_OFFSET,
    VERSION_SIZE,
    FeatureState,
    encode_features,
    encoded_version,
)
from service.core.model_names import DEFAULT_MODEL
from service.store.address import RedisAddress, connect
from service.store.keys import DEFAULT_SHARDS, KeyLayout, job_key
from service.store.protocol import (
    RECLAIM_PER_CALL,
    DirtyStats,
    ModelRecords,
    StoreMisconfigured,
    StoreUnavailable,
)
from service.store.records import (
    embedding_or_none,
    features_or_none,
    stored_or_none,
    stored_records,
)

T = TypeVar("T")
log = logging.getLogger(__name__)

CLAIM_WINDOW: Final = 64
"""Shards a claim looks at: all of them up to this many, else a rotating window."""
PEEK_TTL_S: Final = 0.05
"""How long a peek at the shards' heads is reused while it promises work."""


@dataclass(slots=True)
class _Heads:
    """What the last peek (and the claims since) know of the window's queues."""

    at: float
    queued: dict[int, tuple[int, int]] = field(default_factory=dict)  # shard: (oldest, size)
    expired: set[int] = field(default_factory=set)  # shards with an expired lease

    def stale(self, now: float) -> bool:
        return now - self.at > PEEK_TTL_S or not (self.queued or self.expired)


@contextmanager
def _unavailable_on_redis_errors(address: RedisAddress) -> Iterator[None]:
    try:
        yield
    except ResponseError as exc:
        # A plain client at a cluster node: MOVED for keys elsewhere, CROSSSLOT for a
        # bulk call spanning nodes. Retrying will not help; the URL must change.
        message = str(exc)
        wrong_topology = isinstance(exc, MovedError) or (
            message.startswith("CROSSSLOT") or "hash to the same slot" in message
        )
        if wrong_topology and not address.cluster:
            raise StoreMisconfigured(address.is_cluster_sentence()) from exc
        raise StoreUnavailable(f"redis error: {exc}") from exc
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise StoreUnavailable(f"redis unavailable: {exc}") from exc
    except (RedisError, RedisClusterException) as exc:
        # RedisClusterException (slots not covered, cluster down) is not a RedisError
        raise StoreUnavailable(f"redis error: {exc}") from exc


# KEYS: for each of the n shards of this call its dirty queue and its activity index,
# then the feature key of every user. ARGV[1] = dirty time ('' = do not mark),
# ARGV[2] = n, ARGV[3] = '1' to compare versions; then per user: its shard's position
# (1..n), expected version bytes ('' = no record), the new record, the user id.
# Returns the users not written (their stored version differed).
_PUT_FEATURES_LUA: Final = f"""
local n = tonumber(ARGV[2])
local check = ARGV[3] == '1'
local conflicts = {{}}
local first, last = {VERSION_OFFSET}, {VERSION_OFFSET + VERSION_SIZE - 1}
for i = 2 * n + 1, #KEYS do
  local base = 4 + (i - 2 * n - 1) * 4
  if (not check) or redis.call('GETRANGE', KEYS[i], first, last) == ARGV[base + 1] then
    redis.call('SET', KEYS[i], ARGV[base + 2])
    if ARGV[1] ~= '' then
      local q = tonumber(ARGV[base])
      redis.call('ZADD', KEYS[2 * q - 1], 'LT', ARGV[1], ARGV[base + 3])
      redis.call('ZADD', KEYS[2 * q], 'GT', ARGV[1], ARGV[base + 3])
    end
  else
    conflicts[#conflicts + 1] = ARGV[base + 3]
  end
end
return conflicts
"""

# KEYS: per shard of this call its queue, leases (scored by expiry) and lease info
# (user -> 'token:dirty_at'). ARGV: now, lease expiry, token, then per shard a limit.
# Per shard, expired leases first go back to the queue with their original dirty
# time; then up to `limit` oldest users are popped and leased. Returns per shard:
# how many were popped, the queue's size and oldest time after (-1 = empty), then
# user, dirty_at of each popped user.
_CLAIM_LUA: Final = f"""
local out = {{}}
for s = 0, #KEYS / 3 - 1 do
  local queue, leased, info = KEYS[3 * s + 1], KEYS[3 * s + 2], KEYS[3 * s + 3]
  local expired = redis.call('ZRANGEBYSCORE', leased, '-inf', ARGV[1],
                             'LIMIT', 0, {RECLAIM_PER_CALL})
  for _, user in ipairs(expired) do
    local held = redis.call('HGET', info, user)
    local at = held and string.match(held, ':(%d+)$') or ARGV[1]
    redis.call('ZADD', queue, 'LT', at, user)
    redis.call('ZREM', leased, user)
    redis.call('HDEL', info, user)
  end
  local limit = tonumber(ARGV[4 + s])
  local popped = {{}}
  if limit > 0 then
    popped = redis.call('ZPOPMIN', queue, limit)
  end
  local head = redis.call('ZRANGE', queue, 0, 0, 'WITHSCORES')
  out[#out + 1] = #popped / 2
  out[#out + 1] = redis.call('ZCARD', queue)
  out[#out + 1] = head[2] or '-1'
  for i = 1, #popped, 2 do
    redis.call('ZADD', leased, ARGV[2], popped[i])
    redis.call('HSET', info, popped[i], ARGV[3] .. ':' .. popped[i + 1])
    out[#out + 1] = popped[i]
    out[#out + 1] = popped[i + 1]
  end
end
return out
"""

# KEYS: per shard of this call its queue, leases and lease info. ARGV[1] = token;
# then per shard: r, k, r users to release, k (user, dirty_at) pairs to requeue.
# A lease another token holds now is kept.
_RELEASE_LUA: Final = """
local prefix = ARGV[1] .. ':'
local pos = 2
for s = 0, #KEYS / 3 - 1 do
  local queue, leased, info = KEYS[3 * s + 1], KEYS[3 * s + 2], KEYS[3 * s + 3]
  local r, k = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1])
  pos = pos + 2
  for i = pos, pos + r - 1 do
    local held = redis.call('HGET', info, ARGV[i])
    if held and string.sub(held, 1, #prefix) == prefix then
      redis.call('ZREM', leased, ARGV[i])
      redis.call('HDEL', info, ARGV[i])
    end
  end
  pos = pos + r
  for i = pos, pos + 2 * k - 1, 2 do
    redis.call('ZADD', queue, 'LT', ARGV[i + 1], ARGV[i])
  end
  pos = pos + 2 * k
end
return 0
"""


# KEYS: per shard of this call its queue, leases and lease info (3n keys), then the
# embedding key of every record, in order. ARGV[1] = n; then per shard r, and per
# claimed user its id, its claim ('token:dirty_at') and m, the number of its records
# (one per model, m = 0 for none), followed by the m records. Records are written,
# and the lease ended, only while that very claim still holds the lease: a claim that
# expired (the user went back to the queue, maybe to another worker embedding newer
# features) or was superseded by a newer claim of the same worker (the user was
# dirtied again meanwhile) must not overwrite.
_WRITE_AND_RELEASE_LUA: Final = """
local n = tonumber(ARGV[1])
local pos, key = 2, 3 * n + 1
for s = 0, n - 1 do
  local leased, info = KEYS[3 * s + 2], KEYS[3 * s + 3]
  local r = tonumber(ARGV[pos])
  pos = pos + 1
  for _ = 1, r do
    local user, claim, m = ARGV[pos], ARGV[pos + 1], tonumber(ARGV[pos + 2])
    local ours = redis.call('HGET', info, user) == claim
    if ours then
      redis.call('ZREM', leased, user)
      redis.call('HDEL', info, user)
      for j = 1, m do
        redis.call('SET', KEYS[key + j - 1], ARGV[pos + 2 + j])
      end
    end
    key = key + m
    pos = pos + 3 + m
  end
end
return 0
"""


class RedisStore:
    """The Store on Redis or Redis Cluster (``redis+cluster://``); bounded timeouts."""

    def __init__(
        self,
        url: str,
        timeout_ms: int = 250,
        shards: int = DEFAULT_SHARDS,
        *,
        write_replicas: int = 0,
    ) -> None:
        """``write_replicas``: replicas that must acknowledge a feature write (Redis
        WAIT) before it counts as durable, at most as many as the primary has connected
        (none right after a failover); 0 trusts the primary alone."""
        self._address = RedisAddress.parse(url)
        self._write_replicas = write_replicas
        self._wait_ms = max(1, timeout_ms // 2)
        self._layout = KeyLayout(shards)
        self._client = connect(self._address, timeout_ms / 1000)
        self._cluster = self._client if isinstance(self._client, RedisCluster) else None
        self._put_script = self._client.register_script(_PUT_FEATURES_LUA)
        self._claim_script = self._client.register_script(_CLAIM_LUA)
        self._release_script = self._client.register_script(_RELEASE_LUA)
        self._write_release_script = self._client.register_script(_WRITE_AND_RELEASE_LUA)
        self._window_start = 0
        self._heads: _Heads | None = None
        self._warned_unreplicated_at = float("-inf")

    @property
    def layout(self) -> KeyLayout:
        return self._layout

    def _errors(self) -> Any:
        return _unavailable_on_redis_errors(self._address)

    # --- plumbing: slots, shard groups ------------------------------------

    async def _mget(self, keys: Sequence[str | bytes]) -> list[bytes | None]:
        with self._errors():
            if len(keys) == 1:
                return [cast(bytes | None, await self._client.get(keys[0]))]
            if self._cluster is not None:
                return cast(list[bytes | None], await self._cluster.mget_nonatomic(list(keys)))
            return cast(list[bytes | None], await self._client.mget(list(keys)))

    def _groups(self, shards: Sequence[int]) -> list[list[int]]:
        """Shards that one script call may take: all on a single node, one on a cluster."""
        ordered = sorted(set(shards))
        if self._cluster is not None:
            return [[s] for s in ordered]
        return [ordered] if ordered else []

    async def _all(self, calls: Sequence[Awaitable[T]]) -> list[T]:
        """Run ``calls`` concurrently; if any failed, raise (after all have finished)."""
        with self._errors():
            if len(calls) == 1:
                return [await calls[0]]
            results = await asyncio.gather(*calls, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result
            return cast(list[T], results)

    async def _pipeline(self, build: Any) -> list[Any]:
        """One non-transactional pipeline (per node on a cluster, sent concurrently)."""
        with self._errors():
            async with self._client.pipeline(transaction=False) as pipe:
                build(pipe)
                return await pipe.execute()

    # --- feature states -----------------------------------------------------

    async def get_features(self, user_ids: Sequence[str]) -> list[FeatureState | None]:
        if not user_ids:
            return []
        raws = await self._mget([self._layout.feature_key(u) for u in user_ids])
        keys = self._layout.feature_key
        return [features_or_none(raw, keys(u)) for raw, u in zip(raws, user_ids, strict=True)]

    async def put_features(
        self,
        states: Mapping[str, FeatureState],
        dirty_at_ms: int | None = None,
        expected_versions: Mapping[str, int] | None = None,
    ) -> list[str]:
        if not states:
            return []
        by_shard = self._layout.by_shard(states)
        dirty = "" if dirty_at_ms is None else str(dirty_at_ms)
        check = "0" if expected_versions is None else "1"
        calls = []
        for group in self._groups(list(by_shard)):
            keys: list[str] = []
            for shard in group:
                keys += [self._layout.dirty_key(shard), self._layout.active_key(shard)]
            args: list[bytes | str | int] = [dirty, len(group), check]
            for position, shard in enumerate(group, start=1):
                for user_id in by_shard[shard]:
                    keys.append(self._layout.feature_key(user_id))
                    expected = 0 if expected_versions is None else expected_versions[user_id]
                    args += [
                        position,
                        encoded_version(expected),
                        encode_features(states[user_id]),
                        user_id,
                    ]
            calls.append(self._put(keys, args))
        conflicts = await self._all(calls)
        return [bytes(c).decode() for found in conflicts for c in found]

    async def _put(self, keys: list[str], args: list[bytes | str | int]) -> list[bytes]:
        """One feature-write script call; with ``write_replicas``, sent in one pipeline
        with a WAIT on the same connection, so the write counts only once replicated
        (asynchronous replication would otherwise lose it if the primary dies)."""
        if not self._write_replicas:
            return cast(list[bytes], await self._put_script(keys=keys, args=args))
        wait: dict[str, Any] = {}
        if self._cluster is not None:
            await self._cluster.initialize()  # the slot map (a no-op once loaded)
            wait["target_nodes"] = [self._cluster.get_node_from_key(keys[0])]
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.execute_command("EVAL", _PUT_FEATURES_LUA, len(keys), *keys, *args)
            pipe.execute_command("WAIT", self._write_replicas, self._wait_ms, **wait)
            conflicts, acked = await pipe.execute()
        if int(acked) < self._write_replicas:
            await self._accept_fewer_replicas(int(acked), wait)
        return cast(list[bytes], conflicts)

    async def _accept_fewer_replicas(self, acked: int, node: dict[str, Any]) -> None:
        """A write that fewer than ``write_replicas`` acknowledged is durable enough if
        every replica the primary has now acknowledged it: right after a failover the
        promoted primary has none until its old primary comes back, and ingest must
        not stop for that. Otherwise the caller retries (StoreUnavailable)."""
        role = await self._client.execute_command("ROLE", **node)
        if isinstance(role, dict):  # a cluster answer keyed by node
            role = next(iter(role.values()))
        connected = len(role[2]) if role and role[0] in (b"master", "master") else 0
        if acked < min(self._write_replicas, connected):
            raise StoreUnavailable(
                f"a feature write reached {acked} of {connected} replicas within "
                f"{self._wait_ms} ms (USEREMBED_REDIS_WRITE_REPLICAS); retrying"
            )
        now = time.monotonic()
        if now - self._warned_unreplicated_at > 10:
            self._warned_unreplicated_at = now
            log.warning(
                "event=write_not_replicated acked=%d wanted=%d connected_replicas=%d "
                "(the primary has fewer replicas than USEREMBED_REDIS_WRITE_REPLICAS)",
                acked,
                self._write_replicas,
                connected,
            )

    # --- embedding records -------------------------------------------------

    async def get_embeddings(
        self, user_ids: Sequence[str], model: str = DEFAULT_MODEL, *, columns: bool = False
    ) -> Sequence[StoredEmbedding | None]:
        if not user_ids:
            return []
        keys = self._layout.embedding_keys(user_ids, model)
        return stored_records(await self._mget(keys), keys, columns=columns)

    async def get_model_embeddings(
        self, user_ids: Sequence[str], models: Sequence[str]
    ) -> list[list[StoredEmbedding | None]]:
        _, groups = await self._read(user_ids, models, with_features=False)
        return [[stored_or_none(raw, key) for raw, key in group] for group in groups]

    async def put_embeddings(
        self, records: Mapping[str, EmbeddingRecord], model: str = DEFAULT_MODEL
    ) -> None:
        if not records:
            return
        layout = self._layout
        mapping = {layout.embedding_key(u, model): encode_embedding(r) for u, r in records.items()}
        with self._errors():
            if self._cluster is not None:
                await self._cluster.mset_nonatomic(mapping)
            else:
                await self._client.mset(mapping)

    async def get_features_and_embeddings(
        self, user_ids: Sequence[str], models: Sequence[str] = (DEFAULT_MODEL,)
    ) -> tuple[list[FeatureState | None], list[list[EmbeddingRecord | None]]]:
        states, groups = await self._read(user_ids, models, with_features=True)
        return states, [[embedding_or_none(raw, key) for raw, key in group] for group in groups]

    async def _read(
        self, user_ids: Sequence[str], models: Sequence[str], *, with_features: bool
    ) -> tuple[list[FeatureState | None], list[list[tuple[bytes | None, bytes]]]]:
        """One MGET of the users' states (optionally) and of their records of ``models``:
        the states, and each model's (stored bytes, key) per user, ``[model][user]``."""
        if not user_ids:
            return [], [[] for _ in models]
        layout, n = self._layout, len(user_ids)
        feature_keys = [layout.feature_key(u) for u in user_ids] if with_features else []
        record_keys = [key for m in models for key in layout.embedding_keys(user_ids, m)]
        raws = await self._mget([*feature_keys, *record_keys])
        start = len(feature_keys)
        states = [features_or_none(r, k) for r, k in zip(raws[:start], feature_keys, strict=True)]
        records = list(zip(raws[start:], record_keys, strict=True))
        return states, [records[i * n : (i + 1) * n] for i in range(len(models))]

    async def write_and_release(
        self, token: str, records: ModelRecords, claimed: Mapping[str, int]
    ) -> None:
        released = self._layout.by_shard(claimed)
        calls = []
        for group in self._groups(list(released)):
            keys = [key for shard in group for key in self._layout.queue_keys(shard)]
            args: list[bytes | str | int] = [len(group)]
            for shard in group:
                args.append(len(released[shard]))
                for user_id in released[shard]:
                    mine = [
                        (m, by_user[user_id])
                        for m, by_user in records.items()
                        if user_id in by_user
                    ]
                    args += [user_id, f"{token}:{claimed[user_id]}", len(mine)]
                    for model, record in mine:
                        args.append(encode_embedding(record))
                        keys.append(self._layout.embedding_key(user_id, model))
            calls.append(self._write_release_script(keys=keys, args=args))
        await self._all(calls)

    # --- the dirty queue ---------------------------------------------------

    async def mark_dirty(self, dirty_at_ms: Mapping[str, int]) -> None:
        if not dirty_at_ms:
            return
        by_shard = self._layout.by_shard(dirty_at_ms)

        def build(pipe: Any) -> None:
            for shard, users in by_shard.items():
                # LT: add new members, and only ever lower a score (keep the oldest time).
                pipe.zadd(
                    self._layout.dirty_key(shard), {u: dirty_at_ms[u] for u in users}, lt=True
                )

        await self._pipeline(build)

    async def pop_dirty(self, limit: int) -> list[tuple[str, int]]:
        shards = range(self._layout.shards)
        heads = await self._pipeline(
            lambda pipe: [
                pipe.zrange(self._layout.dirty_key(s), 0, limit - 1, withscores=True)
                for s in shards
            ]
        )
        oldest = heapq.nsmallest(
            limit,
            (
                (int(score), member.decode(), s)
                for s, found in zip(shards, heads, strict=True)
                for member, score in found
            ),
        )
        take: dict[int, int] = {}
        for _, _, shard in oldest:
            take[shard] = take.get(shard, 0) + 1
        popped = await self._pipeline(
            lambda pipe: [pipe.zpopmin(self._layout.dirty_key(s), n) for s, n in take.items()]
        )
        found = [(m.decode(), int(score)) for part in popped for m, score in part]
        return sorted(found, key=lambda pair: (pair[1], pair[0]))

    def _window(self) -> list[int]:
        shards = self._layout.shards
        if shards <= CLAIM_WINDOW:
            return list(range(shards))
        start, self._window_start = self._window_start, (self._window_start + CLAIM_WINDOW) % shards
        return [(start + i) % shards for i in range(CLAIM_WINDOW)]

    async def claim_dirty(
        self, limit: int, *, token: str, now_ms: int, lease_ms: int
    ) -> list[tuple[str, int]]:
        """Oldest first within a shard; across shards, the shards with the oldest heads
        are served first, so the first user claimed is the oldest of the shards looked
        at (all of them up to :data:`CLAIM_WINDOW`, else a window rotating per peek).

        The heads come from one peek at the window, kept for :data:`PEEK_TTL_S` while it
        still promises work; each claim script returns its shard's new head, so a busy
        worker claims in one round trip and an idle one peeks every time."""
        heads = self._heads
        if heads is None or heads.stale(time.monotonic()):
            heads = self._heads = await self._peek(self._window(), now_ms)
        claimed, requeued = await self._claim_from(heads, limit, token, now_ms, lease_ms)
        if requeued and len(claimed) < limit:
            # expired leases went back to their queues: claim them now, as one step would
            more, _ = await self._claim_from(heads, limit - len(claimed), token, now_ms, lease_ms)
            claimed += more
        return sorted(claimed, key=lambda pair: pair[1])

    async def _peek(self, window: Sequence[int], now_ms: int) -> _Heads:
        """Size and oldest dirty time of each shard's queue, and which have expired leases."""
        layout = self._layout

        def peek(pipe: Any) -> None:
            for shard in window:
                pipe.zcard(layout.dirty_key(shard))
                pipe.zrange(layout.dirty_key(shard), 0, 0, withscores=True)
                pipe.zrange(layout.leased_key(shard), 0, 0, withscores=True)

        flat = await self._pipeline(peek)
        heads = _Heads(time.monotonic())
        for i, shard in enumerate(window):
            size, head, lease = flat[3 * i : 3 * i + 3]
            if size:
                heads.queued[shard] = (int(head[0][1]), int(size))
            if lease and int(lease[0][1]) <= now_ms:
                heads.expired.add(shard)
        return heads

    async def _claim_from(
        self, heads: _Heads, limit: int, token: str, now_ms: int, lease_ms: int
    ) -> tuple[list[tuple[str, int]], bool]:
        """One claim script per shard group, planned from ``heads`` (updated in place).
        Returns the users claimed and whether expired leases were requeued."""
        plan: dict[int, int] = dict.fromkeys(heads.expired, 0)
        remaining = limit
        for shard, (_, size) in sorted(heads.queued.items(), key=lambda kv: kv[1]):
            if remaining <= 0:
                break
            plan[shard] = min(size, remaining)
            remaining -= plan[shard]
        if not plan:
            return [], False
        requeued = bool(heads.expired)
        heads.expired.clear()
        calls = []
        groups = self._groups(list(plan))
        for group in groups:
            keys = [key for shard in group for key in self._layout.queue_keys(shard)]
            args: list[str | int] = [now_ms, now_ms + lease_ms, token, *(plan[s] for s in group)]
            calls.append(self._claim_script(keys=keys, args=args))
        claimed: list[tuple[str, int]] = []
        for group, found in zip(groups, await self._all(calls), strict=True):
            pos = 0
            for shard in group:
                popped, size, head = int(found[pos]), int(found[pos + 1]), int(found[pos + 2])
                pos += 3
                for i in range(pos, pos + 2 * popped, 2):
                    claimed.append((found[i].decode(), int(float(found[i + 1]))))
                pos += 2 * popped
                if size:
                    heads.queued[shard] = (head, size)
                else:
                    heads.queued.pop(shard, None)
        return claimed, requeued

    async def release_claim(
        self, token: str, user_ids: Sequence[str], requeue: Mapping[str, int] | None = None
    ) -> None:
        if not user_ids and not requeue:
            return
        releases = self._layout.by_shard(user_ids)
        requeues = self._layout.by_shard(requeue or {})
        calls = []
        for group in self._groups([*releases, *requeues]):
            keys = [key for shard in group for key in self._layout.queue_keys(shard)]
            args: list[str | int] = [token]
            for shard in group:
                release, back = releases.get(shard, []), requeues.get(shard, [])
                args += [len(release), len(back), *release]
                for user_id in back:
                    args += [user_id, (requeue or {})[user_id]]
            calls.append(self._release_script(keys=keys, args=args))
        await self._all(calls)

    async def dirty_stats(self) -> DirtyStats:
        shards = range(self._layout.shards)

        def build(pipe: Any) -> None:
            for shard in shards:
                pipe.zcard(self._layout.dirty_key(shard))
                pipe.zrange(self._layout.dirty_key(shard), 0, 0, withscores=True)
                pipe.zcard(self._layout.leased_key(shard))

        flat = await self._pipeline(build)
        depth = sum(int(d) for d in flat[0::3])
        heads = [int(h[0][1]) for h in flat[1::3] if h]
        leased = sum(int(n) for n in flat[2::3])
        return DirtyStats(depth, min(heads) if heads else None, leased)

    # --- activity index ----------------------------------------------------

    async def active_users(self, cursor: int, count: int) -> tuple[list[str], int]:
        """A page of ranks [cursor, cursor + count) of the shards' activity orders
        interleaved (rank r = position r // S of shard r % S), most recent first within
        the page: the most recent user of every shard comes in the first S ranks."""
        shards = self._layout.shards
        end = cursor + count
        ranges = []
        for shard in range(shards):
            first = max(0, -(-(cursor - shard) // shards))
            last = (end - 1 - shard) // shards
            if last >= first:
                ranges.append((shard, first, last))

        def build(pipe: Any) -> None:
            for shard, first, last in ranges:
                pipe.zrevrange(self._layout.active_key(shard), first, last, withscores=True)
            for shard in range(shards):
                pipe.zcard(self._layout.active_key(shard))

        flat = await self._pipeline(build)
        page = sorted(
            (-score, member.decode())
            for members in flat[: len(ranges)]
            for member, score in members
        )
        longest = max((int(n) for n in flat[len(ranges) :]), default=0)
        return [user for _, user in page], (end if end < longest * shards else 0)

    async def trim_active(self, keep: int) -> None:
        per_shard = -(-keep // self._layout.shards)
        await self._pipeline(
            lambda pipe: [
                pipe.zremrangebyrank(self._layout.active_key(s), 0, -(per_shard + 1))
                for s in range(self._layout.shards)
            ]
        )

    # --- the rest ----------------------------------------------------------

    async def claim_job(self, name: str, ttl_ms: int) -> bool:
        with self._errors():
            return bool(await self._client.set(job_key(name), 1, nx=True, px=ttl_ms))

    async def open(self) -> None:
        """Check the deployment before traffic: one sentence for a misconfiguration
        (:class:`StoreMisconfigured`); :class:`StoreUnavailable` if it does not answer."""
        with self._errors():
            if self._cluster is not None:
                try:
                    await self._cluster.initialize()
                except RedisClusterException as exc:
                    if "cluster mode is not enabled" in str(exc).lower():
                        raise StoreMisconfigured(self._address.not_cluster_sentence()) from exc
                    raise
                return
            info = await self._client.info("cluster")
            if int(info.get("cluster_enabled", 0)):
                raise StoreMisconfigured(self._address.is_cluster_sentence())

    async def ping(self) -> None:
        with self._errors():
            await self._client.ping()

    async def close(self) -> None:
        await self._client.aclose()
