"""Hedged requests for the tail ("The Tail at Scale"): when the first request has not
answered after ``delay_s``, send the same request again and take whichever answers
first. Reads are idempotent, so the duplicate costs only server work.

An answer is a result or a definitive error (NotFound, InvalidRequest, ...); a
retryable error (:class:`Unavailable`) from one request waits for the other.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from typing import TypeVar

from userembed.errors import UserembedError
from userembed.retry import remaining_s

T = TypeVar("T")


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, UserembedError) and exc.retryable


def hedged(call: Callable[[], T], delay_s: float, pool: Executor, deadline: float) -> T:
    """``call()`` in ``pool``, again after ``delay_s`` without an answer; the first answer.
    The slower request is left to finish (bounded by the deadline) and ignored."""
    first = pool.submit(call)
    done, _ = wait([first], timeout=min(delay_s, remaining_s(deadline)))
    if done:
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


async def hedged_async(call: Callable[[], Awaitable[T]], delay_s: float) -> T:
    """The asyncio form of :func:`hedged`; the slower request is cancelled. The caller
    bounds the whole by its deadline."""
    first = asyncio.ensure_future(call())
    tasks = [first]
    try:
        done, _ = await asyncio.wait(tasks, timeout=delay_s)
        if done:
            return first.result()
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
