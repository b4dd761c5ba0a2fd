"""Choosing the store from the settings (the composition root's one call)."""

from __future__ import annotations

import logging

from service.settings import Settings
from service.store.memory import MemoryStore
from service.store.protocol import Store, StoreMisconfigured, StoreUnavailable
from service.store.redis import RedisStore

log = logging.getLogger(__name__)


def open_store(settings: Settings) -> Store:
    """The store named by ``redis_url``: ``memory://`` is the embedded default;
    ``redis://`` one node, ``redis+cluster://`` a Redis Cluster (same key layout).
    Raises ValueError, saying what to change, for a URL that names no store."""
    if settings.redis_url.startswith("memory://"):
        return MemoryStore()
    return RedisStore(
        settings.redis_url,
        settings.redis_timeout_ms,
        settings.redis_shards,
        write_replicas=settings.redis_write_replicas,
    )


async def open_checked_store(settings: Settings) -> Store:
    """:func:`open_store`, checked before traffic: a misconfiguration raises
    StoreMisconfigured (one sentence); a store not answering yet is logged, and the
    role's own retries take over."""
    store = open_store(settings)
    try:
        await store.open()
    except StoreMisconfigured:
        await store.close()
        raise
    except StoreUnavailable as exc:
        log.warning("event=store_not_ready reason=%r (retrying as traffic comes)", str(exc))
    return store
