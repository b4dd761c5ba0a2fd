"""What the store benchmark counts: the requests the client writes, and the Redis servers'
CPU, commands and memory (INFO), around each timed measurement."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlparse

import numpy as np
import redis
from redis.asyncio.connection import AbstractConnection
from redis.cluster import RedisCluster as SyncRedisCluster

from service.bench.store_rows import OpRow
from service.store.redis_server import LocalCluster

# INFO memory fields that are buffers, not data: left out of the per-user delta
_BUFFERS: Final = (
    "mem_clients_normal",
    "mem_clients_slaves",
    "mem_replication_backlog",
    "mem_cluster_links",
    "mem_aof_buffer",
)
# commands of the measurement itself and of replication, not of the store
_NOT_COUNTED: Final = ("cmdstat_info", "cmdstat_replconf", "cmdstat_wait", "cmdstat_ping")


# --- counting what the client sends ----------------------------------------------


class _Requests:
    """Requests written by any asyncio redis connection in this process."""

    count = 0


@contextlib.contextmanager
def counting_requests() -> Iterator[None]:
    original = AbstractConnection.send_packed_command

    async def counted(self: AbstractConnection, command: Any, check_health: bool = True) -> None:
        _Requests.count += 1
        await original(self, command, check_health)

    AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]
    try:
        yield
    finally:
        AbstractConnection.send_packed_command = original  # type: ignore[method-assign]


# --- the servers -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Counters:
    primary_cpu_s: float
    replica_cpu_s: float
    commands: int


class Topology:
    """One deployment under test, inspected with plain synchronous clients."""

    def __init__(self, name: str, url: str, primaries: list[int], replicas: list[int]) -> None:
        self.name, self.url = name, url
        self.primaries, self.replicas = primaries, replicas
        self._clients = {p: redis.Redis(port=p) for p in [*primaries, *replicas]}
        self.idle_primary_cpu = self.idle_replica_cpu = 0.0  # CPU seconds per second

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    def _cpu(self, port: int) -> float:
        info = self._clients[port].info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def counters(self) -> _Counters:
        commands = 0
        for port in self.primaries:
            stats = self._clients[port].info("commandstats")
            commands += sum(int(v["calls"]) for k, v in stats.items() if k not in _NOT_COUNTED)
        return _Counters(
            sum(self._cpu(p) for p in self.primaries),
            sum(self._cpu(p) for p in self.replicas),
            commands,
        )

    def calibrate_idle(self, seconds: float) -> None:
        before, started = self.counters(), time.perf_counter()
        time.sleep(seconds)
        after, elapsed = self.counters(), time.perf_counter() - started
        self.idle_primary_cpu = max(0.0, after.primary_cpu_s - before.primary_cpu_s) / elapsed
        self.idle_replica_cpu = max(0.0, after.replica_cpu_s - before.replica_cpu_s) / elapsed

    def flush(self) -> None:
        for port in self.primaries:
            self._clients[port].flushall()
        self.wait_replicas()

    def wait_replicas(self) -> None:
        if self.replicas:
            for port in self.primaries:
                self._clients[port].wait(1, 10_000)

    def memory(self, ports: Sequence[int]) -> int:
        """used_memory less client, replication and cluster-link buffers, summed."""
        total = 0
        for port in ports:
            info = self._clients[port].info("memory")
            total += int(info["used_memory"]) - sum(int(info.get(k, 0)) for k in _BUFFERS)
        return total

    @contextlib.contextmanager
    def inspector(self) -> Iterator[redis.Redis | SyncRedisCluster]:
        """A client that routes single-key commands to the owning node."""
        client: redis.Redis | SyncRedisCluster
        if self.name == "cluster":
            client = SyncRedisCluster(host="127.0.0.1", port=self.primaries[0])
        else:
            client = redis.Redis(port=self.primaries[0])
        try:
            yield client
        finally:
            client.close()

    def redis_version(self) -> str:
        return str(self._clients[self.primaries[0]].info("server").get("redis_version", "?"))


def single_topology(url: str) -> Topology:
    port = urlparse(url).port
    if port is None:
        raise ValueError(f"no port in {url}")
    return Topology("single", url, [port], [])


def cluster_topology(cluster: LocalCluster) -> Topology:
    primaries = cluster.primaries()
    replicas = [p for p in cluster.ports if p not in primaries]
    return Topology("cluster", cluster.url, primaries, replicas)


# --- measuring ---------------------------------------------------------------


Op = Callable[[], Awaitable[int]]
"""One operation; returns the units it did (0: nothing left to do, the window ends)."""


async def measure(
    topology: Topology,
    section: str,
    name: str,
    unit: str,
    op: Op,
    seconds: float,
    concurrency: int = 1,
    warm_up: int = 2,
    refill: Callable[[], Awaitable[None]] | None = None,
) -> OpRow:
    """Run ``op`` from ``concurrency`` tasks for ``seconds`` (closed loop), after a
    warm-up that opens the connections; count requests, commands and CPU. When ``op``
    runs out of work, ``refill`` (if given) runs outside the window, then it goes on.

    Per row: rate and wall time per unit, latency per operation, the requests the client
    wrote per operation (counted at the connection: one command or one pipeline to one
    node; on a cluster the ones to different nodes go out concurrently), the commands
    Redis executed per operation (``INFO commandstats``, including those inside Lua
    scripts), and CPU per unit: Redis primaries and replicas (``INFO cpu``, less their
    idle rate) and this client process."""
    for _ in range(warm_up):
        await asyncio.gather(*(op() for _ in range(concurrency)))
    latencies: list[float] = []
    done = {"ops": 0, "units": 0, "requests": 0, "commands": 0, "refills": 0}
    spent = client_s = primary_s = replica_s = 0.0
    exhausted = False
    while spent < seconds:
        before, requests0, cpu0 = topology.counters(), _Requests.count, time.process_time()
        started = time.perf_counter()
        end = started + seconds - spent
        exhausted = False

        async def loop(end: float = end) -> None:
            nonlocal exhausted
            while not exhausted and (t0 := time.perf_counter()) < end:
                units = await op()
                if units == 0:
                    exhausted = True
                    break
                latencies.append(time.perf_counter() - t0)
                done["ops"] += 1
                done["units"] += units

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
        client_s += time.process_time() - cpu0
        done["requests"] += _Requests.count - requests0
        after = topology.counters()
        done["commands"] += after.commands - before.commands
        primary_s += after.primary_cpu_s - before.primary_cpu_s
        primary_s -= topology.idle_primary_cpu * elapsed
        replica_s += after.replica_cpu_s - before.replica_cpu_s
        replica_s -= topology.idle_replica_cpu * elapsed
        spent += elapsed
        if not exhausted or refill is None:
            break
        await refill()
        done["refills"] += 1
        exhausted = False
    ops, units = max(done["ops"], 1), max(done["units"], 1)
    p50, p99 = np.percentile(np.asarray(latencies or [0.0]) * 1e6, [50, 99]).tolist()
    return OpRow(
        section=section,
        op=name,
        topology=topology.name,
        unit=unit,
        concurrency=concurrency,
        ops=done["ops"],
        units=done["units"],
        seconds=spent,
        units_per_s=done["units"] / spent,
        us_per_unit=spent * 1e6 / units,
        p50_us=p50,
        p99_us=p99,
        requests_per_op=done["requests"] / ops,
        commands_per_op=done["commands"] / ops,
        server_us_per_unit=max(0.0, primary_s) * 1e6 / units,
        replica_us_per_unit=max(0.0, replica_s) * 1e6 / units,
        client_us_per_unit=client_s * 1e6 / units,
        exhausted=exhausted,
        refills=done["refills"],
    )
