"""Freshness probes: the time from producing an event to the API serving an embedding
that includes it, measured from outside, the way a ranker would see it.

Each probe user (disjoint from the background users, written only by the prober) gets
one event at a time. The time is taken just before the event is handed to the Kafka
producer; one poller asks the API's batchGet for every user with an outstanding probe
every ``poll_s`` and resolves a probe when the served ``feature_version`` passes the
one seen before it: an applied batch bumps the version, so the first such answer is
the first served embedding that includes the event. A probe not served within
``timeout_s`` is counted as a timeout and its user is retired: the slot goes on with a
new user id, never written before (baseline 0), so the late event of the timed-out
probe cannot end the next probe early and pass for a fast one.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

import orjson

from service.bench.read import KeepAliveHttp, batch_request
from service.core.clock import now_ms
from service.core.events import Event, EventType, encode_event
from service.ingest.kafka import KafkaEventSink

MAX_GAP_S = 0.05  # random pause between a user's probes, so probes do not sync with batches
VERSION_READ_ATTEMPTS = 5
RETIRED_MARK = ".r"  # probe-3 -> probe-3.r1 -> probe-3.r2 after each timeout


@dataclass(slots=True)
class ProbeRun:
    """What one probe window measured."""

    latencies_ms: list[float] = field(default_factory=list)
    timeouts: int = 0
    produced: int = 0


@dataclass(slots=True)
class _Outstanding:
    t0_ns: int
    served: asyncio.Future[int]  # resolves to the perf_counter_ns of the first answer


class Prober:
    """Owns the probe users' baselines across windows; one window at a time."""

    def __init__(
        self,
        sink: KafkaEventSink,
        api_port: int,
        users: Sequence[str],
        *,
        poll_s: float,
        timeout_s: float,
        seed: int = 0,
    ) -> None:
        self._sink = sink
        self._poll_http = KeepAliveHttp(api_port)
        self._users = list(users)  # one slot each; a slot's current user id changes on timeout
        self._poll_s = poll_s
        self._timeout_s = timeout_s
        self._rng = random.Random(seed)
        self._seen: dict[str, int] = {}
        self._outstanding: dict[str, _Outstanding] = {}
        self._items = 0

    async def start(self) -> None:
        """Read every probe user's served version (0: none yet) as the first baseline."""
        self._seen = await self._versions(self._users)

    async def run(self, duration_s: float, *, first_only: bool = False) -> ProbeRun:
        """Probe for ``duration_s`` (``first_only``: one probe per user, however long).

        New probes start only inside the window; those outstanding at its end still
        finish (or time out), so slow probes are never dropped from the tail."""
        result = ProbeRun()
        end = time.monotonic() + duration_s
        poller = asyncio.create_task(self._poll(), name="probe-poller")
        try:
            await asyncio.gather(
                *(
                    self._probe_loop(slot, end, first_only, result)
                    for slot in range(len(self._users))
                )
            )
        finally:
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)
        return result

    async def close(self) -> None:
        await self._poll_http.close()

    async def _probe_loop(self, slot: int, end: float, first_only: bool, result: ProbeRun) -> None:
        loop = asyncio.get_running_loop()
        while first_only or time.monotonic() < end:
            user = self._users[slot]
            if not first_only:
                await asyncio.sleep(self._rng.uniform(0.0, MAX_GAP_S))
                if time.monotonic() >= end:
                    return
            probe = _Outstanding(0, loop.create_future())
            self._outstanding[user] = probe
            probe.t0_ns = time.perf_counter_ns()
            self._sink.produce_nowait(user, self._event(user))
            result.produced += 1
            try:
                served_ns = await asyncio.wait_for(probe.served, self._timeout_s)
            except TimeoutError:
                result.timeouts += 1
                self._outstanding.pop(user, None)
                self._users[slot] = _retired(user)  # never written: its baseline is 0
            else:
                result.latencies_ms.append((served_ns - probe.t0_ns) / 1e6)
            if first_only:
                return

    def _event(self, user: str) -> bytes:
        self._items += 1
        event = Event(
            event_id=uuid.uuid4().hex,
            user_id=user,
            ts=now_ms(),
            type=EventType.CLICK,
            item_id=f"probe-item-{self._items}",
            category="probe",
        )
        return encode_event(event)

    async def _poll(self) -> None:
        while True:
            users = list(self._outstanding)
            if users:
                answer = await self._poll_http.fetch(batch_request(users, "base64_float16"))
                seen_ns = time.perf_counter_ns()
                if answer is not None and answer[0] == 200:
                    self._resolve(orjson.loads(answer[1])["embeddings"], seen_ns)
            await asyncio.sleep(self._poll_s)

    def _resolve(self, embeddings: list[dict[str, object]], seen_ns: int) -> None:
        for answer in embeddings:
            user, version = str(answer["user_id"]), _version(answer)
            if version > self._seen.get(user, 0):
                self._seen[user] = version
                probe = self._outstanding.pop(user, None)
                if probe is not None and not probe.served.done():
                    probe.served.set_result(seen_ns)

    async def _versions(self, users: Sequence[str]) -> dict[str, int]:
        request = batch_request(users, "base64_float16")
        answer = None
        for attempt in range(VERSION_READ_ATTEMPTS):
            # a keep-alive connection idle past the server's timeout fails once, then
            # reconnects; an overloaded API may need a moment
            answer = await self._poll_http.fetch(request)
            if answer is not None and answer[0] == 200:
                return {
                    str(a["user_id"]): _version(a) for a in orjson.loads(answer[1])["embeddings"]
                }
            await asyncio.sleep(0.05 * (attempt + 1))
        raise RuntimeError(f"batchGet of the probe users failed: {answer!r}")


def _retired(user: str) -> str:
    """The next id of a probe slot whose user timed out."""
    base, mark, generation = user.partition(RETIRED_MARK)
    return f"{base}{RETIRED_MARK}{int(generation) + 1 if mark else 1}"


def _version(answer: dict[str, object]) -> int:
    version = answer.get("feature_version")
    return version if isinstance(version, int) else 0
