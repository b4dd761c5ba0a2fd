"""The client's deadlines and retries: jittered backoff, Retry-After as a floor, bounded
by attempts and by the deadline (pure: a fake clock and sleep)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from userembed.errors import DeadlineExceeded, NotFound, Unavailable, UserembedError
from userembed.retry import (
    NO_RETRIES,
    RetryPolicy,
    call_with_retries,
    call_with_retries_async,
    parse_retry_after,
    remaining_s,
)


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


def failing(errors: list[UserembedError], answer: str = "ok") -> tuple[list[int], object]:
    calls = [0]

    def attempt() -> str:
        calls[0] += 1
        if errors:
            raise errors.pop(0)
        return answer

    return calls, attempt


def test_backoff_grows_exponentially_with_full_jitter_and_a_cap() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=0.5, multiplier=2)
    assert [policy.delay_s(n, rand=lambda: 1.0) for n in (1, 2, 3, 4)] == [0.1, 0.2, 0.4, 0.5]
    assert policy.delay_s(3, rand=lambda: 0.0) == 0.0
    assert policy.delay_s(2, rand=lambda: 0.5) == pytest.approx(0.1)


def test_retry_after_is_a_floor_capped_by_the_policy() -> None:
    policy = RetryPolicy(initial_backoff_s=0.1, max_retry_after_s=5)
    assert policy.delay_s(1, retry_after_s=2, rand=lambda: 0.5) == pytest.approx(2.05)
    assert policy.delay_s(1, retry_after_s=60, rand=lambda: 0.0) == 5
    assert policy.delay_s(1, retry_after_s=-3, rand=lambda: 0.0) == 0


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("2", 2.0),
        (" 0 ", 0.0),
        ("Sun, 06 Dec 2026 20:00:03 GMT", 3.0),
        ("Sun, 06 Dec 2026 19:59:00 GMT", 0.0),  # in the past: now
        ("soon", None),
        ("-1", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_retry_after(value: str | None, seconds: float | None) -> None:
    now = datetime(2026, 12, 6, 20, 0, 0, tzinfo=UTC)
    assert parse_retry_after(value, now) == seconds


def test_policy_is_checked() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        RetryPolicy(max_attempts=0)
    with pytest.raises(ValueError, match=">= 0"):
        RetryPolicy(initial_backoff_s=-1)


def test_unavailable_is_retried_until_it_answers() -> None:
    time = FakeTime()
    calls, attempt = failing([Unavailable("down", retry_after_s=1), Unavailable("down")])
    policy = RetryPolicy(max_attempts=3, initial_backoff_s=0.1)
    result = call_with_retries(
        attempt, policy, 110.0, sleep=time.sleep, clock=time.clock, rand=lambda: 1.0
    )
    assert result == "ok" and calls == [3]
    assert time.slept == pytest.approx([1.1, 0.2])  # Retry-After + backoff, then backoff


def test_attempts_are_bounded_and_counted_on_the_error() -> None:
    time = FakeTime()
    calls, attempt = failing([Unavailable("down") for _ in range(5)])
    with pytest.raises(Unavailable) as caught:
        call_with_retries(
            attempt, RetryPolicy(max_attempts=3), 110.0, sleep=time.sleep, clock=time.clock
        )
    assert calls == [3] and caught.value.attempts == 3
    assert "after 3 attempts" in str(caught.value)


def test_a_retry_that_would_pass_the_deadline_is_not_waited_for() -> None:
    time = FakeTime()
    calls, attempt = failing([Unavailable("down", retry_after_s=1)])
    with pytest.raises(Unavailable) as caught:
        call_with_retries(attempt, RetryPolicy(), 100.5, sleep=time.sleep, clock=time.clock)
    assert calls == [1] and time.slept == [] and caught.value.attempts == 1


def test_final_errors_are_not_retried() -> None:
    time = FakeTime()
    calls, attempt = failing([NotFound("nothing")])
    with pytest.raises(NotFound):
        call_with_retries(attempt, RetryPolicy(), 110.0, sleep=time.sleep, clock=time.clock)
    assert calls == [1]


def test_no_retries_policy() -> None:
    time = FakeTime()
    calls, attempt = failing([Unavailable("down")])
    with pytest.raises(Unavailable):
        call_with_retries(attempt, NO_RETRIES, 110.0, sleep=time.sleep, clock=time.clock)
    assert calls == [1]


def test_a_passed_deadline_is_deadline_exceeded() -> None:
    with pytest.raises(DeadlineExceeded):
        remaining_s(99.0, clock=lambda: 100.0)
    time = FakeTime()
    calls, attempt = failing([])
    with pytest.raises(DeadlineExceeded):
        call_with_retries(attempt, RetryPolicy(), 100.0, sleep=time.sleep, clock=time.clock)
    assert calls == [0]


async def test_async_retries() -> None:
    errors: list[UserembedError] = [Unavailable("down")]

    async def attempt() -> str:
        if errors:
            raise errors.pop()
        return "ok"

    policy = RetryPolicy(initial_backoff_s=0.001)
    assert await call_with_retries_async(attempt, policy, float("inf")) == "ok"
