"""``userembed bench grpc``: gRPC server candidates next to the HTTP path, per process.

Redis is filled with real records (as ``bench read`` does); ``userembed serve`` gives
the HTTP baseline and each candidate of :mod:`service.bench.grpc_candidates` runs as
its own process over the same Redis and registry (idle while the others are measured).
One load generator measures, at each concurrency, HTTP then every candidate:
GetEmbedding vs GET, and BatchGetEmbeddings vs batchGet with base64 float16 vectors,
both of ``batch_size`` users, the same draws for all. gRPC calls go over ``channels``
grpc.aio channels (a connection each), tasks spread over them round-robin; answers are
counted, not parsed. ``rounds`` repeats it all, interleaved: the summary is the median
of each round's ratios to that round's HTTP rows (seconds apart), which a shared,
noisy machine needs. Next to each row: the CPU its server process used (cores, and
microseconds a call) and the load generator's, so a row limited by the load generator
shows as such. Printed, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Final, Literal

import grpc
import numpy as np
import uvloop

from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.bench.api_process import populate, wait_ready
from service.bench.grpc_candidates import CANDIDATES, available
from service.bench.grpc_messages import encoding_costs, sample_answers
from service.bench.loadgen import measure, print_row
from service.bench.provenance import commit_id
from service.bench.read import (
    BATCH_DRAWS_PER_TASK,
    BATCH_METHOD,
    DRAWS_PER_TASK,
    GET_METHOD,
    BenchRow,
    KeepAliveHttp,
    Request,
    batch_request,
    grpc_call,
)
from service.store.redis_server import free_port, private_redis, stop_process

Kind = Literal["get", "batch"]
HTTP: Final = "http"
_CHANNEL_OPTIONS: Final = [("grpc.use_local_subchannel_pool", 1)]  # a connection a channel


@dataclass(frozen=True, slots=True)
class GrpcBenchConfig:
    """What to measure; ``redis_url=None`` starts a private redis-server for the run."""

    redis_url: str | None = None
    concurrency: Sequence[int] = (8, 32)
    duration_s: float = 5.0
    users: int = 10_000
    batch_size: int = 100
    candidates: Sequence[str] = tuple(CANDIDATES)
    channels: int = 4
    rounds: int = 1


@dataclass(frozen=True, slots=True)
class GrpcRow:
    """One target (``http`` or a candidate) at one concurrency, with the CPU used while
    it was measured: by its server process and by the load generator, in cores."""

    server: str
    kind: Kind
    row: BenchRow
    batch_size: int
    server_cores: float
    client_cores: float
    turn: int = 0

    @property
    def server_us_per_call(self) -> float:
        return self.server_cores / self.row.rps * 1e6 if self.row.rps else float("nan")

    @property
    def us_per_user(self) -> float:
        """Wall time per user served (1 / users/s)."""
        return 1e6 / (self.row.rps * self.batch_size) if self.row.rps else float("nan")


@dataclass
class _Server:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    stderr: IO[bytes] = field(repr=False)


def run_grpc_bench(config: GrpcBenchConfig) -> list[GrpcRow]:
    """Populate Redis, start ``serve`` and every candidate, measure, print a table."""
    if not config.concurrency or min(config.concurrency) < 1:
        raise ValueError(f"concurrency levels must be >= 1, got {list(config.concurrency)}")
    if config.duration_s <= 0 or config.users < 1 or config.batch_size < 1:
        raise ValueError(f"need duration_s > 0, users >= 1, batch_size >= 1, got {config}")
    if config.channels < 1 or config.rounds < 1:
        raise ValueError(f"channels and rounds must be >= 1, got {config}")
    unknown = set(config.candidates) - CANDIDATES.keys()
    if unknown:
        raise ValueError(f"unknown candidates {sorted(unknown)}: choose from {list(CANDIDATES)}")
    from models.standin import publish_standin  # pulls in onnx: imported on use

    with contextlib.ExitStack() as stack:
        url = config.redis_url or stack.enter_context(private_redis())
        registry = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="userembed-bench-")))
        uvloop.run(populate(url, config.users))
        publish_standin(registry)
        env = _server_env(url, registry)
        http_port = free_port()
        serve = ["-m", "service.cli", "serve", "--port", str(http_port), "--grpc-port", "0"]
        http = stack.enter_context(_process(HTTP, http_port, serve, env))
        wait_ready(http.process, http_port, http.stderr)
        servers = [http]
        for name in available(config.candidates):
            port = free_port()
            command = ["-m", "service.bench.grpc_candidates", name, str(port)]
            servers.append(stack.enter_context(_process(name, port, command, env)))
        return uvloop.run(_bench(servers, config))


def _server_env(redis_url: str, registry: Path) -> dict[str, str]:
    """Every server's settings: the bench data, read as fresh, no event intake."""
    env = {k: v for k, v in os.environ.items() if k != "USEREMBED_API_KEYS"}
    env.update(
        USEREMBED_REDIS_URL=redis_url,
        USEREMBED_REGISTRY_PATH=str(registry),
        USEREMBED_REFRESH_AFTER_S="86400",  # no refresh writes to disturb the comparison
        USEREMBED_API_EVENTS_ENABLED="false",
    )
    return env


@contextlib.contextmanager
def _process(name: str, port: int, args: list[str], env: dict[str, str]) -> Iterator[_Server]:
    # stderr to a file, not a pipe: a pipe nobody reads could fill and stall the server
    with tempfile.TemporaryFile() as stderr:
        command = [sys.executable, *args]
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            yield _Server(name, port, process, stderr)
        finally:
            stop_process(process)


async def _wait_grpc_ready(server: _Server, timeout_s: float = 30.0) -> None:
    """Poll GetEmbedding(u0) until it answers the bench record (fresh)."""
    deadline = time.monotonic() + timeout_s
    request = pb.GetEmbeddingRequest(user_id="u0")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        get = channel.unary_unary(
            GET_METHOD,
            request_serializer=pb.GetEmbeddingRequest.SerializeToString,
            response_deserializer=pb.Embedding.FromString,
        )
        while server.process.poll() is None and time.monotonic() < deadline:
            try:
                answer = await get(request, timeout=1.0)
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.1)
                continue
            if answer.status != pb.STATUS_FRESH:
                raise RuntimeError(f"{server.name} serves u0 as {answer}, not the bench record")
            return
    server.stderr.seek(0)
    code = server.process.poll()
    why = f"not ready within {timeout_s}s" if code is None else f"exited with {code}"
    log = server.stderr.read().decode(errors="replace").strip()
    raise RuntimeError(f"candidate {server.name} {why}; its stderr:\n{log}")


def _cpu_seconds(pid: int) -> float:
    """User + system CPU of process ``pid`` (all its threads), from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rpartition(b")")[2].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Undecoded:
    """Answers are counted, not parsed: the load generator stays cheap."""

    @staticmethod
    def FromString(data: bytes) -> bytes:
        return data


async def _measured(
    server: _Server,
    kind: Kind,
    requests: Sequence[Request],
    draws: Sequence[Sequence[object]],
    config: GrpcBenchConfig,
    turn: int,
) -> GrpcRow:
    n = config.batch_size if kind == "batch" else 1
    target = (server.name if kind == "get" else f"{server.name}-b{n}") + (
        "-f16" if server.name == HTTP and kind == "batch" else ""
    )
    wall, cpu, own = time.perf_counter(), _cpu_seconds(server.process.pid), time.process_time()
    row = await measure(target, requests, draws, config.duration_s)
    wall = time.perf_counter() - wall
    server_cores = (_cpu_seconds(server.process.pid) - cpu) / wall
    client_cores = (time.process_time() - own) / wall
    return GrpcRow(server.name, kind, row, n, server_cores, client_cores, turn)


@dataclass(frozen=True, slots=True)
class _Draws:
    """The requests of every task at one concurrency, the same for every target (the same
    users, in the same order), prepared once."""

    ids: list[list[str]]
    bodies: list[list[bytes]]
    gets: list[list[pb.GetEmbeddingRequest]]
    batches: list[list[pb.BatchGetEmbeddingsRequest]]

    @classmethod
    def draw(cls, c: int, config: GrpcBenchConfig) -> _Draws:
        rng = np.random.default_rng(c)
        ids = [[f"u{i}" for i in r] for r in rng.integers(0, config.users, (c, DRAWS_PER_TASK))]
        shape = (c, BATCH_DRAWS_PER_TASK, config.batch_size)
        groups = [[[f"u{i}" for i in g] for g in r] for r in rng.integers(0, config.users, shape)]
        f16 = pb.ENCODING_FLOAT16
        return cls(
            ids,
            [[batch_request(g, "base64_float16") for g in row] for row in groups],
            [[pb.GetEmbeddingRequest(user_id=u) for u in row] for row in ids],
            [[pb.BatchGetEmbeddingsRequest(user_ids=g, encoding=f16) for g in r] for r in groups],
        )


async def _http_rows(
    server: _Server, draws: _Draws, config: GrpcBenchConfig, turn: int
) -> list[GrpcRow]:
    clients = [KeepAliveHttp(server.port) for _ in draws.ids]
    try:
        gets = [h.get_embedding for h in clients]
        get = await _measured(server, "get", gets, draws.ids, config, turn)
        batches = [h.batch_get for h in clients]
        batch = await _measured(server, "batch", batches, draws.bodies, config, turn)
    finally:
        await asyncio.gather(*(h.close() for h in clients))
    return [get, batch]


async def _grpc_rows(
    server: _Server, draws: _Draws, config: GrpcBenchConfig, turn: int
) -> list[GrpcRow]:
    address = f"127.0.0.1:{server.port}"
    tasks = range(len(draws.ids))
    channels = [
        grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        for _ in range(min(config.channels, len(tasks)))
    ]
    try:
        gets = [grpc_call(channels[i % len(channels)], GET_METHOD, _Undecoded) for i in tasks]
        get = await _measured(server, "get", gets, draws.gets, config, turn)
        batches = [grpc_call(channels[i % len(channels)], BATCH_METHOD, _Undecoded) for i in tasks]
        batch = await _measured(server, "batch", batches, draws.batches, config, turn)
    finally:
        await asyncio.gather(*(ch.close() for ch in channels))
    return [get, batch]


async def _bench(servers: Sequence[_Server], config: GrpcBenchConfig) -> list[GrpcRow]:
    for server in servers[1:]:
        await _wait_grpc_ready(server)
    costs = encoding_costs(await sample_answers(config.batch_size))
    _print_header(config, [s.name for s in servers[1:]], costs)
    draws = {c: _Draws.draw(c, config) for c in config.concurrency}
    rows: list[GrpcRow] = []
    for turn in range(config.rounds):
        if config.rounds > 1:
            print(f"round {turn + 1} of {config.rounds}")
        for c in config.concurrency:
            http = await _http_rows(servers[0], draws[c], config, turn)
            for row in http:
                _print(row, None)
            rows += http
            for server in servers[1:]:
                measured = await _grpc_rows(server, draws[c], config, turn)
                for row, base in zip(measured, http, strict=True):
                    _print(row, base)
                    rows.append(row)
    _print_summary(rows, config)
    return rows


def _print_header(
    config: GrpcBenchConfig, candidates: Sequence[str], costs: tuple[float, float]
) -> None:
    versions = " ".join(
        f"{name}={_version(name)}" for name in ("grpcio", "protobuf", "grpclib", "uvloop")
    )
    print(
        f"userembed bench grpc  commit={commit_id()}  python={platform.python_version()}"
        f"  cpus={os.cpu_count()}  {versions}  users={config.users}"
        f"  duration={config.duration_s}s  batch={config.batch_size}"
    )
    print(
        f"candidates: {', '.join(candidates)}; gRPC load: grpc.aio, {config.channels} channel(s)"
        " (a connection each), tasks round-robin; HTTP load: a keep-alive connection a task"
    )
    print(
        f"encoding {config.batch_size} answers in process (best of 5): as messages, then"
        f" copied {costs[0]:.0f} us; added in place (aio-bytes) {costs[1]:.0f} us"
    )
    print(
        "{:<17} {:>4} {:>9} {:>7} {:>9} {:>8} {:>8} {:>9}".format(
            "target", "conc", "requests", "errors", "req/s", "p50 ms", "p99 ms", "p99.9"
        )
    )


def _print(row: GrpcRow, base: GrpcRow | None) -> None:
    print_row(row.row)
    parts = []
    if base is not None:
        r, b = row.row, base.row
        parts.append(
            f"vs {b.target}: req/s x{_ratio(r.rps, b.rps)}"
            f" p50 x{_ratio(r.p50_ms, b.p50_ms)} p99 x{_ratio(r.p99_ms, b.p99_ms)}"
        )
    if row.kind == "batch":
        per_user = f"{row.us_per_user:.2f} us/user"
        if base is not None:
            per_user += f" (x{_ratio(row.us_per_user, base.us_per_user)})"
        parts.append(per_user)
    parts.append(
        f"server {row.server_cores:.2f} cores = {row.server_us_per_call:.0f} us cpu/call"
        f", load generator {row.client_cores:.2f} cores"
    )
    print("  " + " | ".join(parts), flush=True)


def _print_summary(rows: Sequence[GrpcRow], config: GrpcBenchConfig) -> None:
    """Each candidate against HTTP at each concurrency, the median over the rounds of the
    ratio to the HTTP row of the same round: GetEmbedding req/s (aim >= 0.5) and the cost
    of a user in BatchGetEmbeddings (aim <= 1.5); the server's CPU per call and per user."""
    found = {(r.server, r.kind, r.row.concurrency, r.turn): r for r in rows}
    turns = range(config.rounds)

    def median(values: Iterable[float]) -> str:
        value = float(np.median(list(values)))
        return f"{value:.2f}" if value < 100 else f"{value:.0f}"

    print(
        f"\nmedian of {config.rounds} round(s); get: req/s vs HTTP GET (aim >= 0.5), batch: "
        f"cost of a user vs HTTP batchGet (aim <= 1.5); server CPU us per call / per user"
    )
    head = ["candidate", "conc", "get x", "batch x", "cpu us/get", "cpu us/user"]
    print("{:<14} {:>4} {:>8} {:>8} {:>11} {:>12}".format(*head))
    for name in dict.fromkeys(r.server for r in rows):
        for c in config.concurrency:
            get = [found[name, "get", c, t] for t in turns]
            batch = [found[name, "batch", c, t] for t in turns]
            http_get = [found[HTTP, "get", c, t] for t in turns]
            http_batch = [found[HTTP, "batch", c, t] for t in turns]
            cells = [
                median(g.row.rps / h.row.rps for g, h in zip(get, http_get, strict=True)),
                median(
                    b.us_per_user / h.us_per_user for b, h in zip(batch, http_batch, strict=True)
                ),
                median(g.server_us_per_call for g in get),
                median(b.server_us_per_call / b.batch_size for b in batch),
            ]
            print(f"{name:<14} {c:>4} {cells[0]:>8} {cells[1]:>8} {cells[2]:>11} {cells[3]:>12}")
    sys.stdout.flush()


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"
