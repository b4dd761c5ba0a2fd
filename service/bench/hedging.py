"""Hedged reads when one of two server processes is slow: ``AsyncClient.get`` with
``hedge_after_s`` off and on, over HTTP to ``serve --workers 2`` while one worker is
paused in a duty cycle.

How the process is made slow: a helper process sends it SIGSTOP, then SIGCONT
``SLOW_STOP_S`` later, every ``SLOW_PERIOD_S`` (50 ms of every 200 ms: a stall like a
long GC pause or a container's CPU quota running out). Requests on its connections wait
for the end of the pause; the other process answers as usual. The helper is a process of
its own, not a thread of the load generator, whose busy event loop holds the GIL and
would blur the pauses. The paused process is resumed (SIGCONT) when the cycle ends,
however it ends.

Why a hedge can escape the pause: the client (httpx) pools its connections and the
kernel spreads them over both processes (SO_REUSEPORT hashes each new connection). A
request stuck on the paused process keeps its connection busy, so its hedge goes out on
another one: an idle connection (the paused process's are soon all busy with stuck
requests) or a new one, which lands on either process. The pool holds 2 x concurrency
connections (at least the client's default, 32), so a hedge never waits for one; it is
shared by the rows, so each starts from the connections the last one left; and the
process paused is the one holding most of them after the first row (at least half the
load, whatever the kernel's hash did with few connections).

Four rows, the same draws, one after the other (not in turns: each row is a state of the
pool and of the paused process): unhedged with both processes healthy (its p95 is the
hedge delay unless one is given, as docs/client.md advises: near the healthy p95-p99);
one process paused, unhedged and hedged; hedged with both healthy (what hedging costs
when nothing is slow). At a low concurrency by default (4): the load generator is a
Python client, CPU-bound with httpx, and at higher concurrency its own queueing makes
the healthy tail as long as the pauses. Printed, never asserted.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from service.bench.client import CLIENT_TIMEOUT_S
from service.bench.loadgen import BenchRow, Request, measure, print_row, ratio
from userembed import AsyncClient, UserembedError
from userembed.http_transport import AsyncHttpTransport
from userembed.results import Embedding, ModelInfo
from userembed.transport import Query

SLOW_STOP_S: Final = 0.05
SLOW_PERIOD_S: Final = 0.2
# The pause cycle, run by its own interpreter: pid, stop seconds, period seconds. When it
# ends it writes how long each pause really lasted (a starved helper pauses longer).
_CYCLE: Final = """
import os, signal, sys, time
pid, stop_s, period_s = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
parent = os.getppid()
paused = []
def resume(*_):
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
    sys.stdout.write(" ".join(f"{s:.6f}" for s in paused))
    sys.stdout.flush()
    os._exit(0)
signal.signal(signal.SIGTERM, resume)
try:
    while os.getppid() == parent:  # the load generator gone (killed): stop pausing
        os.kill(pid, signal.SIGSTOP)
        t = time.monotonic()
        time.sleep(stop_s)
        os.kill(pid, signal.SIGCONT)
        paused.append(time.monotonic() - t)
        time.sleep(period_s - stop_s)
except ProcessLookupError:
    pass
resume()
"""


@dataclass
class Pauses:
    """How long each pause of a :func:`paused_periodically` block really lasted."""

    seconds: list[float] = field(default_factory=list)

    def summary(self) -> str:
        if not self.seconds:
            return "no pause"
        mean_ms, max_ms = 1e3 * sum(self.seconds) / len(self.seconds), 1e3 * max(self.seconds)
        return f"{len(self.seconds)} pauses of {mean_ms:.0f} ms on average, {max_ms:.0f} at most"


@contextlib.contextmanager
def paused_periodically(pid: int, stop_s: float, period_s: float) -> Iterator[Pauses]:
    """``pid`` stopped ``stop_s`` of every ``period_s`` until the block exits, then
    running again; the :class:`Pauses` are filled in when the block exits."""
    if not 0 < stop_s < period_s:
        raise ValueError(f"need 0 < stop_s < period_s, got {stop_s}, {period_s}")
    cycle = subprocess.Popen(
        [sys.executable, "-I", "-c", _CYCLE, str(pid), str(stop_s), str(period_s)],
        stdout=subprocess.PIPE,
    )
    pauses = Pauses()
    try:
        yield pauses
    finally:
        cycle.terminate()
        try:
            out, _ = cycle.communicate(timeout=5)
            pauses.seconds = [float(s) for s in out.split()]
        except subprocess.TimeoutExpired:
            cycle.kill()
            cycle.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)  # whatever state the cycle was in when it ended


def connections_by_process(pids: Sequence[int], port: int) -> list[int]:
    """Per process, its established TCP connections on local ``port`` (its socket inodes
    matched against /proc/net/tcp{,6})."""
    established: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    established.add(fields[9])  # 01: ESTABLISHED; field 9: the inode
    counts = []
    for pid in pids:
        n = 0
        with contextlib.suppress(OSError):
            for fd in os.scandir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(fd.path)
                    n += link.startswith("socket:[") and link[8:-1] in established
        counts.append(n)
    return counts


class _CountingTransport:
    """The client's HTTP transport, counting the requests it sends (hedges included)."""

    def __init__(self, inner: AsyncHttpTransport) -> None:
        self._inner = inner
        self.sent = 0

    async def get(self, user_id: str, query: Query, timeout_s: float) -> Embedding:
        self.sent += 1
        return await self._inner.get(user_id, query, timeout_s)

    async def batch_get(
        self, user_ids: Sequence[str], query: Query, timeout_s: float
    ) -> list[Embedding]:
        self.sent += 1
        return await self._inner.batch_get(user_ids, query, timeout_s)

    async def list_models(self, timeout_s: float) -> list[ModelInfo]:
        return await self._inner.list_models(timeout_s)

    async def aclose(self) -> None:
        await self._inner.aclose()


class _Reads:
    """``AsyncClient.get`` rows over one shared, counting HTTP transport, so that every
    row starts from the connections the previous one left in the pool."""

    def __init__(self, port: int, c: int) -> None:
        self.url = f"http://127.0.0.1:{port}"
        inner = AsyncHttpTransport(self.url, max_connections=max(32, 2 * c))
        self.transport = _CountingTransport(inner)
        self.denied = 0  # hedges the last row's client did not send (its hedge budget)

    async def row(
        self,
        target: str,
        hedge_after_s: float | None,
        draws: Sequence[Sequence[str]],
        duration_s: float,
    ) -> tuple[BenchRow, float]:
        """The row at ``len(draws)`` tasks, and the share of calls that sent a hedge."""
        client = AsyncClient(
            self.url,
            timeout=CLIENT_TIMEOUT_S,
            hedge_after_s=hedge_after_s,
            transport=self.transport,
        )  # not closed: that would close the shared transport (nothing else to close)
        calls, sent = 0, self.transport.sent

        async def get(user_id: str) -> bool:
            nonlocal calls
            calls += 1
            try:
                return (await client.get(user_id)).status == "fresh"
            except UserembedError:
                return False

        requests: list[Request] = [get] * len(draws)
        row = await measure(target, requests, draws, duration_s)
        self.denied = client.hedge_budget.denied
        return row, (self.transport.sent - sent - calls) / max(calls, 1)

    async def aclose(self) -> None:
        await self.transport.aclose()


async def hedge_section(
    port: int,
    pids: Sequence[int],
    draws: Sequence[Sequence[str]],
    duration_s: float,
    hedge_after_ms: float | None,
    width: int,
) -> list[BenchRow]:
    """The four rows (see the module's docstring), printed with the ratios of the two
    slow ones."""
    if len(pids) != 2:
        raise ValueError(f"hedging needs two server processes, got pids {list(pids)}")
    print(
        "hedging: AsyncClient.get over HTTP to serve --workers 2, the process with most of"
        f" the pool's connections paused {SLOW_STOP_S * 1e3:.0f} ms of every"
        f" {SLOW_PERIOD_S * 1e3:.0f} ms (SIGSTOP/SIGCONT)"
    )
    reads = _Reads(port, len(draws))
    try:
        off_healthy, _ = await reads.row("hedge-off-healthy", None, draws, duration_s)
        print_row(off_healthy, width)
        # the process holding most of the pool's connections: at least half the load
        spread = connections_by_process(pids, port)
        paused = pids[spread.index(max(spread))]
        delay_s = (off_healthy.p95_ms if hedge_after_ms is None else hedge_after_ms) / 1e3
        with paused_periodically(paused, SLOW_STOP_S, SLOW_PERIOD_S) as off_pauses:
            off_slow, _ = await reads.row("hedge-off-slow", None, draws, duration_s)
        print_row(off_slow, width)
        with paused_periodically(paused, SLOW_STOP_S, SLOW_PERIOD_S) as on_pauses:
            on_slow, slow_share = await reads.row("hedge-on-slow", delay_s, draws, duration_s)
            slow_denied = reads.denied
        print_row(on_slow, width)
        on_healthy, healthy_share = await reads.row("hedge-on-healthy", delay_s, draws, duration_s)
        print_row(on_healthy, width)
    finally:
        await reads.aclose()
    why = "the p95 of hedge-off-healthy" if hedge_after_ms is None else "given"
    print(
        f"  hedge_after_s={delay_s:.4f} ({why}); the paused process had {max(spread)} of the"
        f" pool's {sum(spread)} connections; hedges sent for {slow_share:.1%} of calls slow"
        f" ({slow_denied} more denied by the client's hedge budget),"
        f" {healthy_share:.1%} healthy; hedge-off-slow saw {off_pauses.summary()},"
        f" hedge-on-slow {on_pauses.summary()}",
        flush=True,
    )
    print(
        f"  hedge-on-slow vs hedge-off-slow: p50 x{ratio(on_slow.p50_ms, off_slow.p50_ms)}"
        f" p99 x{ratio(on_slow.p99_ms, off_slow.p99_ms)}"
        f" p99.9 x{ratio(on_slow.p999_ms, off_slow.p999_ms)}"
        f" req/s x{ratio(on_slow.rps, off_slow.rps)}",
        flush=True,
    )
    return [off_healthy, off_slow, on_slow, on_healthy]
