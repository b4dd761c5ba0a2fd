"""Concurrent single gets of one asyncio client, coalesced into batch reads.

The first get of a query (a model and its pin) opens a window of ``window_s``; every
get of the same query that arrives in it joins one batch read (sent early when it
reaches ``max_batch`` distinct users). Each caller gets its own user's answer as a
single get would give it (``not_found`` raises NotFound, ...), within its own deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from userembed.errors import DeadlineExceeded
from userembed.results import Embedding, single
from userembed.transport import Query

# (user ids, query, deadline) -> answers in order
BatchFetch = Callable[[Sequence[str], Query, float], Awaitable[list[Embedding]]]


@dataclass
class _Window:
    """The gets waiting for one query's next batch."""

    waiters: dict[str, list[asyncio.Future[Embedding]]] = field(default_factory=dict)
    deadline: float = 0.0
    timer: asyncio.TimerHandle | None = None


class GetCoalescer:
    """Single gets within ``window_s`` of each other share one ``fetch`` per query."""

    def __init__(self, fetch: BatchFetch, window_s: float, max_batch: int) -> None:
        self._fetch = fetch
        self._window_s = window_s
        self._max_batch = max_batch
        self._windows: dict[Query, _Window] = {}
        self._sending: set[asyncio.Task[None]] = set()

    async def get(self, user_id: str, query: Query, deadline: float) -> Embedding:
        """``user_id``'s answer from the next batch of ``query`` (one model); DeadlineExceeded
        when it has not come by ``deadline`` (the batch goes on for the others)."""
        loop = asyncio.get_running_loop()
        window = self._windows.get(query)
        if window is None:
            window = self._windows[query] = _Window()
            window.timer = loop.call_later(self._window_s, self._flush, query)
        future: asyncio.Future[Embedding] = loop.create_future()
        window.waiters.setdefault(user_id, []).append(future)
        window.deadline = max(window.deadline, deadline)
        if len(window.waiters) >= self._max_batch:
            self._flush(query)
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                return single(await future, query.pin(query.names[0]))
        except TimeoutError:
            raise DeadlineExceeded(
                f"no answer for {user_id!r} before the deadline", code="deadline_exceeded"
            ) from None

    def _flush(self, query: Query) -> None:
        window = self._windows.pop(query, None)
        if window is None:
            return
        if window.timer is not None:
            window.timer.cancel()
        task = asyncio.get_running_loop().create_task(self._send(query, window))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, query: Query, window: _Window) -> None:
        ids = list(window.waiters)
        try:
            answers = await self._fetch(ids, query, window.deadline)
        except Exception as exc:  # every caller gets the batch's error, never a hang
            for futures in window.waiters.values():
                for future in futures:
                    if not future.done():
                        future.set_exception(exc)
            return
        except asyncio.CancelledError:
            for futures in window.waiters.values():
                for future in futures:
                    future.cancel()
            raise
        for user_id, answer in zip(ids, answers, strict=True):
            for future in window.waiters[user_id]:
                if not future.done():  # done: its caller gave up (deadline, cancelled)
                    future.set_result(answer)

    async def aclose(self) -> None:
        """Send what is waiting now and wait for the batches in flight."""
        for query in list(self._windows):
            self._flush(query)
        if self._sending:
            await asyncio.gather(*self._sending, return_exceptions=True)
