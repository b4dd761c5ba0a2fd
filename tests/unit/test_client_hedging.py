"""Hedged requests and coalesced gets, over an in-memory fake transport: which request
answers, how many are sent, and what each caller gets."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import ParamSpec, TypeVar

import numpy as np
import pytest

from userembed import AsyncClient, Client, DeadlineExceeded, NotFound, Unavailable
from userembed.errors import InvalidRequest
from userembed.hedging import HedgeBudget, hedged, hedged_async
from userembed.results import Embedding, ModelInfo
from userembed.transport import Query

P = ParamSpec("P")
T = TypeVar("T")
HOLD_S = 30.0  # a held request's guard: a test that never releases it fails, not hangs


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

    def list_models(self, timeout_s: float) -> list[ModelInfo]:
        return []

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

    async def list_models(self, timeout_s: float) -> list[ModelInfo]:  # type: ignore[override]
        return []

    async def aclose(self) -> None:
        pass


def tagged(user_id: str, n: int) -> Embedding:
    """Request ``n``'s answer: which request answered is in its model_version."""
    return Embedding(user_id, "fresh", np.ones(2, np.float32), f"request-{n}", "m1")


class Requests(ThreadPoolExecutor):
    """The pool a hedged call sends its requests through, scripted per request in the
    order they are submitted (0: the first, 1: the hedge): request ``n`` waits while it
    is ``held`` (until :meth:`release`), then raises ``errors[n]`` or answers
    ``tagged("u1", n)``. ``finished`` lists the requests in the order they finished;
    ``release_when_done`` maps a request to the held one to release once it is done
    (after whoever waits for it has been told)."""

    def __init__(
        self,
        held: Collection[int] = (),
        errors: Mapping[int, Exception] | None = None,
        release_when_done: Mapping[int, int] | None = None,
    ) -> None:
        super().__init__(max_workers=4)
        self.gates = {n: threading.Event() for n in held}
        self.errors = dict(errors or {})
        self.release_when_done = dict(release_when_done or {})
        self.finished: list[int] = []
        self._submitted = itertools.count()
        self._current = threading.local()

    def submit(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> Future[T]:
        n = next(self._submitted)

        def numbered() -> T:
            self._current.n = n
            return fn(*args, **kwargs)

        future = super().submit(numbered)
        if n in self.release_when_done:
            held = self.release_when_done[n]
            future.add_done_callback(lambda _: self.release(held))
        return future

    def request(self) -> Embedding:
        """One request, numbered by the pool's submission that runs it."""
        n: int = self._current.n
        gate = self.gates.get(n)
        if gate is not None and not gate.wait(HOLD_S):
            raise AssertionError(f"request {n} was never released")
        self.finished.append(n)
        if n in self.errors:
            raise self.errors[n]
        return tagged("u1", n)

    def release(self, n: int) -> None:
        self.gates[n].set()

    def release_all(self) -> None:
        for gate in self.gates.values():
            gate.set()


class HeldTransport(FakeTransport):
    """Holds the first request that arrives until :meth:`release` (or its timeout:
    DeadlineExceeded); answers ``tagged(user_id, n)``, n the order of arrival."""

    def __init__(self) -> None:
        super().__init__()
        self.finished: list[int] = []
        self._held = threading.Event()

    def get(self, user_id: str, query: Query, timeout_s: float) -> Embedding:
        with self._lock:
            n = len(self.gets)
            self.gets.append(user_id)
        if n == 0 and not self._held.wait(timeout_s):
            raise DeadlineExceeded("held until the deadline", code="deadline_exceeded")
        with self._lock:
            self.finished.append(n)
        return tagged(user_id, n)

    def release(self) -> None:
        self._held.set()


class AsyncHeldTransport(AsyncFakeTransport):
    """Holds the first request that arrives until it is cancelled (``cancelled`` is set
    then); answers ``tagged(user_id, n)``, n the order of arrival."""

    def __init__(self) -> None:
        super().__init__()
        self.finished: list[int] = []
        self.cancelled = asyncio.Event()
        self._never = asyncio.Event()

    async def get(self, user_id: str, query: Query, timeout_s: float) -> Embedding:  # type: ignore[override]
        n = len(self.gets)
        self.gets.append(user_id)
        if n == 0:
            try:
                await self._never.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        self.finished.append(n)
        return tagged(user_id, n)


def test_a_fast_first_request_is_not_hedged() -> None:
    with Requests() as requests:  # the first answers long before the hedge is due
        got = hedged(requests.request, 60, requests, time.monotonic() + HOLD_S)
    assert got.model_version == "request-0" and requests.finished == [0]  # no hedge sent


def test_a_slow_first_request_is_hedged_and_the_second_answers() -> None:
    with Requests(held=[0]) as requests:
        try:
            got = hedged(requests.request, 0.05, requests, time.monotonic() + HOLD_S)
            # the hedge's answer, returned while the first request is still held
            assert got.model_version == "request-1" and requests.finished == [1]
        finally:
            requests.release_all()
    assert requests.finished == [1, 0]  # the first was left to finish, and ignored


def test_a_transient_error_waits_for_the_other_request() -> None:
    hedge_down = {1: Unavailable("hedge down")}
    with Requests(held=[0], errors=hedge_down, release_when_done={1: 0}) as requests:
        got = hedged(requests.request, 0.05, requests, time.monotonic() + HOLD_S)
    # the hedge failed first; the call waited for the first request's answer
    assert got.model_version == "request-0" and requests.finished == [1, 0]


def test_a_definitive_error_is_an_answer() -> None:
    errors = {0: Unavailable("slow"), 1: NotFound("none")}
    with Requests(held=[0], errors=errors) as requests:
        try:
            with pytest.raises(NotFound):
                hedged(requests.request, 0.05, requests, time.monotonic() + HOLD_S)
            assert requests.finished == [1]  # raised without waiting for the held first
        finally:
            requests.release_all()


def test_both_transient_is_the_first_error() -> None:
    errors = {0: Unavailable("a"), 1: Unavailable("b")}
    requests = Requests(held=[0], errors=errors, release_when_done={1: 0})
    with requests, pytest.raises(Unavailable, match="b"):  # the hedge's, the first to fail
        hedged(requests.request, 0.05, requests, time.monotonic() + HOLD_S)
    assert requests.finished == [1, 0]


def test_sync_client_hedges_only_when_asked() -> None:
    fake = HeldTransport()  # without a hedge, the held first request would time out
    with Client(hedge_after_s=0.02, transport=fake, timeout=HOLD_S) as client:
        try:
            got = client.get("u1")
            # the hedge answered while the first request was still held
            assert got.model_version == "request-1" and fake.finished == [1]
        finally:
            fake.release()
    assert fake.gets == ["u1", "u1"]
    unhedged = FakeTransport(delays=[0.05])
    with Client(transport=unhedged) as client:
        client.get("u1")
    assert unhedged.gets == ["u1"]


async def test_async_hedge_cancels_the_slower_request() -> None:
    fake = AsyncHeldTransport()  # the first request never answers
    hedge = hedged_async(lambda: fake.get("u1", Query(), 5), 0.02)
    got = await asyncio.wait_for(hedge, HOLD_S)
    assert got.model_version == "request-1" and fake.gets == ["u1", "u1"]
    await asyncio.wait_for(fake.cancelled.wait(), HOLD_S)  # the held first was cancelled
    assert fake.finished == [1]


async def test_async_deadline_bounds_the_whole_call() -> None:
    fake = AsyncHeldTransport()  # its only request never answers, whatever its timeout
    async with AsyncClient(transport=fake, timeout=0.1) as client:
        with pytest.raises(DeadlineExceeded) as caught:
            await asyncio.wait_for(client.get("u1"), HOLD_S)
    # the client's own deadline ended the call: the request was cancelled unanswered
    assert caught.value.code == "deadline_exceeded"
    assert fake.cancelled.is_set() and fake.finished == [] and fake.gets == ["u1"]


async def test_concurrent_gets_coalesce_into_one_batch_per_window() -> None:
    fake = AsyncFakeTransport()
    async with AsyncClient(transport=fake, coalesce_window_s=0.01, max_batch=100) as client:
        users = [f"u{i}" for i in range(20)]
        got = await asyncio.gather(*(client.get(u) for u in [*users, "u0"]))
    assert [e.user_id for e in got] == [*users, "u0"]
    assert fake.gets == [] and fake.batches == [users]  # one batch, duplicates sent once


async def test_a_full_window_is_sent_at_once_and_answers_keep_single_get_semantics() -> None:
    fake = AsyncFakeTransport()
    async with AsyncClient(transport=fake, coalesce_window_s=3600.0, max_batch=3) as client:
        results = await asyncio.wait_for(
            asyncio.gather(*(client.get(u) for u in ["a", "b", "gone"]), return_exceptions=True),
            timeout=HOLD_S,
        )
    assert fake.batches == [["a", "b", "gone"]]  # sent when full: the window is an hour
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


class Denials(HedgeBudget):
    """A budget that tells when it denied a hedge (``denial`` is set)."""

    def __init__(self, ratio: float, burst: float = 1.0) -> None:
        super().__init__(ratio, burst)
        self.denial = threading.Event()

    def spend(self) -> bool:
        allowed = super().spend()
        if not allowed:
            self.denial.set()
        return allowed


def test_the_budget_lets_a_share_of_calls_hedge() -> None:
    budget = HedgeBudget(0.5, burst=2)
    assert [budget.spend(), budget.spend(), budget.spend()] == [True, True, False]
    assert budget.denied == 1
    budget.called()
    assert budget.spend() is False  # half a hedge earned
    budget.called()
    assert budget.spend() is True  # two calls: one hedge
    for _ in range(10):
        budget.called()
    assert [budget.spend() for _ in range(3)] == [True, True, False]  # burst caps the savings
    assert budget.denied == 3
    for ratio, burst in ((-0.1, 1), (1.1, 1), (0.1, 0.5)):
        with pytest.raises(ValueError, match="need 0 <= ratio <= 1 and burst >= 1"):
            HedgeBudget(ratio, burst)


def test_a_call_without_budget_waits_for_its_first_request() -> None:
    budget = Denials(0.0)
    assert budget.spend()  # the burst's one hedge, spent
    with Requests(held={0}) as requests, ThreadPoolExecutor(1) as caller:
        call = caller.submit(
            hedged, requests.request, 0.001, requests, time.monotonic() + HOLD_S, budget
        )
        assert budget.denial.wait(HOLD_S)  # past the hedge delay, no hedge sent
        requests.release(0)
        got = call.result(HOLD_S)
    assert got.model_version == "request-0" and requests.finished == [0]
    assert budget.denied == 1


async def test_an_async_call_without_budget_waits_for_its_first_request() -> None:
    budget = Denials(0.0)
    assert budget.spend()
    gate = asyncio.Event()
    sent: list[int] = []

    async def request() -> Embedding:
        n = len(sent)
        sent.append(n)
        await gate.wait()
        return tagged("u1", n)

    call = asyncio.ensure_future(hedged_async(request, 0.001, budget))
    while not budget.denial.is_set():
        await asyncio.sleep(0.001)
    gate.set()
    got = await asyncio.wait_for(call, HOLD_S)
    assert (got.model_version, sent, budget.denied) == ("request-0", [0], 1)


def test_clients_take_their_hedge_budget_from_the_options() -> None:
    with Client(transport=FakeTransport(), hedge_after_s=0.01, hedge_budget=0.25) as client:
        assert client.options.hedge_budget == 0.25
        assert client.hedge_budget.spend()
    assert AsyncClient(transport=AsyncFakeTransport()).options.hedge_budget == 0.1
    with pytest.raises(ValueError, match=r"hedge_budget=1.5: a share of calls, 0..1"):
        Client(transport=FakeTransport(), hedge_budget=1.5)
