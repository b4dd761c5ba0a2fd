"""Read-path benchmark: the API over HTTP and gRPC next to a raw Redis read of the same
records.

All targets run under one load generator (same tasks, same user draws, same timing),
so the api/redis ratio is what the API adds on top of its one Redis round trip.
Single-user reads (GET / GetEmbedding / Redis GET) and batches (batchGet with JSON
numbers and with base64 float16 / BatchGetEmbeddings / Redis MGET of ``batch_size``
users) are measured at each concurrency. The numbers are printed, never asserted.
With ``redis_url`` given, ``ue:u0..`` are overwritten.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import numpy as np
import orjson
import redis.asyncio as aioredis
import uvloop

from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.bench.provenance import commit_id
from service.core.clock import now_ms
from service.core.embeddings import EmbeddingRecord
from service.store.keys import DEFAULT_SHARDS, KeyLayout
from service.store.redis import RedisStore
from service.store.redis_server import free_port, private_redis, stop_process

DIM = 128
DRAWS_PER_TASK = 4096  # requests prepared up front per task (cycled), so the loop stays cheap
BATCH_DRAWS_PER_TASK = 256
Request = Callable[[Any], Awaitable[bool]]
_ROW = "{:<17} {:>4} {:>9} {:>7} {:>9} {:>8} {:>8} {:>9}"
GET_METHOD = "/userembed.v1.Embeddings/GetEmbedding"
BATCH_METHOD = "/userembed.v1.Embeddings/BatchGetEmbeddings"


LAYOUT = KeyLayout(DEFAULT_SHARDS)  # the API process runs with the default settings


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What to measure; ``redis_url=None`` starts a private redis-server for the run.
    ``batch_size=0`` skips the batch rows."""

    redis_url: str | None = None
    concurrency: Sequence[int] = (8, 32, 64)
    duration_s: float = 5.0
    users: int = 10_000
    batch_size: int = 100


@dataclass(frozen=True, slots=True)
class BenchRow:
    """One target at one concurrency level; latencies are per request, in milliseconds."""

    target: str
    concurrency: int
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float
    p999_ms: float


@dataclass(frozen=True, slots=True)
class _Ports:
    http: int
    grpc: int


def run_read_bench(config: BenchConfig) -> list[BenchRow]:
    """Populate Redis, start the API as a subprocess, measure every target, print a table."""
    if not config.concurrency or min(config.concurrency) < 1:
        raise ValueError(f"concurrency levels must be >= 1, got {list(config.concurrency)}")
    if config.duration_s <= 0 or config.users < 1 or config.batch_size < 0:
        raise ValueError(f"need duration_s > 0, users >= 1, batch_size >= 0, got {config}")
    # Imported here: building the stand-in pulls in onnx, which the rest of the module avoids.
    from models.standin import publish_standin

    with contextlib.ExitStack() as stack:
        url = config.redis_url or stack.enter_context(private_redis())
        registry = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="userembed-bench-")))
        uvloop.run(_populate(url, config.users))
        publish_standin(registry)
        ports = _Ports(free_port(), free_port())
        stack.enter_context(_api_process(url, registry, ports))
        return uvloop.run(_bench(url, ports, config))


async def _populate(url: str, users: int, chunk: int = 1000) -> None:
    """Write ``ue:u0..`` through the production codec, so the API decodes real records."""
    vectors = np.random.default_rng(0).standard_normal((users, DIM))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    at = now_ms()
    store = RedisStore(url, timeout_ms=5000)
    try:
        for lo in range(0, users, chunk):
            ids = range(lo, min(lo + chunk, users))
            records = {f"u{i}": EmbeddingRecord(vectors[i], "bench", "bench", at, 1) for i in ids}
            await store.put_embeddings(records)
    finally:
        await store.close()


@contextlib.contextmanager
def _api_process(redis_url: str, registry: Path, ports: _Ports) -> Iterator[None]:
    """Run ``userembed serve`` until the block exits; every stored record reads as fresh."""
    env = {k: v for k, v in os.environ.items() if k not in ("USEREMBED_API_KEYS",)}
    env.update(
        USEREMBED_REDIS_URL=redis_url,
        USEREMBED_REGISTRY_PATH=str(registry),
        USEREMBED_REFRESH_AFTER_S="86400",  # no refresh writes to disturb the comparison
        USEREMBED_API_EVENTS_ENABLED="false",
    )
    command = [sys.executable, "-m", "service.cli", "serve"]
    command += ["--port", str(ports.http), "--grpc-port", str(ports.grpc)]
    # stderr to a file, not a pipe: a pipe nobody reads could fill and stall the server
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            _wait_ready(process, ports.http, stderr)
            yield
        finally:
            stop_process(process)


def _wait_ready(
    process: subprocess.Popen[bytes], port: int, stderr: IO[bytes], timeout_s: float = 20.0
) -> None:
    """Poll /readyz, then check that u0 is served from the bench data (not cold start)."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if _get_json(port, "/readyz")[0] == 200:
                status, answer = _get_json(port, "/v1/users/u0/embedding")
                if status == 200 and answer.get("status") == "fresh":
                    return
                raise RuntimeError(f"API serves u0 as {status} {answer}, expected the bench record")
        time.sleep(0.1)
    stderr.seek(0)
    code = process.poll()
    why = f"not ready within {timeout_s}s" if code is None else f"exited with {code}"
    raise RuntimeError(
        f"API on port {port} {why}; its stderr:\n" + stderr.read().decode(errors="replace").strip()
    )


def _get_json(port: int, path: str) -> tuple[int, dict[str, Any]]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


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


async def _measure(
    target: str, requests: Sequence[Request], draws: Sequence[Sequence[Any]], duration_s: float
) -> BenchRow:
    """Closed loop: each task sends its next request as soon as the previous one answers,
    until the window ends and it has counted at least one (a stall that outlasts a short
    window, on a loaded machine, still yields a sample instead of an empty row)."""
    start = time.perf_counter_ns()
    count_from = start + int(min(1.0, duration_s / 4) * 1e9)  # warm-up is not counted
    end = count_from + int(duration_s * 1e9)
    latencies: list[list[int]] = [[] for _ in requests]
    errors = [0] * len(requests)

    async def run(i: int) -> None:
        request, payloads, counted = requests[i], draws[i], latencies[i]
        k = 0
        while (t0 := time.perf_counter_ns()) < end or not counted:
            ok = await request(payloads[k % len(payloads)])
            elapsed = time.perf_counter_ns() - t0
            k += 1
            if t0 >= count_from:
                counted.append(elapsed)
                errors[i] += not ok

    await asyncio.gather(*(run(i) for i in range(len(requests))))
    window_s = (time.perf_counter_ns() - count_from) / 1e9
    all_ns = np.concatenate([np.asarray(x, dtype=np.int64) for x in latencies])
    p50, p99, p999 = (
        np.percentile(all_ns, [50, 99, 99.9]) / 1e6 if all_ns.size else np.full(3, np.nan)
    ).tolist()
    n = int(all_ns.size)
    return BenchRow(target, len(requests), n, sum(errors), n / window_s, p50, p99, p999)


def _print_row(r: BenchRow) -> None:
    ms = (f"{v:.3f}" for v in (r.p50_ms, r.p99_ms, r.p999_ms))
    print(_ROW.format(r.target, r.concurrency, r.requests, r.errors, f"{r.rps:.0f}", *ms))


def _print_ratios(c: int, rows: Sequence[BenchRow], base: BenchRow) -> None:
    parts = [
        f"{r.target}: p50 x{_ratio(r.p50_ms, base.p50_ms)}"
        f" p99 x{_ratio(r.p99_ms, base.p99_ms)} req/s x{_ratio(r.rps, base.rps)}"
        for r in rows
    ]
    print(f"  vs {base.target} c={c}: " + "  |  ".join(parts), flush=True)


async def _single_rows(
    ports: _Ports, redis_url: str, c: int, ids: Sequence[Sequence[str]], duration_s: float
) -> list[BenchRow]:
    draws = [list(row) for row in ids]
    http = [KeepAliveHttp(ports.http) for _ in range(c)]
    try:
        api = await _measure("api-http", [h.get_embedding for h in http], draws, duration_s)
    finally:
        await asyncio.gather(*(h.close() for h in http))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        get = grpc_call(channel, GET_METHOD, pb.Embedding)
        messages = [[pb.GetEmbeddingRequest(user_id=u) for u in row] for row in draws]
        rpc = await _measure("api-grpc", [get] * c, messages, duration_s)
    client = aioredis.Redis.from_url(redis_url, max_connections=c)
    try:
        keys = [[LAYOUT.embedding_key(u) for u in row] for row in draws]
        base = await _measure("redis-get", [redis_get(client)] * c, keys, duration_s)
    finally:
        await client.aclose()
    return [api, rpc, base]


async def _batch_rows(
    ports: _Ports, redis_url: str, c: int, groups: Sequence[Sequence[list[str]]], duration_s: float
) -> list[BenchRow]:
    n = len(groups[0][0])
    http = [KeepAliveHttp(ports.http) for _ in range(c)]
    try:
        bodies = [[batch_request(g) for g in row] for row in groups]
        api = await _measure(f"api-http-b{n}", [h.batch_get for h in http], bodies, duration_s)
        # the same batches with base64 float16 vectors instead of JSON numbers
        bodies = [[batch_request(g, "base64_float16") for g in row] for row in groups]
        b64 = await _measure(f"api-http-b{n}-f16", [h.batch_get for h in http], bodies, duration_s)
    finally:
        await asyncio.gather(*(h.close() for h in http))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ports.grpc}") as channel:
        call = grpc_call(channel, BATCH_METHOD, pb.BatchGetEmbeddingsResponse)
        messages = [[pb.BatchGetEmbeddingsRequest(user_ids=g) for g in row] for row in groups]
        rpc = await _measure(f"api-grpc-b{n}", [call] * c, messages, duration_s)
    client = aioredis.Redis.from_url(redis_url, max_connections=c)
    try:
        keys = [[[LAYOUT.embedding_key(u) for u in g] for g in row] for row in groups]
        base = await _measure(f"redis-mget{n}", [redis_mget(client)] * c, keys, duration_s)
    finally:
        await client.aclose()
    return [api, b64, rpc, base]


async def _bench(redis_url: str, ports: _Ports, config: BenchConfig) -> list[BenchRow]:
    info = aioredis.Redis.from_url(redis_url)
    try:
        redis_version = str((await info.info("server")).get("redis_version", "unknown"))
    finally:
        await info.aclose()
    print(
        f"userembed bench read  commit={commit_id()}  python={platform.python_version()}"
        f"  cpus={os.cpu_count()}  redis={redis_version}  users={config.users}"
        f"  duration={config.duration_s}s  batch={config.batch_size}"
    )
    print(_ROW.format("target", "conc", "requests", "errors", "req/s", "p50 ms", "p99 ms", "p99.9"))
    rows: list[BenchRow] = []
    for c in config.concurrency:
        # the same draws for every target: the same users, in the same order, per task
        rng = np.random.default_rng(c)
        ids = rng.integers(0, config.users, (c, DRAWS_PER_TASK))
        single = await _single_rows(
            ports, redis_url, c, [[f"u{i}" for i in row] for row in ids.tolist()], config.duration_s
        )
        for r in single:
            _print_row(r)
        _print_ratios(c, single[:2], single[2])
        rows += single
    if config.batch_size:
        for c in config.concurrency:
            rng = np.random.default_rng(1000 + c)
            ids = rng.integers(0, config.users, (c, BATCH_DRAWS_PER_TASK, config.batch_size))
            groups = [[[f"u{i}" for i in g] for g in row] for row in ids.tolist()]
            batch = await _batch_rows(ports, redis_url, c, groups, config.duration_s)
            for r in batch:
                _print_row(r)
            _print_ratios(c, batch[:3], batch[3])
            rows += batch
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


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"
