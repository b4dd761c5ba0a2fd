"""Hedged requests and coalesced gets, over an in-memory fake transport: which request
answers, how many are sent, and what each caller gets."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from userembed import AsyncClient, Client, DeadlineExceeded, NotFound, Unavailable
from userembed.errors import InvalidRequest
from userembed.hedging import hedged, hedged_async
from userembed.results import Embedding
from userembed.transport import Query


def embedding(user_id: str, status: str = "fresh", model: str = "default") -> Embedding:
    vector = None if status in ("not_found", "version_mismatch") else np.ones(2, np.float32)
    return Embedding(user_id, status, vector, "m1", "m1", model=model)  # type: ignore[arg-type]


class FakeTransport:
    """Answers after ``delays`` (one per request, then 0), counting requests."""

    def __init__(
        self, delays: Sequence[float] = (), errors: Sequence[Exception | None] = ()
    ) -> None:
        self.delays, self.errors = list(delays), list(errors)
        self.gets: list[str] = []
        self.batches: list[list[str]] = []
        self.queries: list[Query] = []
        self._lock = threading.Lock()

    def _next(self) -> tuple[float, Exception | None]:
        with self._lock:
            delay = self.delays.pop(0) if self.delays else 0.0
            error = self.errors.pop(0) if self.errors else None
            return delay, error

    def get(self, user_id: str, query: Query, timeout_s: float) -> Embedding:
        self.gets.append(user_id)
        delay, error = self._next()
        time.sleep(delay)
        if error:
            raise error
        return embedding(user_id)

    def batch_get(self, user_ids: Sequence[str], query: Query, timeout_s: float) -> list[Embedding]:
        self.batches.append(list(user_ids))
        self.queries.append(query)
        return [  # user-major, as the server answers
            embedding(u, "not_found" if u.startswith("gone") else "fresh", model)
            for u in user_ids
            for model in query.names
        ]

    def close(self) -> None:
        pass


class AsyncFakeTransport(FakeTransport):
    async def get(self, user_id: str, query: Query, timeout_s: float) -> Embedding:  # type: ignore[override]
        self.gets.append(user_id)
        delay, error = self._next()
        await asyncio.sleep(delay)
        if error:
            raise error
        return embedding(user_id)

    async def batch_get(  # type: ignore[override]
        self, user_ids: Sequence[str], query: Query, timeout_s: float
    ) -> list[Embedding]:
        await asyncio.sleep(0.001)
        return FakeTransport.batch_get(self, user_ids, query, timeout_s)

    async def aclose(self) -> None:
        pass


def test_a_fast_first_request_is_not_hedged() -> None:
    fake = FakeTransport()
    with ThreadPoolExecutor(4) as pool:
        assert hedged(lambda: fake.get("u1", Query(), 1), 0.2, pool, time.monotonic() + 2)
    assert fake.gets == ["u1"]


def test_a_slow_first_request_is_hedged_and_the_second_answers() -> None:
    fake = FakeTransport(delays=[1.0, 0.0])
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        got = hedged(lambda: fake.get("u1", Query(), 2), 0.05, pool, time.monotonic() + 2)
        elapsed = time.monotonic() - started
    assert got.user_id == "u1" and fake.gets == ["u1", "u1"]
    assert elapsed < 0.5


def hedge_once(fake: FakeTransport) -> Embedding:
    with ThreadPoolExecutor(4) as pool:
        return hedged(lambda: fake.get("u1", Query(), 2), 0.05, pool, time.monotonic() + 2)


def test_a_transient_error_waits_for_the_other_request() -> None:
    fake = FakeTransport(delays=[0.3, 0.0], errors=[None, Unavailable("hedge down")])
    assert hedge_once(fake).user_id == "u1"  # the slow first request's answer


def test_a_definitive_error_is_an_answer() -> None:
    fake = FakeTransport(delays=[0.3, 0.0], errors=[Unavailable("slow"), NotFound("none")])
    with pytest.raises(NotFound):
        hedge_once(fake)


def test_both_transient_is_the_first_error() -> None:
    fake = FakeTransport(delays=[0.2, 0.0], errors=[Unavailable("a"), Unavailable("b")])
    with pytest.raises(Unavailable, match="b"):
        hedge_once(fake)


def test_sync_client_hedges_only_when_asked() -> None:
    fake = FakeTransport(delays=[0.5])
    with Client(hedge_after_s=0.02, transport=fake) as client:
        assert client.get("u1").user_id == "u1"
    assert fake.gets == ["u1", "u1"]
    fake = FakeTransport(delays=[0.05])
    with Client(transport=fake) as client:
        client.get("u1")
    assert fake.gets == ["u1"]


async def test_async_hedge_cancels_the_slower_request() -> None:
    fake = AsyncFakeTransport(delays=[5.0, 0.0])
    started = time.monotonic()
    got = await hedged_async(lambda: fake.get("u1", Query(), 5), 0.02)
    assert got.user_id == "u1" and len(fake.gets) == 2
    assert time.monotonic() - started < 1.0


async def test_async_deadline_bounds_the_whole_call() -> None:
    fake = AsyncFakeTransport(delays=[5.0])
    async with AsyncClient(transport=fake, timeout=0.1) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await client.get("u1")
        assert time.monotonic() - started < 0.5


async def test_concurrent_gets_coalesce_into_one_batch_per_window() -> None:
    fake = AsyncFakeTransport()
    async with AsyncClient(transport=fake, coalesce_window_s=0.01, max_batch=100) as client:
        users = [f"u{i}" for i in range(20)]
        got = await asyncio.gather(*(client.get(u) for u in [*users, "u0"]))
    assert [e.user_id for e in got] == [*users, "u0"]
    assert fake.gets == [] and fake.batches == [users]  # one batch, duplicates sent once


async def test_a_full_window_is_sent_at_once_and_answers_keep_single_get_semantics() -> None:
    fake = AsyncFakeTransport()
    async with AsyncClient(transport=fake, coalesce_window_s=10.0, max_batch=3) as client:
        results = await asyncio.wait_for(
            asyncio.gather(*(client.get(u) for u in ["a", "b", "gone"]), return_exceptions=True),
            timeout=2,
        )
    assert fake.batches == [["a", "b", "gone"]]  # sent when full, not after 10 s
    assert [type(r).__name__ for r in results] == ["Embedding", "Embedding", "NotFound"]


async def test_a_failed_batch_fails_every_waiting_get() -> None:
    class Failing(AsyncFakeTransport):
        async def batch_get(  # type: ignore[override]
            self, user_ids: Sequence[str], query: Query, timeout_s: float
        ) -> list[Embedding]:
            raise InvalidRequest("bad pin")

    async with AsyncClient(transport=Failing(), coalesce_window_s=0.005) as client:
        results = await asyncio.gather(client.get("a"), client.get("b"), return_exceptions=True)
    assert all(isinstance(r, InvalidRequest) for r in results)


async def test_pins_coalesce_separately() -> None:
    fake = AsyncFakeTransport()
    async with AsyncClient(transport=fake, coalesce_window_s=0.01) as client:
        await asyncio.gather(client.get("a"), client.get("b", model_version="m0"))
    assert sorted(fake.batches) == [["a"], ["b"]]


async def test_gets_coalesce_per_model_and_pin() -> None:
    fake = AsyncFakeTransport()
    async with AsyncClient(transport=fake, coalesce_window_s=0.01) as client:
        got = await asyncio.gather(
            client.get("a"),
            client.get("b", model="clicks"),
            client.get("c", model="clicks"),
            client.get("d", model="clicks", model_version="c1"),
            client.get("gone", model="clicks"),
            return_exceptions=True,
        )
    windows = {q: ids for q, ids in zip(fake.queries, fake.batches, strict=True)}
    assert windows == {
        Query(): ["a"],
        Query(("clicks",)): ["b", "c", "gone"],
        Query(("clicks",), (("clicks", "c1"),)): ["d"],
    }
    assert [e.model for e in got[:4]] == ["default", "clicks", "clicks", "clicks"]  # type: ignore[union-attr]
    assert isinstance(got[4], NotFound)
    assert str(got[4]).startswith("no 'clicks' embedding of 'gone' yet")


def test_a_read_of_several_models_is_split_by_answers_and_regrouped_by_model() -> None:
    fake = FakeTransport()
    users = [f"u{i}" for i in range(7)]
    with Client(transport=fake, max_batch=5, model_version="d1") as client:
        batches = client.get_many(users, models=["clicks", "default"])
        empty = client.get_many([], models=["clicks"])
    # at most 5 answers per request: 2 users x 2 models, in parallel, in order
    assert fake.batches == [users[0:2], users[2:4], users[4:6], users[6:]]
    assert set(fake.queries) == {Query(("clicks", "default"), (("default", "d1"),))}
    assert list(batches) == ["clicks", "default"] and batches.models == ("clicks", "default")
    assert batches.user_ids == users and len(batches) == 2
    for model in ("clicks", "default"):
        assert [(e.user_id, e.model) for e in batches[model]] == [(u, model) for u in users]
        assert batches[model].matrix().shape == (7, 2)
    assert {m: e.user_id for m, e in batches.user(3).items()} == {"clicks": "u3", "default": "u3"}
    assert list(empty) == ["clicks"] and len(empty["clicks"]) == 0
    assert repr(batches) == "ModelBatches(7 users x models ['clicks', 'default'])"


def test_a_read_names_one_model_or_several_not_a_mix() -> None:
    fake = FakeTransport()
    with Client(transport=fake) as client:
        with pytest.raises(InvalidRequest, match="non-empty list"):
            client.get_many(["u1"], models=[])
        with pytest.raises(ValueError, match="model_versions="):
            client.get_many(["u1"], models=["clicks"], model_version="c1")  # type: ignore[call-overload]
        with pytest.raises(ValueError, match="model_version="):
            client.get_many(["u1"], model_versions={"clicks": "c1"})  # type: ignore[call-overload]
        one = client.get_many(["u1"], model="clicks")
    assert [e.model for e in one] == ["clicks"] and fake.queries[-1] == Query(("clicks",))
