"""Read-path benchmark: the API's GET over HTTP next to a raw Redis GET of the same record.

Both targets run under one load generator (same tasks, same user draws, same timing),
so the api/redis ratio is what the API adds on top of its one Redis round trip. The
numbers are printed, never asserted. With ``redis_url`` given, ``ue:u0..`` are overwritten.
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

import numpy as np
import redis.asyncio as aioredis
import uvloop

from service.clock import now_ms
from service.embeddings import EmbeddingRecord
from service.redis_server import free_port, private_redis, stop_process
from service.store import RedisStore

DIM = 128
DRAWS_PER_TASK = 4096  # user ids cycled by each task, drawn up front so the loop stays cheap
Request = Callable[[str], Awaitable[bool]]
_ROW = "{:<10} {:>5} {:>9} {:>7} {:>9} {:>8} {:>8} {:>9}"


@dataclass(frozen=True, slots=True)
class BenchConfig:
    """What to measure; ``redis_url=None`` starts a private redis-server for the run."""

    redis_url: str | None = None
    concurrency: Sequence[int] = (1, 16, 64)
    duration_s: float = 5.0
    users: int = 10_000


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


def run_read_bench(config: BenchConfig) -> list[BenchRow]:
    """Populate Redis, start the API as a subprocess, measure both targets, print a table."""
    if not config.concurrency or min(config.concurrency) < 1:
        raise ValueError(f"concurrency levels must be >= 1, got {list(config.concurrency)}")
    if config.duration_s <= 0 or config.users < 1:
        raise ValueError(f"need duration_s > 0 and users >= 1, got {config}")
    # Imported here: building the stand-in pulls in onnx, which the rest of the module avoids.
    from models.standin import publish_standin

    with contextlib.ExitStack() as stack:
        url = config.redis_url or stack.enter_context(private_redis())
        registry = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="userembed-bench-")))
        uvloop.run(_populate(url, config.users))
        publish_standin(registry)
        port = free_port()
        stack.enter_context(_api_process(url, registry, port))
        return uvloop.run(_bench(url, port, config))


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
def _api_process(redis_url: str, registry: Path, port: int) -> Iterator[None]:
    """Run ``userembed serve`` until the block exits; every stored record reads as fresh."""
    env = {k: v for k, v in os.environ.items() if k not in ("USEREMBED_API_KEYS",)}
    env.update(
        USEREMBED_REDIS_URL=redis_url,
        USEREMBED_REGISTRY_PATH=str(registry),
        USEREMBED_REFRESH_AFTER_S="86400",  # no refresh writes to disturb the comparison
    )
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port)]
    # stderr to a file, not a pipe: a pipe nobody reads could fill and stall the server
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            _wait_ready(process, port, stderr)
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


class _KeepAliveHttp:
    """The least an HTTP/1.1 client can do: one persistent connection, Content-Length bodies."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def get_embedding(self, user_id: str) -> bool:
        """GET the user's embedding; False on a non-200 answer or a broken connection."""
        try:
            if self._streams is None:
                self._streams = await asyncio.open_connection("127.0.0.1", self._port)
            reader, writer = self._streams
            # No drain(): the request is tiny and we wait for the answer before the next one.
            writer.write(
                b"GET /v1/users/%s/embedding HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n" % user_id.encode()
            )
            head = (await reader.readuntil(b"\r\n\r\n")).lower().split(b"\r\n")
            fields = {k.strip(): v.strip() for k, v in (h.split(b":", 1) for h in head[1:-2])}
            # KeyError: no Content-Length; this client does not read chunked bodies
            await reader.readexactly(int(fields[b"content-length"]))
            ok = head[0].split(b" ", 2)[1] == b"200"
        except (OSError, ValueError, LookupError, asyncio.IncompleteReadError):
            await self.close()
            return False
        if fields.get(b"connection") == b"close":
            await self.close()
        return ok

    async def close(self) -> None:
        if self._streams is not None:
            writer = self._streams[1]
            self._streams = None
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _measure(
    target: str, requests: Sequence[Request], draws: Sequence[list[str]], duration_s: float
) -> BenchRow:
    """Closed loop: each task sends its next request as soon as the previous one answers."""
    start = time.perf_counter_ns()
    count_from = start + int(min(1.0, duration_s / 4) * 1e9)  # warm-up is not counted
    end = count_from + int(duration_s * 1e9)
    latencies: list[list[int]] = [[] for _ in requests]
    errors = [0] * len(requests)

    async def run(i: int) -> None:
        request, user_ids, counted = requests[i], draws[i], latencies[i]
        k = 0
        while (t0 := time.perf_counter_ns()) < end:
            ok = await request(user_ids[k % len(user_ids)])
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


async def _bench(redis_url: str, port: int, config: BenchConfig) -> list[BenchRow]:
    info = aioredis.Redis.from_url(redis_url)
    try:
        redis_version = str((await info.info("server")).get("redis_version", "unknown"))
    finally:
        await info.aclose()
    print(
        f"userembed bench read  commit={_commit()}  python={platform.python_version()}"
        f"  cpus={os.cpu_count()}  redis={redis_version}  users={config.users}"
        f"  duration={config.duration_s}s"
    )
    print(
        _ROW.format("target", "conc", "requests", "errors", "req/s", "p50 ms", "p99 ms", "p99.9 ms")
    )
    rows: list[BenchRow] = []
    for c in config.concurrency:
        # the same draws for both targets: the same users, in the same order, per task
        ids = np.random.default_rng(c).integers(0, config.users, (c, DRAWS_PER_TASK))
        draws = [[f"u{i}" for i in row] for row in ids.tolist()]
        http = [_KeepAliveHttp(port) for _ in range(c)]
        try:
            api = await _measure(
                "api-http", [h.get_embedding for h in http], draws, config.duration_s
            )
        finally:
            await asyncio.gather(*(h.close() for h in http))
        client = aioredis.Redis.from_url(redis_url, max_connections=c)
        try:
            base = await _measure("redis-get", [_redis_get(client)] * c, draws, config.duration_s)
        finally:
            await client.aclose()
        for r in (api, base):
            ms = (f"{v:.3f}" for v in (r.p50_ms, r.p99_ms, r.p999_ms))
            print(_ROW.format(r.target, r.concurrency, r.requests, r.errors, f"{r.rps:.0f}", *ms))
        print(
            f"{'ratio api/redis':<16} c={c:<4} p50 x{_ratio(api.p50_ms, base.p50_ms)}"
            f"  p99 x{_ratio(api.p99_ms, base.p99_ms)}  req/s x{_ratio(api.rps, base.rps)}"
        )
        rows += (api, base)
    return rows


def _redis_get(client: aioredis.Redis) -> Request:
    """The baseline: GET of the raw record, the least any reader of this data must do."""

    async def get(user_id: str) -> bool:
        try:
            return await client.get(f"ue:{user_id}") is not None
        except (aioredis.RedisError, OSError):
            return False

    return get


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "n/a"


def _commit() -> str:
    git = ["git", "-C", str(Path(__file__).resolve().parent), "rev-parse", "--short", "HEAD"]
    try:
        out = subprocess.run(git, capture_output=True, text=True, timeout=5, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.strip() or "unknown"
