"""Open-loop reads: requests leave on a fixed schedule, whatever the answers do.

Request i is due at ``start + i / rate``; its latency runs from that due time to the
answer, so time spent queued behind a slow answer (in the client, the network or the
server) counts, and a stall cannot hide its own tail (no coordinated omission).
A request that fails, or takes longer than ``timeout_s``, is an error and has no
latency; errors are counted by kind (``timeout``, ``bad answer``, or the exception's
class), so the report can say what failed. The targets are below.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import redis.asyncio as aioredis

from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.bench.read import GET_METHOD, KeepAliveHttp, grpc_call
from service.store.keys import DEFAULT_SHARDS, KeyLayout

T = TypeVar("T")
Send = Callable[[Any], Awaitable[bool]]
WARM_UP_REQUESTS = 20
IDLE_REUSE_S = 4.0  # below the server's keep-alive timeout
MAX_REDIS_CONNECTIONS = 32  # the baseline's pool; a read waits for a free connection
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class OpenLoopRun:
    """One target's window: latencies of the answered requests, in milliseconds."""

    latencies_ms: list[float]
    sent: int
    errors: dict[str, int]  # kind -> count: timeout, bad answer, or an exception's class
    elapsed_s: float  # from the first due time to the last answer


async def open_loop(
    send: Callable[[T], Awaitable[bool]], payloads: Sequence[T], rate: float, timeout_s: float
) -> OpenLoopRun:
    """Send ``payloads[i]`` at ``start + i / rate``, each as its own task."""
    latencies: list[float] = []
    errors: Counter[str] = Counter()

    async def one(payload: T, due_ns: int) -> None:
        try:
            ok = await asyncio.wait_for(send(payload), timeout_s)
        except TimeoutError:
            errors["timeout"] += 1
        except Exception as error:  # a failed read is a measurement, not a crash
            kind = type(error).__name__
            if not errors[kind]:
                log.warning("event=open_loop_error kind=%s error=%r", kind, str(error)[:200])
            errors[kind] += 1
        else:
            if ok:
                latencies.append((time.perf_counter_ns() - due_ns) / 1e6)
            else:
                errors["bad answer"] += 1

    tasks: set[asyncio.Task[None]] = set()
    start_ns = time.perf_counter_ns() + 1_000_000
    for i, payload in enumerate(payloads):
        due_ns = start_ns + int(i * 1e9 / rate)
        ahead_s = (due_ns - time.perf_counter_ns()) / 1e9
        if ahead_s > 0:
            await asyncio.sleep(ahead_s)
        task = asyncio.create_task(one(payload, due_ns))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.wait(tasks)
    elapsed_s = (time.perf_counter_ns() - start_ns) / 1e9
    return OpenLoopRun(latencies, len(payloads), dict(errors), elapsed_s)


class HttpPool:
    """Keep-alive HTTP/1.1 connections: an idle one per request, a new one when all are
    busy. A connection whose request was abandoned (timeout) is not reused, nor one idle
    for longer than ``IDLE_REUSE_S``: the server may have closed it (uvicorn's keep-alive
    timeout is 5 s), and like any HTTP client we do not send on a connection likely dead."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._idle: list[tuple[KeepAliveHttp, float]] = []  # (connection, idle since)
        self._all: list[KeepAliveHttp] = []

    async def get_embedding(self, user_id: str) -> bool:
        conn = await self._take()
        ok = await conn.get_embedding(user_id)  # a cancellation leaves conn out of the pool
        self._idle.append((conn, time.monotonic()))
        return ok

    async def _take(self) -> KeepAliveHttp:
        if self._idle:
            conn, since = self._idle.pop()
            if time.monotonic() - since > IDLE_REUSE_S:
                await conn.close()  # it opens a fresh connection on its next request
            return conn
        conn = KeepAliveHttp(self._port)
        self._all.append(conn)
        return conn

    @property
    def connections(self) -> int:
        return len(self._all)

    async def close(self) -> None:
        await asyncio.gather(*(c.close() for c in self._all))


@asynccontextmanager
async def read_target(
    target: str, http_port: int, grpc_port: int, redis_url: str
) -> AsyncIterator[tuple[Send, Callable[[str], Any]]]:
    """``(send, payload_of_user)`` for one target, its clients closed at exit.

    api-http: GET /v1/users/{u}/embedding, an error unless 200. api-grpc: GetEmbedding
    on one channel, an error on any RPC error. redis-get: GET ue:{u}, the baseline; a
    missing record is an error too (every background user has one after the warm-up),
    and a failed command is counted by its exception's class.
    """
    if target == "api-http":
        pool = HttpPool(http_port)
        try:
            yield pool.get_embedding, str
        finally:
            await pool.close()
    elif target == "api-grpc":
        async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            yield grpc_call(channel, GET_METHOD, pb.Embedding), _grpc_request
    elif target == "redis-get":
        # A bounded pool that makes a read wait for a free connection (the wait counts,
        # as queueing does). redis-py's default pool fails reads past 100 connections,
        # and an unbounded one spirals: after a stall, the client spends its CPU opening
        # connections (HELLO, CLIENT SETINFO) and falls seconds behind its schedule.
        client = aioredis.Redis.from_pool(  # the client owns the pool and closes it
            aioredis.BlockingConnectionPool.from_url(
                redis_url, max_connections=MAX_REDIS_CONNECTIONS, timeout=None
            )
        )
        try:
            yield _redis_get(client), _redis_key
        finally:
            await client.aclose()
    else:
        raise ValueError(f"unknown read target {target!r}: api-http, api-grpc or redis-get")


def _redis_get(client: aioredis.Redis) -> Send:
    """GET of the raw record; unlike the closed-loop benchmark's, it lets errors through."""

    async def get(key: str) -> bool:
        return await client.get(key) is not None

    return get


def _grpc_request(user_id: str) -> Any:
    return pb.GetEmbeddingRequest(user_id=user_id)


_LAYOUT = KeyLayout(DEFAULT_SHARDS)  # the served pipeline's settings


def _redis_key(user_id: str) -> str:
    return _LAYOUT.embedding_key(user_id)


async def measure_target(
    target: str,
    users: Sequence[str],
    rate: float,
    *,
    http_port: int,
    grpc_port: int,
    redis_url: str,
    timeout_s: float = 5.0,
) -> OpenLoopRun:
    """Warm the target's connections up (not counted), then read ``users`` open-loop."""
    async with read_target(target, http_port, grpc_port, redis_url) as (send, payload_of):
        for user in users[:WARM_UP_REQUESTS]:
            await send(payload_of(user))
        return await open_loop(send, [payload_of(u) for u in users], rate, timeout_s)
