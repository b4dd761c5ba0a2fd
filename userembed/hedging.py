"""Hedged requests for the tail ("The Tail at Scale"): when the first request has not
answered after ``delay_s``, send the same request again and take whichever answers
first. Reads are idempotent, so the duplicate costs only server work.

An answer is a result or a definitive error (NotFound, InvalidRequest, ...); a
retryable error (:class:`Unavailable`) from one request waits for the other.

Hedges are budgeted (:class:`HedgeBudget`): at most a share of the calls may send one,
as gRPC's retry throttling and Finagle's retry budgets bound retries. When most calls
are slow the cause is the load (or the client's own CPU), and a hedge for each would
double it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import TypeVar

from userembed.errors import UserembedError
from userembed.retry import remaining_s

T = TypeVar("T")


class HedgeBudget:
    """A token bucket refilled by calls: each call adds ``ratio`` tokens (up to
    ``burst``), each hedge spends one, so over time at most ``ratio`` of the calls hedge.
    Thread-safe (one budget serves a client's threads)."""

    def __init__(self, ratio: float, burst: float = 10.0) -> None:
        if not 0 <= ratio <= 1 or burst < 1:
            raise ValueError(f"need 0 <= ratio <= 1 and burst >= 1, got {ratio}, {burst}")
        self._ratio, self._burst = ratio, burst
        self._tokens = burst
        self._lock = threading.Lock()
        self.denied = 0  # hedges not sent for want of budget

    def called(self) -> None:
        """A call started: it earns ``ratio`` of a hedge."""
        with self._lock:
            self._tokens = min(self._burst, self._tokens + self._ratio)

    def spend(self) -> bool:
        """Take one hedge, or False (and count it denied) when the budget is spent."""
        with self._lock:
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            self.denied += 1
            return False


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, UserembedError) and exc.retryable


def hedged(
    call: Callable[[], T],
    delay_s: float,
    pool: Executor,
    deadline: float,
    budget: HedgeBudget | None = None,
) -> T:
    """``call()`` in ``pool``, again after ``delay_s`` without an answer (if ``budget``
    allows); the first answer. The slower request is left to finish (bounded by the
    deadline) and ignored."""
    if budget is not None:
        budget.called()
    first = pool.submit(call)
    done, _ = wait([first], timeout=min(delay_s, remaining_s(deadline)))
    if done:
        return first.result()
    if budget is not None and not budget.spend():
        while not first.done():  # DeadlineExceeded once the deadline passes
            wait([first], timeout=remaining_s(deadline))
        return first.result()
    pending: set[Future[T]] = {first, pool.submit(call)}
    error: BaseException | None = None
    while pending:
        done, pending = wait(pending, timeout=remaining_s(deadline), return_when=FIRST_COMPLETED)
        for future in done:
            exc = future.exception()
            if exc is None:
                return future.result()
            if not _transient(exc):
                raise exc
            error = error or exc
    assert error is not None  # every request failed transiently
    raise error


async def hedged_async(
    call: Callable[[], Awaitable[T]], delay_s: float, budget: HedgeBudget | None = None
) -> T:
    """The asyncio form of :func:`hedged`; the slower request is cancelled. The caller
    bounds the whole by its deadline."""
    if budget is not None:
        budget.called()
    first = asyncio.ensure_future(call())
    tasks = [first]
    try:
        done, _ = await asyncio.wait(tasks, timeout=delay_s)
        if done:
            return first.result()
        if budget is not None and not budget.spend():
            return await first
        tasks.append(asyncio.ensure_future(call()))
        pending = set(tasks)
        error: BaseException | None = None
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if exc is None:
                    return task.result()
                if not _transient(exc):
                    raise exc
                error = error or exc
        assert error is not None
        raise error
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
            elif not task.cancelled():
                task.exception()  # retrieved: no "exception was never retrieved" warning
