"""The Store seam: what every role needs from shared state, as one bulk Protocol.

Two implementations behave identically (one contract test suite runs on both):
:class:`~service.store.redis.RedisStore` for production and
:class:`~service.store.memory.MemoryStore`, the embedded default. Every operation is
in bulk: one Redis round trip per call, never one per user.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol

from service.core.embeddings import EmbeddingRecord, StoredEmbedding
from service.core.features import FeatureState
from service.core.model_names import DEFAULT_MODEL

RECLAIM_PER_CALL: Final = 1000
"""At most this many expired leases go back to the queue per claim."""

ModelRecords = Mapping[str, Mapping[str, EmbeddingRecord]]
"""Embedding records by model name, then by user id."""


class StoreUnavailable(RuntimeError):
    """The backing store did not answer in time or refused the connection."""


class StoreMisconfigured(StoreUnavailable):
    """The store answers, but not as configured (e.g. a plain redis:// URL at a cluster
    node): retrying will not help; the message says what to change."""


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

    async def get_embeddings(
        self, user_ids: Sequence[str], model: str = DEFAULT_MODEL, *, columns: bool = False
    ) -> Sequence[StoredEmbedding | None]:
        """The users' records of ``model``, as stored (vectors left packed: the read path
        serves them as they are). ``columns``: the caller serves them as one batch, so a
        :class:`StoredColumns` is welcome (when they share one layout)."""

    async def get_model_embeddings(
        self, user_ids: Sequence[str], models: Sequence[str]
    ) -> list[list[StoredEmbedding | None]]:
        """Every user's record of every model, ``[model][user]``, in one round trip (per
        node): all of a user's records share its shard's slot."""

    async def put_embeddings(
        self, records: Mapping[str, EmbeddingRecord], model: str = DEFAULT_MODEL
    ) -> None: ...

    async def get_features_and_embeddings(
        self, user_ids: Sequence[str], models: Sequence[str] = (DEFAULT_MODEL,)
    ) -> tuple[list[FeatureState | None], list[list[EmbeddingRecord | None]]]:
        """Both reads of a worker batch in one round trip (per node): the states, and
        the served records ``[model][user]`` of each of ``models``."""

    async def write_and_release(
        self, token: str, records: ModelRecords, claimed: Mapping[str, int]
    ) -> None:
        """End the claims ``claimed`` (user -> the dirty time it was claimed with) of
        ``token`` and write their ``records`` (model -> user -> record), in one step per
        shard. Only users whose
        lease that very claim still holds are touched: a claim that expired (the user
        went back to the queue, maybe to another worker and newer features) or was
        superseded by a newer claim of the same worker is left alone."""

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

    async def active_users(self, cursor: int, count: int) -> tuple[list[str], int]:
        """A page of users by recent activity (events), most recent first, and the cursor
        of the next page (0 at the end; start at 0). As with SCAN, a page may be short,
        or even empty, before the end: only the cursor says when it is over."""

    async def trim_active(self, keep: int) -> None:
        """Forget all but the ``keep`` most recently active users."""

    async def claim_job(self, name: str, ttl_ms: int) -> bool:
        """True for exactly one caller per ``name`` until ``ttl_ms`` passes."""

    async def dirty_stats(self) -> DirtyStats: ...

    async def open(self) -> None:
        """Connect and check the deployment before traffic. Raises StoreMisconfigured
        (one sentence saying what to change) or StoreUnavailable (not answering)."""

    async def ping(self) -> None: ...

    async def close(self) -> None: ...
