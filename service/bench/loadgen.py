"""The closed-loop load generator of the read-path benchmarks and the rows it yields.

Every target of ``bench read`` (the API, raw Redis, the client library, raw httpx,
hedged and unhedged reads) runs under it: the same tasks, the same prepared draws, the
same timing, so their rows compare. The targets compared at one level are measured in
turns (:func:`measure_in_turns`): on a shared machine whose load drifts, one target
measured after another would carry the drift into their ratio.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

Request = Callable[[Any], Awaitable[bool]]
TARGET_WIDTH = 17
_ROW = "{:<{w}} {:>4} {:>9} {:>7} {:>9} {:>8} {:>8} {:>9}"


@dataclass(frozen=True, slots=True)
class BenchRow:
    """One target at one concurrency level; latencies are per request, in milliseconds.
    ``p95_ms`` is not printed: it is what a hedge delay is chosen from."""

    target: str
    concurrency: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float
    p95_ms: float = math.nan


@dataclass(frozen=True, slots=True)
class Target:
    """What :func:`measure_in_turns` measures: a request per task, and each task's draws."""

    name: str
    requests: Sequence[Request]
    draws: Sequence[Sequence[Any]]


@dataclass(slots=True)
class _Sample:
    latencies_ns: list[npt.NDArray[np.int64]]
    errors: int = 0
    window_s: float = 0.0


async def measure(
    target: str, requests: Sequence[Request], draws: Sequence[Sequence[Any]], duration_s: float
) -> BenchRow:
    """One window of ``duration_s`` (after a warm-up) of ``requests``, one task each."""
    sample = _Sample([])
    await _run(requests, draws, duration_s, [0] * len(requests), sample)
    return _row(target, len(requests), sample)


async def measure_in_turns(
    targets: Sequence[Target], duration_s: float, rounds: int
) -> list[BenchRow]:
    """Each target ``rounds`` times for ``duration_s / rounds``, in turn (A B C A B C ...),
    each task going on through its draws, the samples pooled: a machine whose load drifts
    during the comparison weighs on every target alike."""
    samples = [_Sample([]) for _ in targets]
    offsets = [[0] * len(t.requests) for t in targets]
    for _ in range(rounds):
        for target, sample, at in zip(targets, samples, offsets, strict=True):
            await _run(target.requests, target.draws, duration_s / rounds, at, sample)
    return [_row(t.name, len(t.requests), s) for t, s in zip(targets, samples, strict=True)]


async def _run(
    requests: Sequence[Request],
    draws: Sequence[Sequence[Any]],
    duration_s: float,
    at: list[int],
    sample: _Sample,
) -> None:
    """Closed loop: each task sends its next request as soon as the previous one answers,
    until the window ends and it has counted at least one (a stall that outlasts a short
    window, on a loaded machine, still yields a sample instead of an empty row). Task
    ``i`` starts at draw ``at[i]`` and leaves there the next one."""
    start = time.perf_counter_ns()
    count_from = start + int(min(1.0, duration_s / 4) * 1e9)  # warm-up is not counted
    end = count_from + int(duration_s * 1e9)
    latencies: list[list[int]] = [[] for _ in requests]
    errors = [0] * len(requests)

    async def run(i: int) -> None:
        request, payloads, counted = requests[i], draws[i], latencies[i]
        k = at[i]
        while (t0 := time.perf_counter_ns()) < end or not counted:
            ok = await request(payloads[k % len(payloads)])
            elapsed = time.perf_counter_ns() - t0
            k += 1
            if t0 >= count_from:
                counted.append(elapsed)
                errors[i] += not ok
        at[i] = k

    await asyncio.gather(*(run(i) for i in range(len(requests))))
    sample.window_s += (time.perf_counter_ns() - count_from) / 1e9
    sample.latencies_ns += [np.asarray(x, dtype=np.int64) for x in latencies]
    sample.errors += sum(errors)


def _row(target: str, concurrency: int, sample: _Sample) -> BenchRow:
    all_ns = np.concatenate(sample.latencies_ns)
    p50, p95, p99, p999 = (
        np.percentile(all_ns, [50, 95, 99, 99.9]) / 1e6 if all_ns.size else np.full(4, np.nan)
    ).tolist()
    n = int(all_ns.size)
    return BenchRow(target, concurrency, n, sample.errors, n / sample.window_s, p50, p99, p999, p95)


def print_header(width: int = TARGET_WIDTH) -> None:
    print(
        _ROW.format(
            "target", "conc", "requests", "errors", "req/s", "p50 ms", "p99 ms", "p99.9", w=width
        )
    )


def print_row(r: BenchRow, width: int = TARGET_WIDTH) -> None:
    ms = (f"{v:.3f}" for v in (r.p50_ms, r.p99_ms, r.p999_ms))
    print(
        _ROW.format(r.target, r.concurrency, r.requests, r.errors, f"{r.rps:.0f}", *ms, w=width),
        flush=True,
    )


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


@contextlib.contextmanager
def quiet_httpx() -> Iterator[None]:
    """httpx logs every request at INFO, which the CLI's logging shows: not while
    measuring (the log lines would be most of the load generator's work)."""
    logger = logging.getLogger("httpx")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
