"""Choosing the store from its URL (the composition root's one call)."""

from __future__ import annotations

from service.store.memory import MemoryStore
from service.store.protocol import Store
from service.store.redis import RedisStore


def open_store(redis_url: str, timeout_ms: int = 250) -> Store:
    """The store named by ``redis_url``: ``memory://`` is the embedded default."""
    if redis_url.startswith("memory://"):
        return MemoryStore()
    return RedisStore(redis_url, timeout_ms)
