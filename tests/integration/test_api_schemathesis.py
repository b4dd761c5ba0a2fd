"""Schemathesis fuzzes the live API (uvicorn on a real port, real Redis) from its own
OpenAPI document, with valid and invalid inputs and every check: no 5xx, every answer
(status, content type, headers, body) conforms to the document, schema-valid requests
are accepted and schema-violating ones refused (the document states every rule the
server enforces).

The server's clock is stopped: an event's ``ts`` may be at most a day ahead of arrival,
which the document states as a ``maximum`` written when it is fetched; with a moving
clock the server would accept ``maximum + 1`` a millisecond later."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from service.api.app import create_app
from service.api.cold_start import ColdStart
from service.api.server import EmbeddedServer, http_config
from service.core.embeddings import EmbeddingRecord, encode_embedding
from service.ingest.updater import InProcessEventSource
from service.settings import Settings
from service.store.keys import DEFAULT_SHARDS, KeyLayout
from service.store.redis import RedisStore
from service.store.redis_server import free_port

pytestmark = [pytest.mark.redis, pytest.mark.slow]

COLD = ColdStart(np.zeros(8, dtype=np.float32), "m1")


@pytest.fixture(scope="module")
def live_api(redis_url: str) -> Iterator[str]:
    """The API served by uvicorn in a thread, over a Redis holding u0..u9."""
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    for i in range(10):
        record = EmbeddingRecord(
            np.ones(8, dtype=np.float16), "m1", "m1", int(time.time() * 1000), i
        )
        client.set(KeyLayout(DEFAULT_SHARDS).embedding_key(f"u{i}"), encode_embedding(record))
    client.close()
    settings = Settings(batch_get_max_ids=20, api_events_max=5)
    now = int(time.time() * 1000)
    port = free_port()
    ready = threading.Event()
    holder: dict[str, EmbeddedServer] = {}

    async def serve() -> None:
        store = RedisStore(redis_url, timeout_ms=2000)
        app = create_app(
            store, settings, lambda: COLD, event_sink=InProcessEventSource(), clock=lambda: now
        )
        config = http_config(app, "127.0.0.1", port)
        server = holder["server"] = EmbeddedServer(config)
        ready.set()
        try:
            await server.serve()
        finally:
            await store.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    for _ in range(200):
        if holder["server"].started:
            break
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    holder["server"].should_exit = True
    thread.join(10)


def schemathesis_run(url: str, report_dir: Path, *options: str) -> tuple[int, str]:
    """``schemathesis run`` (its CLI: the pytest plugin does not load on pytest 9), positive
    and negative inputs, a fixed seed and a bounded budget."""
    command = [
        str(Path(sys.executable).with_name("schemathesis")),
        "run",
        f"{url}/openapi.json",
        "--mode=all",
        "--max-examples=40",
        "--seed=7",
        "--workers=1",
        "--phases=examples,coverage,fuzzing",
        "--generation-database=none",
        "--no-color",
        f"--report-dir={report_dir}",
        "--report=junit",
        *options,
    ]
    run = subprocess.run(command, capture_output=True, text=True, timeout=240, check=False)
    return run.returncode, run.stdout + run.stderr


def test_api_conforms_to_its_openapi_document(live_api: str, tmp_path: Path) -> None:
    code, output = schemathesis_run(live_api, tmp_path, "--checks=all", "--exclude-path=/v1/events")
    assert code == 0, output[-6000:]
    assert "No issues found" in output, output[-3000:]


def test_event_intake_conforms_to_its_openapi_document(live_api: str, tmp_path: Path) -> None:
    code, output = schemathesis_run(live_api, tmp_path, "--checks=all", "--include-path=/v1/events")
    assert code == 0, output[-6000:]
    assert "No issues found" in output, output[-3000:]
