"""The open-loop schedule: latency counts from the due time, errors are counted by kind."""

from __future__ import annotations

import asyncio

from service.evaluation.open_loop import open_loop


def test_errors_are_counted_by_kind_and_have_no_latency() -> None:
    async def send(request: str) -> bool:
        if request == "refused":
            raise ConnectionError("refused")
        if request == "slow":
            await asyncio.sleep(1.0)
        return request != "missing"

    requests = ["ok", "refused", "refused", "slow", "missing", "ok"]
    run = asyncio.run(open_loop(send, requests, rate=200.0, timeout_s=0.1))

    assert run.sent == 6
    assert run.errors == {"ConnectionError": 2, "timeout": 1, "bad answer": 1}
    assert len(run.latencies_ms) == 2


def test_time_queued_behind_a_slow_answer_counts() -> None:
    """A server that answers one request at a time in 50 ms, asked every 10 ms: the k-th
    request cannot be answered before (k + 1) * 50 ms after the first is due, so its
    latency from its own due time is at least (k + 1) * 50 - k * 10 ms. A closed-loop
    client would report about 50 ms for each (coordinated omission)."""
    server = asyncio.Lock()

    async def send(_: int) -> bool:
        async with server:
            await asyncio.sleep(0.05)
        return True

    run = asyncio.run(open_loop(send, list(range(5)), rate=100.0, timeout_s=5.0))

    assert run.errors == {}
    for k, latency in enumerate(sorted(run.latencies_ms)):
        assert latency >= (k + 1) * 50 - k * 10 - 1  # 1 ms of timer slack
