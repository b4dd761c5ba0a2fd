"""The API under test of the read-path benchmarks: Redis filled with bench records
(``ue:u0..``, through the production codec) and ``userembed serve --workers N`` as a
subprocess, waited for until every process behind its port serves them.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from service.core.clock import now_ms
from service.core.embeddings import EmbeddingRecord
from service.store.redis import RedisStore
from service.store.redis_server import free_port, stop_process

DIM = 128


@dataclass(frozen=True, slots=True)
class Ports:
    http: int
    grpc: int


@dataclass(frozen=True, slots=True)
class ApiServer:
    """A running ``userembed serve --workers N`` (one process for N=1) and its ports."""

    workers: int
    ports: Ports
    process: subprocess.Popen[bytes]

    def server_pids(self) -> list[int]:
        """The processes that answer: the supervisor's children, or the one process."""
        return sorted(_children(self.process.pid)) if self.workers > 1 else [self.process.pid]


async def populate(url: str, users: int, chunk: int = 1000) -> None:
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
def api_process(redis_url: str, registry: Path, workers: int = 1) -> Iterator[ApiServer]:
    """Run ``userembed serve --workers N`` until the block exits; every stored record
    reads as fresh."""
    ports = Ports(free_port(), free_port())
    metrics_port = free_port() if workers > 1 else 0  # the supervisor's: who serves
    env = {k: v for k, v in os.environ.items() if k not in ("USEREMBED_API_KEYS",)}
    env.update(
        USEREMBED_REDIS_URL=redis_url,
        USEREMBED_REGISTRY_PATH=str(registry),
        USEREMBED_REFRESH_AFTER_S="86400",  # no refresh writes to disturb the comparison
        USEREMBED_API_EVENTS_ENABLED="false",
        USEREMBED_METRICS_PORT=str(metrics_port),
        USEREMBED_API_DRAIN_TIMEOUT_S="5",
    )
    command = [sys.executable, "-m", "service.cli", "serve", "--workers", str(workers)]
    command += ["--port", str(ports.http), "--grpc-port", str(ports.grpc)]
    # stderr to a file, not a pipe: a pipe nobody reads could fill and stall the server
    with tempfile.TemporaryFile() as stderr:
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            wait_ready(process, ports.http, stderr, 20.0 * workers, workers, metrics_port)
            yield ApiServer(workers, ports, process)
        finally:
            stop_process(process)


def wait_ready(
    process: subprocess.Popen[bytes],
    port: int,
    stderr: IO[bytes],
    timeout_s: float = 20.0,
    workers: int = 1,
    metrics_port: int = 0,
) -> None:
    """Poll /readyz (with workers: once the supervisor's /metrics counts each of its
    children as serving, so every process behind the port listens), then check that u0
    is served from the bench data (not cold start)."""
    deadline = time.monotonic() + timeout_s
    while process.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            ready = workers == 1 or _serving(process.pid, metrics_port) == workers
            if ready and _get(port, "/readyz")[0] == 200:
                status, body = _get(port, "/v1/users/u0/embedding")
                answer = json.loads(body)
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


def _serving(parent: int, metrics_port: int) -> int:
    """How many of ``parent``'s children count themselves in ``userembed_api_worker_up``
    (a worker does once its sockets listen); 0 while those pids and the children differ
    (one starting or restarting)."""
    status, body = _get(metrics_port, "/metrics")
    live = {
        int(sample.labels["pid"])
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == "userembed_api_worker_up" and sample.value == 1
    }
    children = _children(parent)
    return len(children) if status == 200 and live == children else 0


def _children(pid: int) -> set[int]:
    return {int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}


def _get(port: int, path: str) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
