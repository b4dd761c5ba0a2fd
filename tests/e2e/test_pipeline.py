"""Worker and API as separate processes over a real Redis: features in -> embedding served.

Events are applied in-process here, to isolate the worker and the API; the whole path
through Kafka and `userembed ingest` is tests/e2e/test_kafka_to_ranker.py."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from models.registry import ModelArtifact
from service.core.clock import now_ms
from service.core.events import EventType
from service.ingest.updater import FeatureUpdater
from service.store.redis import RedisStore
from service.store.redis_server import free_port
from tests.helpers import event, log_of
from tests.processes import userembed, wait_for

pytestmark = pytest.mark.slow


async def ingest(redis_url: str, events: list[Any], first_offset: int) -> int:
    """Apply events to Redis the way ingest does; return the user's new feature version."""
    store = RedisStore(redis_url)
    try:
        await FeatureUpdater(store, history_length=20).apply(log_of(events, first_offset))
        (state,) = await store.get_features([events[0].user_id])
        assert state is not None
        return state.version
    finally:
        await store.close()


def test_events_in_embedding_out(
    clean_redis: str, standin: ModelArtifact, standin_registry: Path
) -> None:
    port = free_port()
    env = {
        "USEREMBED_REDIS_URL": clean_redis,
        "USEREMBED_REGISTRY_PATH": str(standin_registry),
        "USEREMBED_HISTORY_LENGTH": "20",
    }
    url = f"http://127.0.0.1:{port}/v1/users/alice/embedding"
    with (
        userembed("worker", env=env) as worker,
        userembed("serve", "--port", str(port), "--grpc-port", "0", env=env) as api,
    ):
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").is_success, 30, "readyz")
        before = httpx.get(url).json()
        assert before["status"] == "cold_start"

        t = now_ms()
        version = asyncio.run(ingest(clean_redis, [event("alice", ts=t, item_id=1)], 0))
        first = wait_for(
            lambda: (b := httpx.get(url).json())["feature_version"] == version and b,
            30,
            "an embedding of feature version 1",
        )
        assert first["status"] == "fresh"
        assert first["model_version"] == "standin-1" and first["dim"] == 128

        later = [event("alice", ts=t + 1, item_id=i, type=EventType.LIKE) for i in range(2, 6)]
        version = asyncio.run(ingest(clean_redis, later, 1))
        second = wait_for(
            lambda: (b := httpx.get(url).json())["feature_version"] == version and b,
            30,
            "an embedding of feature version 2",
        )
        assert second["status"] == "fresh" and second["embedding"] != first["embedding"]
        assert second["computed_at"] >= first["computed_at"]
        for process in (worker, api):
            assert process.poll() is None, process.output()

    inspected = json.loads(
        subprocess.run(
            [sys.executable, "-m", "service.cli", "inspect", "alice"],
            env={**os.environ, **env},
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    )
    assert inspected["features"]["version"] == version
    assert len(inspected["features"]["history"]["timestamps"]) == 5
    assert inspected["embedding"]["feature_version"] == version
    assert inspected["embedding"]["dtype"] == "float16"
    assert len(inspected["embedding"]["vector"]) == 128


def test_demo_serves_embeddings_and_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    port = free_port()
    with userembed(
        "demo",
        "--port",
        str(port),
        "--users",
        "50",
        "--rate",
        "500",
        "--registry",
        str(tmp_path / "registry"),
        env={"USEREMBED_REDIS_URL": "memory://"},
    ) as demo:
        url = f"http://127.0.0.1:{port}/v1/users/u0/embedding"
        served = wait_for(
            lambda: (b := httpx.get(url).json())["status"] == "fresh" and b, 60, "u0 to be fresh"
        )
        assert served["dim"] == 128 and served["model_version"] == "sum-default-1"
        compact = wait_for(
            lambda: (b := httpx.get(f"{url}?model=compact").json())["status"] == "fresh" and b,
            60,
            "u0's second model to be fresh",
        )
        assert (compact["dim"], compact["model_version"], compact["model"]) == (
            32,
            "compact-1",
            "compact",
        )
        listed = httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["models"]
        assert [(m["name"], m["dim"]) for m in listed] == [("default", 128), ("compact", 32)]
        os.killpg(demo.pid, signal.SIGINT)
        demo.wait(timeout=20)
        output = demo.output()
    assert demo.returncode == 0, output
    assert f"curl -s http://127.0.0.1:{port}/v1/users/u42/embedding" in output
    assert f"curl -s 'http://127.0.0.1:{port}/v1/users/u42/embedding?model=compact'" in output
    assert "embeddings/s=" in output and "queue=" in output
    assert "stopped cleanly" in output
