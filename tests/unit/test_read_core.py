"""The pieces of the read path without a front end: the coalescer, the hot-user cache,
the reader's cache use and the cold start's space."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from service.api.coalescer import ReadCoalescer
from service.api.cold_start import ColdStart
from service.api.hot_cache import HotCache
from service.api.reads import EmbeddingReader, ReadError
from service.api.refresh import RefreshRequester
from service.core.embeddings import EmbeddingRecord
from service.store.memory import MemoryStore
from service.store.protocol import StoreUnavailable
from tests.helpers import BASE_TS


def record(space: str = "m1", at: int = BASE_TS) -> EmbeddingRecord:
    return EmbeddingRecord(np.ones(4, dtype=np.float16), "m1", space, at, 1)


async def test_concurrent_gets_share_one_fetch() -> None:
    calls: list[list[str]] = []

    async def fetch(keys: Sequence[str]) -> list[str]:
        calls.append(list(keys))
        await asyncio.sleep(0)
        return [k.upper() for k in keys]

    coalescer = ReadCoalescer(fetch)
    assert await asyncio.gather(*(coalescer.get(k) for k in "abcab")) == list("ABCAB")
    assert calls == [list("abcab")]
    assert await coalescer.get("z") == "Z"
    assert len(calls) == 2


async def test_a_full_batch_is_fetched_at_once_and_errors_reach_every_caller() -> None:
    calls: list[int] = []

    async def fetch(keys: Sequence[str]) -> list[str]:
        calls.append(len(keys))
        if "bad" in keys:
            raise StoreUnavailable("down")
        return list(keys)

    coalescer = ReadCoalescer(fetch, max_batch=2)
    assert await asyncio.gather(*(coalescer.get(str(i)) for i in range(5))) == list("01234")
    assert calls == [2, 2, 1]
    results = await asyncio.gather(coalescer.get("bad"), coalescer.get("x"), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)


def test_hot_cache_expires_evicts_and_counts() -> None:
    now = [0.0]
    cache = HotCache(ttl_ms=100, max_users=2, monotonic_ms=lambda: now[0])
    cache.put_many([("a", record()), ("b", record())])
    assert [r is not None for r in cache.get_many(["a", "b", "c"])] == [True, True, False]
    cache.put_many([("c", record())])  # evicts the oldest insertion, a
    assert [r is not None for r in cache.get_many(["a", "b", "c"])] == [False, True, True]
    now[0] = 100.0
    assert cache.get_many(["b", "c"]) == [None, None]
    assert (cache.hits, cache.misses) == (4, 4)
    assert cache.hit_rate == pytest.approx(0.5)
    with pytest.raises(ValueError):
        HotCache(ttl_ms=0, max_users=1)


async def test_reader_serves_hot_users_from_the_cache() -> None:
    store = MemoryStore()
    await store.put_embeddings({"u1": record()})
    cache = HotCache(ttl_ms=60_000, max_users=10)
    reader = EmbeddingReader(
        store,
        lambda: None,
        RefreshRequester(store, 1000, clock=lambda: BASE_TS),
        refresh_after_ms=60_000,
        cache=cache,
        clock=lambda: BASE_TS,
    )
    assert (await reader.get("u1")).status == "fresh"
    await store.put_embeddings({"u1": record(space="m2")})
    assert (await reader.get("u1")).space_version == "m1"  # cached copy within the TTL
    answers = await reader.batch_get(["u1", "u2"])
    assert [a.status for a in answers] == ["fresh", "not_found"]
    assert (cache.hits, cache.misses) == (2, 2)


async def test_a_store_that_does_not_answer_is_a_read_error_not_a_hang() -> None:
    class StuckStore(MemoryStore):
        async def get_embeddings(self, user_ids: Sequence[str]) -> list[EmbeddingRecord | None]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    store = StuckStore()
    reader = EmbeddingReader(
        store, lambda: None, RefreshRequester(store, 1000), refresh_after_ms=1, timeout_ms=20
    )
    for read in (reader.get("u1"), reader.batch_get(["u1", "u2"])):
        with pytest.raises(ReadError) as caught:
            await read
        assert caught.value.code == "store_unavailable"
        assert caught.value.retry_after_s == 1
        assert "did not answer within 20 ms" in caught.value.message


def test_cold_start_is_mapped_into_the_served_space() -> None:
    class Manifest:
        version = "m2"
        cold_start_embedding = (1.0, 0.0)

    swap = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    cold = ColdStart.from_manifest(Manifest(), "m1", swap)  # type: ignore[arg-type]
    assert (cold.model_version, cold.space_version) == ("m2", "m1")
    assert cold.vector.tolist() == [0.0, 1.0]
    assert ColdStart(np.zeros(2, dtype=np.float32), "m3").space_version == "m3"
