"""Key layout v2: every key of a user carries its shard's hash tag.

``shard = crc32(user_id) % shards``, the hash librdkafka's default partitioner uses
for the message key, so with ``shards`` a multiple of the topic's partition count a
partition's users fall in ``shards / partitions`` shards and one ingest batch
touches few of them (docs/capacity.md). Per shard ``s``:

- ``uf:{s}:<uid>`` feature state, ``ue:{s}:<uid>`` the default model's embedding
  record, ``ue.<model>:{s}:<uid>`` a named model's (model names have no ``.`` or
  ``:``, so no two prefixes meet; all of a user's records share one slot, so one
  MGET reads every model of a user);
- ``userembed:{s}:dirty`` the dirty queue (sorted set, score = dirty since, ms);
- ``userembed:{s}:leased`` claims in flight (score = lease expiry) with
  ``userembed:{s}:lease`` (user -> ``token:dirty_at``);
- ``userembed:{s}:active`` last activity per user (re-embedding order).

The tag comes before the user id: Redis hashes the first ``{...}`` only, so a user
id with braces cannot move its keys. On a Redis Cluster every key of a shard is in
one slot, so each script touches one node; a single Redis uses the same names.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable
from typing import Final

from service.core.model_names import DEFAULT_MODEL

LAYOUT: Final = 2
DEFAULT_SHARDS: Final = 64  # Settings.redis_shards
MAX_SHARDS: Final = 16384  # one slot per shard at most


def shard_of(user_id: str, shards: int) -> int:
    """The user's shard: CRC-32 of the UTF-8 id, as librdkafka partitions by key."""
    return zlib.crc32(user_id.encode()) % shards


def job_key(name: str) -> str:
    """A one-off job's lock (its own slot: no user key goes with it)."""
    return f"userembed:job:{name}"


class KeyLayout:
    """Key names for ``shards`` shards; the one place a key name is built."""

    __slots__ = ("_tag_bytes", "_tags", "shards")

    def __init__(self, shards: int) -> None:
        if not 1 <= shards <= MAX_SHARDS:
            raise ValueError(f"shards must be in 1..{MAX_SHARDS}, got {shards}")
        self.shards = shards
        self._tags = [f"{{{s}}}" for s in range(shards)]
        self._tag_bytes = [tag.encode() for tag in self._tags]

    def shard(self, user_id: str) -> int:
        return zlib.crc32(user_id.encode()) % self.shards

    def feature_key(self, user_id: str) -> str:
        return f"uf:{self._tags[self.shard(user_id)]}:{user_id}"

    def embedding_key(self, user_id: str, model: str = DEFAULT_MODEL) -> str:
        prefix = "ue" if model == DEFAULT_MODEL else f"ue.{model}"
        return f"{prefix}:{self._tags[self.shard(user_id)]}:{user_id}"

    def embedding_keys(self, user_ids: Iterable[str], model: str = DEFAULT_MODEL) -> list[bytes]:
        """:meth:`embedding_key` of each user, as bytes: the keys of a bulk read (bytes are
        what redis-py sends, so it skips encoding each key, and the id is encoded once)."""
        prefix = b"ue:" if model == DEFAULT_MODEL else f"ue.{model}:".encode()
        tags, shards, crc32 = self._tag_bytes, self.shards, zlib.crc32
        return [
            b"".join((prefix, tags[crc32(raw) % shards], b":", raw))
            for raw in (user_id.encode() for user_id in user_ids)
        ]

    def dirty_key(self, shard: int) -> str:
        return f"userembed:{self._tags[shard]}:dirty"

    def leased_key(self, shard: int) -> str:
        return f"userembed:{self._tags[shard]}:leased"

    def lease_info_key(self, shard: int) -> str:
        return f"userembed:{self._tags[shard]}:lease"

    def active_key(self, shard: int) -> str:
        return f"userembed:{self._tags[shard]}:active"

    def queue_keys(self, shard: int) -> list[str]:
        """The shard's queue, leases and lease info, in the order the scripts take them."""
        return [self.dirty_key(shard), self.leased_key(shard), self.lease_info_key(shard)]

    def by_shard(self, user_ids: Iterable[str]) -> dict[int, list[str]]:
        """``user_ids`` grouped by shard, each group in input order."""
        groups: dict[int, list[str]] = defaultdict(list)
        for user_id in user_ids:
            groups[self.shard(user_id)].append(user_id)
        return groups
