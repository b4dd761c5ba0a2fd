"""``userembed migrate-keys``: key layout v1 -> v2 on a single Redis node.

v1 (a single Redis only) kept ``uf:<uid>``, ``ue:<uid>`` and one ``userembed:dirty``,
``userembed:leased`` + ``userembed:lease`` and ``userembed:active``; v2 puts a shard
hash tag on every key (:mod:`service.store.keys`). ``userembed:job:<name>`` is the
same in both and is left alone.

Run it while nothing else writes: stop ingest, worker and serve first (docs/migrate-keys.md).
Every step is idempotent and each batch is atomic, so an interrupted run is resumed
by running it again:

1. SCAN ``u[ef]:*`` (COUNT ``batch``); the untagged keys of a batch are renamed in one
   script: RENAMENX to the v2 name, which keeps the value and any TTL. If the v2 key
   exists already, the v2 value wins and the v1 key is deleted (counted as skipped):
   our own renames never leave both, so a v2 key next to a v1 key was written by a
   v2 role after the migration began, the newer write, the one the roles continue from.
2. The dirty queue moves to the per-shard queues with ZADD LT (the oldest time wins),
   the activity index to the per-shard indexes with ZADD GT (the latest wins).
3. Leases in flight (no worker runs, so none will be released) go back to their
   shard's dirty queue with their original dirty time (``token:dirty_at``), so no
   dirty user is lost.

Sorted sets and the lease hash move in chunks of ``batch``: one MULTI/EXEC writes a
chunk to v2 and removes it from v1, so a rerun starts where the last one stopped; a
v1 key disappears with its last member.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.core.events import user_id_problem
from service.store.address import RedisAddress, redact
from service.store.keys import KeyLayout
from service.store.protocol import StoreUnavailable

V1_DIRTY: Final = "userembed:dirty"
V1_LEASED: Final = "userembed:leased"
V1_LEASE_INFO: Final = "userembed:lease"
V1_ACTIVE: Final = "userembed:active"
V1_USER_PREFIXES: Final = {"uf:": "features", "ue:": "embeddings"}
SKIPPED_SHOWN: Final = 10
"""Skipped keys the report names (all are counted)."""

Phase = Literal["keys", "dirty", "active", "leases"]

# KEYS: (v1, v2) pairs. A v1 key gone already (SCAN may return a key twice) is
# passed over; one whose v2 key exists is deleted, the v2 value kept. Returns
# {renamed per pair (1/0), skipped v1 keys}.
_MOVE_LUA: Final = """
local renamed, skipped = {}, {}
for i = 1, #KEYS, 2 do
  renamed[#renamed + 1] = 0
  if redis.call('EXISTS', KEYS[i]) == 1 then
    if redis.call('RENAMENX', KEYS[i], KEYS[i + 1]) == 1 then
      renamed[#renamed] = 1
    else
      redis.call('DEL', KEYS[i])
      skipped[#skipped + 1] = KEYS[i]
    end
  end
end
return {renamed, skipped}
"""


class MigrationRefused(ValueError):
    """The URL or the data is not one this migration can take; the message says why."""


@dataclass(frozen=True, slots=True)
class MigrationProgress:
    """After each batch: ``done`` of about ``total`` items of ``phase`` (keys: the
    matching keys seen of DBSIZE at the start, an estimate; sorted sets: members)."""

    phase: Phase
    done: int
    total: int


@dataclass(slots=True)
class MigrationReport:
    features: int = 0
    embeddings: int = 0
    dirty: int = 0
    active: int = 0
    leases_requeued: int = 0
    skipped: int = 0
    """v1 keys dropped because their v2 key existed (the v2 value won)."""
    skipped_keys: list[str] = field(default_factory=list)
    """The first :data:`SKIPPED_SHOWN` of them."""
    ignored: int = 0
    """``uf:``/``ue:`` keys whose rest is no user id: left where they are."""
    elapsed_s: float = 0.0

    @property
    def moved(self) -> int:
        return self.features + self.embeddings + self.dirty + self.active + self.leases_requeued

    def summary(self) -> str:
        line = (
            f"migrated to key layout v2 in {self.elapsed_s:.1f} s: {self.features} feature "
            f"states, {self.embeddings} embeddings, {self.dirty} dirty, {self.active} active, "
            f"{self.leases_requeued} leases requeued; {self.skipped} skipped (v2 key existed)"
        )
        if self.skipped_keys:
            line += f" e.g. {', '.join(self.skipped_keys)}"
        if self.ignored:
            line += f"; {self.ignored} uf:/ue: keys left (not a user id)"
        return line


def _refusal(address: RedisAddress | None, url: str) -> str | None:
    if url.startswith("memory://"):
        return "memory:// keeps nothing between runs: there is nothing to migrate"
    if address is not None and address.cluster:
        return (
            f"{address.shown} is a Redis Cluster: key layout v1 never ran on a cluster, so "
            "there is nothing to migrate there; migrate-keys takes the redis:// URL of the "
            "single Redis node that held the v1 layout"
        )
    return None


class _Migration:
    def __init__(
        self,
        client: aioredis.Redis,
        layout: KeyLayout,
        batch: int,
        progress: Callable[[MigrationProgress], None] | None,
    ) -> None:
        self._client = client
        self._layout = layout
        self._batch = batch
        self._progress = progress
        self._move = client.register_script(_MOVE_LUA)
        self.report = MigrationReport()

    def _tell(self, phase: Phase, done: int, total: int) -> None:
        if self._progress is not None:
            self._progress(MigrationProgress(phase, min(done, total), total))

    async def run(self) -> MigrationReport:
        started = time.perf_counter()
        info = await self._client.info("cluster")
        if int(info.get("cluster_enabled", 0)):
            raise MigrationRefused(
                "this Redis is a node of a Redis Cluster: key layout v1 never ran on a "
                "cluster, so there is nothing to migrate there"
            )
        await self._user_keys()
        layout = self._layout
        self.report.dirty = await self._sorted_set("dirty", V1_DIRTY, layout.dirty_key, lt=True)
        self.report.active = await self._sorted_set(
            "active", V1_ACTIVE, layout.active_key, lt=False
        )
        self.report.leases_requeued = await self._leases()
        self.report.elapsed_s = time.perf_counter() - started
        return self.report

    # --- uf:<uid>, ue:<uid> -------------------------------------------------

    def _v2_name(self, key: str) -> tuple[str, str] | None:
        """(kind, v2 key) of a v1 user key; None for a v2 key or no user's key.
        Raises MigrationRefused for a v2 key of another shard count."""
        prefix, rest = key[:3], key[3:]
        if rest.startswith("{"):
            tag, _, user_id = rest[1:].partition("}:")
            if tag.isdigit() and user_id and int(tag) != self._layout.shard(user_id):
                raise MigrationRefused(
                    f"{key!r} is a v2 key of another shard count (shard {tag}, but "
                    f"{self._layout.shards} shards put this user in "
                    f"{self._layout.shard(user_id)}): set USEREMBED_REDIS_SHARDS to the "
                    "count the earlier run used"
                )
            return None
        if user_id_problem(rest) is not None:
            self.report.ignored += 1
            return None
        if prefix == "uf:":
            return "features", self._layout.feature_key(rest)
        return "embeddings", self._layout.embedding_key(rest)

    async def _user_keys(self) -> None:
        total = int(await self._client.dbsize())
        seen = 0
        cursor = 0
        while True:
            cursor, found = await self._client.scan(cursor, match="u[ef]:*", count=self._batch)
            pairs: list[tuple[str, str, str]] = []
            for raw in cast(list[bytes], found):
                try:
                    key = raw.decode()
                except UnicodeDecodeError:
                    self.report.ignored += 1
                    continue
                target = self._v2_name(key)
                if target is not None:
                    pairs.append((target[0], key, target[1]))
            if pairs:
                renamed, skipped = cast(
                    list[Any],
                    await self._move(keys=[k for _, v1, v2 in pairs for k in (v1, v2)]),
                )
                for (kind, _, _), done in zip(pairs, renamed, strict=True):
                    if done and kind == "features":
                        self.report.features += 1
                    elif done:
                        self.report.embeddings += 1
                self.report.skipped += len(skipped)
                room = SKIPPED_SHOWN - len(self.report.skipped_keys)
                self.report.skipped_keys += [bytes(k).decode() for k in skipped[:room]]
            seen += len(found)
            if cursor == 0:
                self._tell("keys", total, total)
                return
            self._tell("keys", seen, total)

    # --- sorted sets -------------------------------------------------------

    def _by_shard(self, members: Sequence[tuple[bytes, float]]) -> dict[int, dict[bytes, float]]:
        groups: dict[int, dict[bytes, float]] = defaultdict(dict)
        for member, score in members:
            groups[self._layout.shard(member.decode())][member] = score
        return groups

    async def _sorted_set(
        self, phase: Phase, source: str, target: Callable[[int], str], *, lt: bool
    ) -> int:
        """Move ``source`` into the per-shard ``target`` keys, a chunk per transaction:
        ZADD LT (``lt``) or GT, then ZREM from ``source``. Returns the members moved."""
        total = int(await self._client.zcard(source))
        moved = 0
        while True:
            chunk = cast(
                list[tuple[bytes, float]],
                await self._client.zrange(source, 0, self._batch - 1, withscores=True),
            )
            if not chunk:
                return moved
            async with self._client.pipeline(transaction=True) as pipe:
                for shard, members in self._by_shard(chunk).items():
                    pipe.zadd(target(shard), members, lt=lt, gt=not lt)
                pipe.zrem(source, *(member for member, _ in chunk))
                await pipe.execute()
            moved += len(chunk)
            self._tell(phase, moved, max(total, moved))

    # --- leases in flight --------------------------------------------------

    async def _requeue(self, entries: Sequence[tuple[bytes, bytes | None]]) -> None:
        """Back to the dirty queue at their lease's dirty time (now if it has none, as
        v1's reclaim did), the lease and its info removed, in one transaction."""
        now = time.time_ns() // 1_000_000
        queued: list[tuple[bytes, float]] = []
        for member, held in entries:
            at = (held or b"").rpartition(b":")[2]
            queued.append((member, float(int(at)) if at.isdigit() else float(now)))
        members = [member for member, _ in entries]
        async with self._client.pipeline(transaction=True) as pipe:
            for shard, dirty in self._by_shard(queued).items():
                pipe.zadd(self._layout.dirty_key(shard), dirty, lt=True)
            pipe.zrem(V1_LEASED, *members)
            pipe.hdel(V1_LEASE_INFO, *members)
            await pipe.execute()

    async def _leases(self) -> int:
        client = self._client
        # v1 wrote a lease's info with it: the info hash adds only orphans to the count
        total = max(int(await client.zcard(V1_LEASED)), int(await client.hlen(V1_LEASE_INFO)))
        requeued = 0
        while True:
            members = cast(list[bytes], await client.zrange(V1_LEASED, 0, self._batch - 1))
            if not members:
                break
            held = cast(list[bytes | None], await client.hmget(V1_LEASE_INFO, members))
            await self._requeue(list(zip(members, held, strict=True)))
            requeued += len(members)
            self._tell("leases", requeued, max(total, requeued))
        # Lease info without its lease (v1 wrote both in one script, so none is
        # expected): requeued as well, nothing dirty is dropped.
        cursor = 0
        while True:
            cursor, found = await client.hscan(V1_LEASE_INFO, cursor, count=self._batch)
            entries = cast(dict[bytes, bytes], found)
            if entries:
                await self._requeue(list(entries.items()))
                requeued += len(entries)
                self._tell("leases", requeued, max(total, requeued))
            if cursor == 0:
                return requeued


async def migrate_keys(
    url: str,
    shards: int,
    *,
    batch: int = 1000,
    progress: Callable[[MigrationProgress], None] | None = None,
    timeout_s: float = 30.0,
) -> MigrationReport:
    """Move the v1 layout on the Redis node at ``url`` to v2 with ``shards`` shards.

    Idempotent and resumable (a rerun after a finished run moves nothing). Raises
    :class:`MigrationRefused` for a cluster or memory URL, or v2 keys of another
    shard count; :class:`~service.store.protocol.StoreUnavailable` if Redis fails
    (rerun: it resumes). An exception ``progress`` raises ends the run after the batch.
    """
    if batch < 1:
        raise ValueError(f"batch must be at least 1, got {batch}")
    layout = KeyLayout(shards)
    try:
        address: RedisAddress | None = RedisAddress.parse(url)
    except ValueError:
        address = None
        if not url.startswith("memory://"):
            raise
    refusal = _refusal(address, url)
    if refusal is not None:
        raise MigrationRefused(refusal)
    client = aioredis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, decode_responses=False
    )
    try:
        return await _Migration(client, layout, batch, progress).run()
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(
            f"redis at {redact(url)} failed: {exc} (run migrate-keys again: it resumes)"
        ) from exc
    finally:
        await client.aclose()
