"""Deadlines and retries: jittered exponential backoff on :class:`Unavailable`, at
least the server's Retry-After, bounded by attempts and by the call's deadline.

A deadline is a ``time.monotonic()`` instant. A retry that could not start before the
deadline is not waited for: the call gives up at once with the last error.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import TypeVar

from userembed.errors import DeadlineExceeded, UserembedError

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How a call that failed with a retryable error (:class:`Unavailable`) is retried.

    Retry ``n`` (1, 2, ...) waits the server's Retry-After (capped at
    ``max_retry_after_s``) plus a random share of ``initial_backoff_s * multiplier**(n-1)``
    (at most ``max_backoff_s``): "full jitter", so that many clients that failed together
    do not come back together. ``max_attempts`` counts the first request.
    """

    max_attempts: int = 3
    initial_backoff_s: float = 0.05
    max_backoff_s: float = 1.0
    multiplier: float = 2.0
    max_retry_after_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts={self.max_attempts}: at least 1 (1 = no retries)")
        if self.initial_backoff_s < 0 or self.max_backoff_s < 0 or self.max_retry_after_s < 0:
            raise ValueError("backoff and Retry-After bounds must be >= 0 seconds")
        if self.multiplier < 1:
            raise ValueError(f"multiplier={self.multiplier}: at least 1")

    def delay_s(
        self,
        retry: int,
        retry_after_s: float | None = None,
        rand: Callable[[], float] = random.random,
    ) -> float:
        """Seconds to wait before retry number ``retry`` (1-based)."""
        ceiling = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier ** (retry - 1))
        floor = min(max(retry_after_s or 0.0, 0.0), self.max_retry_after_s)
        return floor + ceiling * rand()

    def next_delay_s(
        self,
        error: UserembedError,
        attempts: int,
        remaining_s: float,
        rand: Callable[[], float] = random.random,
    ) -> float | None:
        """The wait before another attempt after ``attempts`` failed ones, or None to give
        up: the error is final, the attempts are spent, or the wait would pass the deadline."""
        if not error.retryable or attempts >= self.max_attempts:
            return None
        delay = self.delay_s(attempts, error.retry_after_s, rand)
        return delay if delay < remaining_s else None


NO_RETRIES = RetryPolicy(max_attempts=1)


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header: delay-seconds or an HTTP-date (RFC 9110);
    None when absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


def deadline_after(timeout_s: float, clock: Callable[[], float] = time.monotonic) -> float:
    if timeout_s <= 0:
        raise ValueError(f"timeout={timeout_s}: must be > 0 seconds")
    return clock() + timeout_s


def remaining_s(deadline: float, clock: Callable[[], float] = time.monotonic) -> float:
    """Seconds left before ``deadline``; :class:`DeadlineExceeded` when none are."""
    left = deadline - clock()
    if left <= 0:
        raise DeadlineExceeded("the call's deadline passed", code="deadline_exceeded")
    return left


def call_with_retries(
    attempt: Callable[[], T],
    policy: RetryPolicy,
    deadline: float,
    *,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
) -> T:
    """``attempt()`` until it answers, retrying retryable errors as ``policy`` says."""
    attempts = 0
    while True:
        remaining_s(deadline, clock)
        attempts += 1
        try:
            return attempt()
        except UserembedError as exc:
            exc.attempts = attempts
            delay = policy.next_delay_s(exc, attempts, deadline - clock(), rand)
            if delay is None:
                raise
        sleep(delay)


async def call_with_retries_async(
    attempt: Callable[[], Awaitable[T]],
    policy: RetryPolicy,
    deadline: float,
    *,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
) -> T:
    """The asyncio form of :func:`call_with_retries`."""
    attempts = 0
    while True:
        remaining_s(deadline, clock)
        attempts += 1
        try:
            return await attempt()
        except UserembedError as exc:
            exc.attempts = attempts
            delay = policy.next_delay_s(exc, attempts, deadline - clock(), rand)
            if delay is None:
                raise
        await asyncio.sleep(delay)
