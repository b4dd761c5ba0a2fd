"""Read-path benchmark: the API over HTTP and gRPC next to a raw Redis read of the same
records.

All targets run under one load generator (same tasks, same user draws, same timing;
the targets of a level in turns), so the api/redis ratio is what the API adds on top of
its one Redis round trip. Single-user reads (GET / GetEmbedding / Redis GET) and batches
(batchGet with JSON numbers and with base64 float16 / BatchGetEmbeddings / Redis MGET of
``batch_size`` users) are measured at each concurrency. With several ``workers`` counts,
each runs its own ``userembed serve --workers N``, and its rows, labelled ``[wN]``, are
measured beside the others' at each level. Then the client library next to raw httpx
(:mod:`service.bench.client`), and the client's reads with and without hedging while one
of two server processes is paused in a duty cycle (:mod:`service.bench.hedging`). The
numbers are printed, never asserted. With ``redis_url`` given, ``ue:u0..`` are
overwritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import orjson
import redis.asyncio as aioredis
import uvloop

from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.bench.api_process import ApiServer, api_process, populate
from service.bench.client import client_section
from service.bench.hedging import hedge_section
from service.bench.loadgen import BenchRow as BenchRow
from service.bench.loadgen import Request as Request
from service.bench.loadgen import (
    Target,
    measure_in_turns,
    print_header,
    print_row,
    quiet_httpx,
    ratio,
)
from service.bench.provenance import commit_id
from service.store.keys import DEFAULT_SHARDS, KeyLayout
from service.store.redis_server import private_redis

DRAWS_PER_TASK = 4096  # requests prepared up front per task (cycled), so the loop stays cheap
BATCH_DRAWS_PER_TASK = 256
GET_METHOD = "/userembed.v1.Embeddings/GetEmbedding"
BATCH_METHOD = "/userembed.v1.Embeddings/BatchGetEmbeddings"
WIDTH = 21  # of the target column: "api-http-b100-f16[w2]"
Draws = Sequence[Sequence[str]]  # per task, the users it reads in turn
Groups = Sequence[Sequence[list[str]]]  # per task, the batches it reads in turn

LAYOUT = KeyLayout(DEFAULT_SHARDS)  # the API process runs with the default settings


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What to measure; ``redis_url=None`` starts a private redis-server for the run.
    ``batch_size=0`` skips the batch rows. ``workers``: the ``serve --workers`` counts
    measured side by side. A level's targets are measured in turns: ``rounds`` slices of
    ``duration_s / rounds`` each. ``client``: the client library vs raw httpx rows at
    ``client_concurrency`` (None: the middle level). ``hedge``: the hedging rows at
    ``hedge_concurrency``, hedging after ``hedge_after_ms`` (None: the p95 of the same
    reads unhedged, both processes healthy)."""

    redis_url: str | None = None
    concurrency: Sequence[int] = (8, 32, 64)
    duration_s: float = 5.0
    users: int = 10_000
    batch_size: int = 100
    workers: Sequence[int] = (1,)
    rounds: int = 3
    client: bool = True
    client_concurrency: Sequence[int] | None = None
    hedge: bool = True
    hedge_concurrency: int = 4
    hedge_after_ms: float | None = None

    def __post_init__(self) -> None:
        levels = [*self.concurrency, *(self.client_concurrency or [])]
        if not self.concurrency or min(levels) < 1 or self.hedge_concurrency < 1:
            raise ValueError(f"concurrency levels must be >= 1, got {self}")
        if self.duration_s <= 0 or self.users < 1 or self.batch_size < 0 or self.rounds < 1:
            raise ValueError(
                f"need duration_s > 0, users >= 1, batch_size >= 0, rounds >= 1: {self}"
            )
        if not self.workers or min(self.workers) < 1 or len(set(self.workers)) < len(self.workers):
            raise ValueError(f"workers: distinct counts >= 1, got {list(self.workers)}")
        if self.hedge_after_ms is not None and self.hedge_after_ms < 0:
            raise ValueError(f"hedge_after_ms: >= 0 or None (the healthy p95), got {self}")

    @property
    def channels(self) -> int:
        """gRPC channels of the load (a connection each): one, as always, against one
        process; with several processes, enough that the kernel spreads them."""
        return 1 if max(self.workers) == 1 else 2 * max(self.workers)

    def label(self, target: str, workers: int) -> str:
        return f"{target}[w{workers}]" if len(self.workers) > 1 else target


def run_read_bench(config: BenchConfig) -> list[BenchRow]:
    """Populate Redis, start the API as a subprocess, measure every target, print a table."""
    # Imported here: building the stand-in pulls in onnx, which the rest of the module avoids.
    from models.standin import publish_standin

    with contextlib.ExitStack() as stack:
        url = config.redis_url or stack.enter_context(private_redis())
        registry = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="userembed-bench-")))
        uvloop.run(populate(url, config.users))
        publish_standin(registry)
        servers = {w: stack.enter_context(api_process(url, registry, w)) for w in config.workers}
        hedged = None
        if config.hedge:  # two server processes behind one port
            hedged = servers.get(2) or stack.enter_context(api_process(url, registry, 2))
        stack.enter_context(quiet_httpx())
        return uvloop.run(_bench(url, list(servers.values()), hedged, config))


class KeepAliveHttp:
    """The least an HTTP/1.1 client can do: one persistent connection, Content-Length bodies."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get_embedding(self, user_id: str) -> bool:
        """GET the user's embedding; False on a non-200 answer or a broken connection."""
        return await self._exchange(
            b"GET /v1/users/%s/embedding HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % user_id.encode()
        )

    async def batch_get(self, request: bytes) -> bool:
        """POST a prepared batchGet request (see :func:`batch_request`)."""
        return await self._exchange(request)

    async def fetch(self, request: bytes) -> tuple[int, bytes] | None:
        """Send a prepared request; its (status, body), or None on a broken connection."""
        try:
            if self._streams is None:
                self._streams = await asyncio.open_connection("127.0.0.1", self._port)
            reader, writer = self._streams
            # No drain(): the request is small and we wait for the answer before the next one.
            writer.write(request)
            head = (await reader.readuntil(b"\r\n\r\n")).lower().split(b"\r\n")
            fields = {k.strip(): v.strip() for k, v in (h.split(b":", 1) for h in head[1:-2])}
            # KeyError: no Content-Length; this client does not read chunked bodies
            body = await reader.readexactly(int(fields[b"content-length"]))
            status = int(head[0].split(b" ", 2)[1])
        except (OSError, ValueError, LookupError, asyncio.IncompleteReadError):
            await self.close()
            return None
        if fields.get(b"connection") == b"close":
            await self.close()
        return status, body

    async def _exchange(self, request: bytes) -> bool:
        answer = await self.fetch(request)
        return answer is not None and answer[0] == 200

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def batch_request(user_ids: Sequence[str], encoding: str = "json") -> bytes:
    body = orjson.dumps({"user_ids": list(user_ids), "encoding": encoding})
    head = (
        b"POST /v1/embeddings:batchGet HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
    )
    return head + body


def grpc_call(channel: grpc.aio.Channel, method: str, response: Any) -> Request:
    """A unary call on ``channel`` taking a prepared request message; False on any error."""
    call = channel.unary_unary(
        method,
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response.FromString,
    )

    async def send(message: Any) -> bool:
        try:
            await call(message)
        except grpc.aio.AioRpcError:
            return False
        return True

    return send


@contextlib.asynccontextmanager
async def _grpc_calls(
    port: int, method: str, response: Any, channels: int, c: int
) -> AsyncIterator[list[Request]]:
    """``c`` tasks' calls, round-robin over ``channels`` channels (a connection each)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    opened = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(channels)
    ]
    try:
        calls = [grpc_call(ch, method, response) for ch in opened]
        yield [calls[i % channels] for i in range(c)]
    finally:
        await asyncio.gather(*(ch.close() for ch in opened))


def _print_ratios(c: int, rows: Sequence[BenchRow], base: BenchRow) -> None:
    parts = [
        f"{r.target}: p50 x{ratio(r.p50_ms, base.p50_ms)}"
        f" p99 x{ratio(r.p99_ms, base.p99_ms)} req/s x{ratio(r.rps, base.rps)}"
        for r in rows
    ]
    print(f"  vs {base.target} c={c}: " + "  |  ".join(parts), flush=True)


async def _single_targets(
    stack: contextlib.AsyncExitStack, server: ApiServer, c: int, draws: Draws, config: BenchConfig
) -> list[Target]:
    """GET and GetEmbedding of one server at ``c``, their connections open until ``stack``
    closes."""
    http = [KeepAliveHttp(server.ports.http) for _ in range(c)]
    stack.push_async_callback(_close_all, http)
    channels = _grpc_calls(server.ports.grpc, GET_METHOD, pb.Embedding, config.channels, c)
    gets = await stack.enter_async_context(channels)
    messages = [[pb.GetEmbeddingRequest(user_id=u) for u in row] for row in draws]
    return [
        Target(config.label("api-http", server.workers), [h.get_embedding for h in http], draws),
        Target(config.label("api-grpc", server.workers), gets, messages),
    ]


async def _batch_targets(
    stack: contextlib.AsyncExitStack, server: ApiServer, c: int, groups: Groups, config: BenchConfig
) -> list[Target]:
    """batchGet (JSON numbers and base64 float16) and BatchGetEmbeddings of one server."""
    n, w = len(groups[0][0]), server.workers
    http = [KeepAliveHttp(server.ports.http) for _ in range(c)]
    stack.push_async_callback(_close_all, http)
    requests = [h.batch_get for h in http]
    channels = _grpc_calls(
        server.ports.grpc, BATCH_METHOD, pb.BatchGetEmbeddingsResponse, config.channels, c
    )
    calls = await stack.enter_async_context(channels)
    return [
        Target(config.label(f"api-http-b{n}", w), requests, _bodies(groups, "json")),
        # the same batches with base64 float16 vectors instead of JSON numbers
        Target(config.label(f"api-http-b{n}-f16", w), requests, _bodies(groups, "base64_float16")),
        Target(
            config.label(f"api-grpc-b{n}", w),
            calls,
            [[pb.BatchGetEmbeddingsRequest(user_ids=g) for g in row] for row in groups],
        ),
    ]


def _bodies(groups: Groups, encoding: str) -> list[list[bytes]]:
    return [[batch_request(g, encoding) for g in row] for row in groups]


async def _close_all(http: Sequence[KeepAliveHttp]) -> None:
    await asyncio.gather(*(h.close() for h in http))


async def _redis_get_target(
    stack: contextlib.AsyncExitStack, redis_url: str, c: int, draws: Draws
) -> Target:
    """The baseline of the single reads: Redis GET of the same users' records."""
    client = aioredis.Redis.from_url(redis_url, max_connections=c)
    stack.push_async_callback(client.aclose)
    keys = [[LAYOUT.embedding_key(u) for u in row] for row in draws]
    return Target("redis-get", [redis_get(client)] * c, keys)


async def _redis_mget_target(
    stack: contextlib.AsyncExitStack, redis_url: str, c: int, groups: Groups
) -> Target:
    """The baseline of the batches: Redis MGET of each batch's records."""
    client = aioredis.Redis.from_url(redis_url, max_connections=c)
    stack.push_async_callback(client.aclose)
    keys = [[[LAYOUT.embedding_key(u) for u in g] for g in row] for row in groups]
    return Target(f"redis-mget{len(groups[0][0])}", [redis_mget(client)] * c, keys)


def single_draws(c: int, users: int) -> list[list[str]]:
    """Per task, the users it reads, in order: the same for every target at level ``c``."""
    ids = np.random.default_rng(c).integers(0, users, (c, DRAWS_PER_TASK))
    return [[f"u{i}" for i in row] for row in ids.tolist()]


def batch_draws(c: int, users: int, batch_size: int) -> list[list[list[str]]]:
    ids = np.random.default_rng(1000 + c).integers(0, users, (c, BATCH_DRAWS_PER_TASK, batch_size))
    return [[[f"u{i}" for i in g] for g in row] for row in ids.tolist()]


async def _bench(
    redis_url: str, servers: Sequence[ApiServer], hedged: ApiServer | None, config: BenchConfig
) -> list[BenchRow]:
    info = aioredis.Redis.from_url(redis_url)
    try:
        redis_version = str((await info.info("server")).get("redis_version", "unknown"))
    finally:
        await info.aclose()
    print(
        f"userembed bench read  commit={commit_id()}  python={platform.python_version()}"
        f"  cpus={os.cpu_count()}  redis={redis_version}  users={config.users}"
        f"  duration={config.duration_s}s  batch={config.batch_size}"
        f"  workers={','.join(map(str, config.workers))}  grpc_channels={config.channels}"
    )
    print_header(WIDTH)
    rows: list[BenchRow] = []
    for c in config.concurrency:
        draws = single_draws(c, config.users)
        api = partial(_single_targets, c=c, draws=draws, config=config)
        base = partial(_redis_get_target, redis_url=redis_url, c=c, draws=draws)
        rows += await _level(c, servers, api, base, config)
    if config.batch_size:
        for c in config.concurrency:
            groups = batch_draws(c, config.users, config.batch_size)
            api = partial(_batch_targets, c=c, groups=groups, config=config)
            base = partial(_redis_mget_target, redis_url=redis_url, c=c, groups=groups)
            rows += await _level(c, servers, api, base, config)
    if config.client:
        rows += await _client_rows(servers[0], config)
    if hedged is not None:
        rows += await _hedge_rows(hedged, config)
    return rows


async def _client_rows(server: ApiServer, config: BenchConfig) -> list[BenchRow]:
    """The client library vs raw httpx at each of ``client_concurrency`` (by default the
    middle level), with that level's draws."""
    middle = sorted(config.concurrency)[len(config.concurrency) // 2]
    print(f"client library vs raw httpx, both over HTTP to serve --workers {server.workers}")
    url = f"http://127.0.0.1:{server.ports.http}"
    rows: list[BenchRow] = []
    for c in config.client_concurrency or [middle]:
        draws = single_draws(c, config.users)
        groups = batch_draws(c, config.users, config.batch_size) if config.batch_size else None
        duration_s, rounds = config.duration_s, config.rounds
        rows += await client_section(url, c, draws, groups, duration_s, rounds, WIDTH)
    return rows


async def _hedge_rows(server: ApiServer, config: BenchConfig) -> list[BenchRow]:
    draws = single_draws(config.hedge_concurrency, config.users)
    pids, port, after_ms = server.server_pids(), server.ports.http, config.hedge_after_ms
    return await hedge_section(port, pids, draws, config.duration_s, after_ms, WIDTH)


async def _level(
    c: int,
    servers: Sequence[ApiServer],
    api: Callable[[contextlib.AsyncExitStack, ApiServer], Awaitable[list[Target]]],
    base: Callable[[contextlib.AsyncExitStack], Awaitable[Target]],
    config: BenchConfig,
) -> list[BenchRow]:
    """Every server's ``api`` targets and the raw Redis ``base`` at ``c``, in turns;
    printed, each against the base, and each server's against the first's (``[w2]`` vs
    ``[w1]``)."""
    async with contextlib.AsyncExitStack() as stack:
        targets = [t for server in servers for t in await api(stack, server)]
        targets.append(await base(stack))
        rows = await measure_in_turns(targets, config.duration_s, config.rounds)
    *measured, redis = rows
    for r in rows:
        print_row(r, WIDTH)
    _print_ratios(c, measured, redis)
    per_server = len(measured) // len(servers)
    first = measured[:per_server]
    for k in range(1, len(servers)):
        parts = [
            f"{r.target} vs {b.target}: req/s x{ratio(r.rps, b.rps)}"
            f" p50 x{ratio(r.p50_ms, b.p50_ms)} p99 x{ratio(r.p99_ms, b.p99_ms)}"
            for r, b in zip(measured[k * per_server : (k + 1) * per_server], first, strict=True)
        ]
        print(f"  c={c}: " + "  |  ".join(parts), flush=True)
    return rows


def redis_get(client: aioredis.Redis) -> Request:
    """The baseline: GET of the raw record, the least any reader of this data must do."""

    async def get(key: str) -> bool:
        try:
            return await client.get(key) is not None
        except (aioredis.RedisError, OSError):
            return False

    return get


def redis_mget(client: aioredis.Redis) -> Request:
    async def mget(keys: list[str]) -> bool:
        try:
            return None not in await client.mget(keys)
        except (aioredis.RedisError, OSError):
            return False

    return mget
