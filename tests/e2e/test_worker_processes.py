"""Worker processes over a real Redis: lease recovery after kill -9, and hot model swap
under continuous load with the API serving throughout."""

from __future__ import annotations

import asyncio
import os
import random
import signal
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from models.registry import ModelArtifact, install
from models.standin import publish_standin
from service.core.clock import now_ms
from service.core.embeddings import EmbeddingRecord
from service.core.features import FeatureState
from service.ingest.updater import FeatureUpdater
from service.store.redis import RedisStore
from service.store.redis_server import free_port
from tests.helpers import event, log_of
from tests.processes import Role, userembed, wait_for

pytestmark = pytest.mark.slow


T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


async def seed_users(redis_url: str, users: list[str], first_offset: int = 0) -> None:
    store = RedisStore(redis_url)
    try:
        events = [event(u, ts=now_ms(), item_id=i) for i, u in enumerate(users)]
        await FeatureUpdater(store, history_length=20).apply(log_of(events, first_offset))
    finally:
        await store.close()


async def queue_and_records(redis_url: str, users: list[str]) -> tuple[int, int, int]:
    """(queued, leased, users with a record)."""
    store = RedisStore(redis_url)
    try:
        stats = await store.dirty_stats()
        records = await store.get_embeddings(users)
        return stats.depth, stats.leased, sum(r is not None for r in records)
    finally:
        await store.close()


def test_users_of_a_worker_killed_mid_batch_are_recomputed_after_the_lease(
    clean_redis: str, standin_registry: Path, standin: ModelArtifact
) -> None:
    users = [f"k{i}" for i in range(60)]
    run(seed_users(clean_redis, users))
    env = {
        "USEREMBED_REDIS_URL": clean_redis,
        "USEREMBED_REGISTRY_PATH": str(standin_registry),
        "USEREMBED_HISTORY_LENGTH": "20",
        "USEREMBED_WORKER_LEASE_MS": "2000",
    }
    # The doomed worker claims all 60, then waits (for ever) to fill a batch of 1000.
    doomed_env = {
        **env,
        "USEREMBED_WORKER_BATCH_SIZE": "1000",
        "USEREMBED_WORKER_MAX_WAIT_MS": "600000",
    }
    with userembed("worker", env=doomed_env) as doomed:
        wait_for(lambda: run(queue_and_records(clean_redis, users))[1] == 60, 60, "60 leases")
        os.killpg(doomed.pid, signal.SIGKILL)
        doomed.wait(timeout=10)
    assert run(queue_and_records(clean_redis, users)) == (0, 60, 0)

    with userembed("worker", env=env) as survivor:
        wait_for(
            lambda: run(queue_and_records(clean_redis, users)) == (0, 0, 60),
            60,
            "the survivor to embed every user of the dead worker",
        )
        assert survivor.poll() is None, survivor.output()


class Load:
    """Continuous event writes (as ingest does) and API reads, counting failures."""

    def __init__(self, redis_url: str, api: str, users: list[str]) -> None:
        self.redis_url, self.api, self.users = redis_url, api, users
        self.stop = asyncio.Event()
        self.reads = 0
        self.failures: list[str] = []
        self.offset = 0

    async def feed(self) -> None:
        store = RedisStore(self.redis_url)
        updater = FeatureUpdater(store, history_length=20)
        rng = random.Random(1)
        try:
            while not self.stop.is_set():
                picked = rng.sample(self.users, 20)
                events = [event(u, ts=now_ms(), item_id=rng.randrange(1000)) for u in picked]
                await updater.apply(log_of(events, self.offset))
                self.offset += len(events)
                await asyncio.sleep(0.02)
        finally:
            await store.close()

    async def read(self) -> None:
        rng = random.Random(2)
        async with httpx.AsyncClient(base_url=self.api, timeout=5) as client:
            while not self.stop.is_set():
                response = await client.get(f"/v1/users/{rng.choice(self.users)}/embedding")
                self.reads += 1
                if response.status_code != 200:
                    self.failures.append(f"{response.status_code} {response.text[:200]}")


async def settled_on(redis_url: str, users: list[str], version: str) -> bool:
    """Every user's record is of its latest features and computed by ``version``."""
    store = RedisStore(redis_url)
    try:
        states = await store.get_features(users)
        records = await store.get_embeddings(users)
        return all(
            s is not None
            and r is not None
            and r.feature_version == s.version
            and r.model_version == version
            for s, r in zip(states, records, strict=True)
        )
    finally:
        await store.close()


async def sample_states(redis_url: str, users: list[str]) -> list[FeatureState]:
    store = RedisStore(redis_url)
    try:
        return [s for s in await store.get_features(users) if s is not None]
    finally:
        await store.close()


async def has_logged(role: Role, text: str) -> bool:
    return text in role.output()


def test_hot_swap_under_load_loses_nothing_and_refuses_a_corrupted_version(
    clean_redis: str, standin: ModelArtifact, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    install(registry, standin)
    users = [f"h{i}" for i in range(150)]
    run(seed_users(clean_redis, users))
    port = free_port()
    env = {
        "USEREMBED_REDIS_URL": clean_redis,
        "USEREMBED_REGISTRY_PATH": str(registry),
        "USEREMBED_HISTORY_LENGTH": "20",
        "USEREMBED_WORKER_MODEL_POLL_S": "0.2",
        "USEREMBED_REEMBED_RATE": "2000",
    }

    async def scenario(worker: Role) -> Load:
        load = Load(clean_redis, f"http://127.0.0.1:{port}", users)
        tasks = [asyncio.create_task(load.feed()), asyncio.create_task(load.read())]
        try:
            await until(lambda: settled_on(clean_redis, users[:5], "standin-1"), "v1 serving")
            states = await sample_states(clean_redis, users)
            publish_standin(
                registry,
                version="standin-2",
                history_length=20,
                seed=2,
                parent_version="standin-1",
                alignment_states=states,
            )
            swapped = "event=model_swapped model=default from=standin-1 to=standin-2"
            await until(lambda: has_logged(worker, swapped), "the swap")
            corrupted = publish_standin(registry, version="standin-3", history_length=20, seed=3)
            corrupted.model_path.write_bytes(b"not an onnx model")
            await until(lambda: has_logged(worker, "event=model_refused"), "the refusal")
            await asyncio.sleep(0.5)  # keep the load on a little after the refusal
        finally:
            load.stop.set()
            await asyncio.gather(*tasks)
        await until(lambda: settled_on(clean_redis, users, "standin-2"), "every user on v2")
        return load

    with (
        userembed("worker", env=env) as worker,
        userembed("serve", "--port", str(port), "--grpc-port", "0", env=env) as api,
    ):
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").is_success, 30, "readyz")
        load = run(scenario(worker))
        assert load.failures == [] and load.reads > 50
        assert load.offset > 0
        for process in (worker, api):
            assert process.poll() is None, process.output()
        output = worker.output()
        assert "event=model_refused model=default version=standin-3" in output
        assert "event=reembed_done model=default version=standin-2" in output
    records = run(_records(clean_redis, users))
    served_in = {(r.model_version, r.space_version) for r in records if r is not None}
    assert served_in == {("standin-2", "standin-1")} and None not in records


async def _records(redis_url: str, users: list[str]) -> list[EmbeddingRecord | None]:
    store = RedisStore(redis_url)
    try:
        return list(await store.get_embeddings(users))
    finally:
        await store.close()


async def until(probe: Callable[[], Awaitable[bool]], what: str, timeout_s: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        if await probe():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
