"""Redis stopped, or stalled, under a running API: bounded 503 / UNAVAILABLE answers with
Retry-After, then recovery by itself once Redis is back (nothing restarted)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil

import grpc
import httpx
import numpy as np
import pytest
import redis

from service.api.app import create_app
from service.api.cold_start import ColdStart
from service.api.grpc_service import start_grpc_server
from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.api.proto.userembed.v1 import embeddings_pb2_grpc as pb_grpc
from service.api.reads import EmbeddingReader
from service.core.embeddings import EmbeddingRecord
from service.settings import Settings
from service.store.redis import RedisStore
from service.store.redis_server import free_port, private_redis
from tests.helpers import Delta

pytestmark = [pytest.mark.redis, pytest.mark.slow]

COLD = ColdStart(np.zeros(4, dtype=np.float32), "m1")


@pytest.fixture(autouse=True)
def _needs_redis_server() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is required in CI")
        pytest.skip("redis-server is not installed")


async def put(url: str) -> None:
    store = RedisStore(url, timeout_ms=2000)
    record = EmbeddingRecord(np.ones(4, dtype=np.float16), "m1", "m1", 0, 1)
    await store.put_embeddings({"u1": record})
    await store.close()


async def answers(http: httpx.AsyncClient, stub: pb_grpc.EmbeddingsStub) -> list[object]:
    """[HTTP status of GET, its Retry-After, HTTP status of batchGet, gRPC code name]."""
    single = await http.get("/v1/users/u1/embedding")
    batch = await http.post("/v1/embeddings:batchGet", json={"user_ids": ["u1", "u2"]})
    try:
        await stub.GetEmbedding(pb.GetEmbeddingRequest(user_id="u1"))
        code = "OK"
    except grpc.aio.AioRpcError as exc:
        code = exc.code().name
    return [single.status_code, single.headers.get("retry-after"), batch.status_code, code]


async def test_redis_stopped_then_restarted() -> None:
    port = free_port()
    settings = Settings(api_read_timeout_ms=500, api_retry_after_s=2)
    async with contextlib.AsyncExitStack() as stack:
        with private_redis(port) as url:
            store = RedisStore(url, timeout_ms=200)
            stack.push_async_callback(store.close)
            reader = EmbeddingReader.from_settings(store, settings, lambda: COLD)
            app = create_app(store, settings, lambda: COLD, reader=reader)
            transport = httpx.ASGITransport(app=app)
            http = await stack.enter_async_context(
                httpx.AsyncClient(transport=transport, base_url="http://api")
            )
            server, grpc_port = await start_grpc_server(reader, settings, "127.0.0.1", 0)
            stack.push_async_callback(server.stop, None)
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}")
            stack.push_async_callback(channel.close)
            stub = pb_grpc.EmbeddingsStub(channel)
            await put(url)
            assert await answers(http, stub) == [200, None, 200, "OK"]

        # redis-server is gone: immediate 503s with Retry-After, not hangs
        errors = Delta("userembed_api_store_errors_total")
        assert await answers(http, stub) == [503, "2", 503, "UNAVAILABLE"]
        error = (await http.get("/v1/users/u1/embedding")).json()["error"]
        assert error["code"] == "store_unavailable" and "retry shortly" in error["message"]
        assert errors() == 4  # one failed store call per read, the batch's included

        with private_redis(port) as url_again:  # back on the same address, empty
            assert url_again == url
            await put(url)
            assert await answers(http, stub) == [200, None, 200, "OK"]


async def test_stalled_redis_is_a_bounded_503_then_recovers(clean_redis: str) -> None:
    settings = Settings(api_read_timeout_ms=150)
    store = RedisStore(clean_redis, timeout_ms=5000)  # only the read bound can fire
    await put(clean_redis)
    app = create_app(store, settings, lambda: COLD)
    admin = redis.Redis.from_url(clean_redis)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://api"
    ) as http:
        try:
            admin.execute_command("CLIENT", "PAUSE", 1000, "ALL")
            stalled = await http.get("/v1/users/u1/embedding")
            assert stalled.status_code == 503
            assert stalled.headers["retry-after"] == "1"
            assert "did not answer within 150 ms" in stalled.json()["error"]["message"]
        finally:
            admin.execute_command("CLIENT", "UNPAUSE")
            admin.close()
        for _ in range(50):
            if (await http.get("/v1/users/u1/embedding")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the API did not recover after Redis came back")
    await store.close()


class CountingStore(RedisStore):
    """A real RedisStore that counts its dirty-queue writes (attempts, failed or not)."""

    attempts = 0

    async def mark_dirty(self, dirty_at_ms: dict[str, int]) -> None:  # type: ignore[override]
        self.attempts += 1
        await super().mark_dirty(dirty_at_ms)


async def test_refresh_flushes_back_off_while_redis_is_down_and_deliver_after(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from service.api.refresh import RefreshRequester

    caplog.set_level(logging.INFO, logger="service.api.refresh")
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    store = CountingStore(url, timeout_ms=50)
    requester = RefreshRequester(store, coalesce_ms=0, max_backoff_s=0.2)
    requester.request(["u1", "u2"])
    stop = asyncio.Event()
    task = asyncio.create_task(requester.run(stop))
    await asyncio.sleep(1.0)  # Redis is down all along
    failed_attempts = store.attempts
    # every 5 ms would be ~200 attempts; backing off 10, 20, ... 200 ms: about a dozen
    assert 3 <= failed_attempts <= 15, failed_attempts
    warnings = [r for r in caplog.records if "refresh_flush_failed" in r.getMessage()]
    assert len(warnings) == 1  # once per outage, not once per attempt
    with private_redis(port=port):
        deadline = asyncio.get_running_loop().time() + 10
        while "refresh_flush_recovered" not in caplog.text:
            assert asyncio.get_running_loop().time() < deadline, "no recovery"
            await asyncio.sleep(0.05)
        stop.set()
        await task
        check = RedisStore(url)
        assert sorted(u for u, _ in await check.pop_dirty(10)) == ["u1", "u2"]  # kept, then sent
        await check.close()
    await store.close()
