"""Both front ends (HTTP in process, gRPC on a real port) over one reader against a real
redis-server: fresh, stale (refresh enqueued once), cold start, pinning, errors, auth,
health and reflection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from service.api.app import create_app
from service.api.cold_start import ColdStart
from service.api.grpc_service import start_grpc_server
from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.api.proto.userembed.v1 import embeddings_pb2_grpc as pb_grpc
from service.api.reads import EmbeddingReader
from service.core.embeddings import EmbeddingRecord
from service.settings import Settings
from service.store.keys import DEFAULT_SHARDS, KeyLayout
from service.store.redis import RedisStore
from tests.helpers import BASE_TS, Delta

pytestmark = [pytest.mark.redis]

COLD = ColdStart(np.full(4, 0.5, dtype=np.float32), "m1")
VECTOR = np.array([0.25, -1.0, 2.0, 0.0], dtype=np.float16)
STATUS = {v: k for k, v in pb.Status.items()}


class Clock:
    def __init__(self) -> None:
        self.now = BASE_TS

    def __call__(self) -> int:
        return self.now


@dataclass
class Api:
    store: RedisStore
    http: httpx.AsyncClient
    stub: pb_grpc.EmbeddingsStub
    channel: grpc.aio.Channel
    clock: Clock
    redis_url: str
    stop_flusher: Callable[[], Awaitable[None]]

    async def settle(self) -> list[str]:
        """Stop the refresh flusher and return the dirty queue: its final flush has
        written every request made so far, so this is all the reads asked for."""
        await self.stop_flusher()
        return self.dirty()

    async def put(self, user_id: str, computed_at: int = BASE_TS, space: str = "m1") -> None:
        await self.store.put_embeddings(
            {user_id: EmbeddingRecord(VECTOR, "m1", space, computed_at, 5)}
        )

    async def read(self, protocol: str, user_id: str, pin: str = "") -> tuple[str, Any]:
        """(status or error code, body) of one read over ``protocol``."""
        if protocol == "http":
            query = f"?model_version={pin}" if pin else ""
            response = await self.http.get(f"/v1/users/{user_id}/embedding{query}")
            body = response.json()
            return (
                body["status"] if response.status_code == 200 else str(response.status_code)
            ), body
        try:
            message = await self.stub.GetEmbedding(
                pb.GetEmbeddingRequest(user_id=user_id, model_version=pin)
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details()
        return STATUS[message.status].removeprefix("STATUS_").lower(), message

    def dirty(self) -> list[str]:
        client = redis.Redis.from_url(self.redis_url)
        try:
            layout = KeyLayout(DEFAULT_SHARDS)
            return sorted(
                u.decode()
                for shard in range(layout.shards)
                for u in client.zrange(layout.dirty_key(shard), 0, -1)
            )
        finally:
            client.close()


@pytest.fixture
async def api_factory(
    clean_redis: str,
) -> AsyncIterator[Callable[..., Any]]:
    cleanups: list[Callable[[], Any]] = []

    async def make(**overrides: Any) -> Api:
        settings = Settings(refresh_after_s=60, refresh_coalesce_s=30, **overrides)
        clock = Clock()
        store = RedisStore(clean_redis, timeout_ms=2000)
        reader = EmbeddingReader.from_settings(store, settings, lambda: COLD, clock)
        stop = asyncio.Event()
        flusher = asyncio.create_task(reader.run(stop))
        app = create_app(store, settings, lambda: COLD, clock=clock, reader=reader)
        http = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api")
        server, port = await start_grpc_server(reader, settings, "127.0.0.1", 0)
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")

        async def stop_flusher() -> None:
            stop.set()
            await flusher

        async def cleanup() -> None:
            await channel.close()
            await server.stop(grace=None)
            await http.aclose()
            await stop_flusher()
            await store.close()

        cleanups.append(cleanup)
        stub = pb_grpc.EmbeddingsStub(channel)
        return Api(store, http, stub, channel, clock, clean_redis, stop_flusher)

    yield make
    for cleanup in reversed(cleanups):
        await cleanup()


@pytest.fixture
async def api(api_factory: Callable[..., Any]) -> Api:
    made: Api = await api_factory()
    return made


async def wait_for_dirty(api: Api, expected: list[str]) -> list[str]:
    for _ in range(200):
        if (found := api.dirty()) == expected:
            return found
        await asyncio.sleep(0.01)
    return api.dirty()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_fresh_embedding(api: Api, protocol: str) -> None:
    await api.put("u1", BASE_TS - 250)
    status, body = await api.read(protocol, "u1")
    assert status == "fresh"
    if protocol == "http":
        assert body["embedding"] == VECTOR.astype(np.float32).tolist()
        assert (body["staleness_ms"], body["feature_version"]) == (250, 5)
    else:
        assert np.frombuffer(body.vector, "<f4").tolist() == VECTOR.astype(np.float32).tolist()
        assert (body.staleness_ms, body.feature_version, body.dim) == (250, 5, 4)
        assert body.encoding == pb.ENCODING_FLOAT32
    assert await api.settle() == []  # a fresh read asks for no refresh


async def test_stale_embedding_is_refreshed_once_across_protocols(api: Api) -> None:
    await api.put("u1", BASE_TS)
    api.clock.now = BASE_TS + 61_000
    enqueued = Delta("userembed_api_refresh_enqueued_total")
    for protocol in ("http", "grpc"):
        assert (await api.read(protocol, "u1"))[0] == "stale"
    assert await wait_for_dirty(api, ["u1"]) == ["u1"]  # flushed: the next reads coalesce
    for protocol in ("http", "grpc"):
        assert (await api.read(protocol, "u1"))[0] == "stale"
    assert await api.settle() == ["u1"]
    assert enqueued() == 1


@pytest.mark.parametrize("protocol", ["http", "grpc"])
async def test_cold_start_and_its_refresh(api: Api, protocol: str) -> None:
    status, body = await api.read(protocol, "newcomer")
    assert status == "cold_start"
    if protocol == "grpc":
        assert np.frombuffer(body.vector, "<f4").tolist() == [0.5] * 4
        assert not body.HasField("computed_at") and body.model_version == "m1"
    assert await wait_for_dirty(api, ["newcomer"]) == ["newcomer"]


@pytest.mark.parametrize(
    ("protocol", "mismatch", "missing"),
    [("http", "409", "404"), ("grpc", "FAILED_PRECONDITION", "NOT_FOUND")],
)
async def test_pinning(api: Api, protocol: str, mismatch: str, missing: str) -> None:
    await api.put("old", space="m0")
    await api.put("new", space="m1")
    assert (await api.read(protocol, "new", pin="m1"))[0] == "fresh"
    assert (await api.read(protocol, "old", pin="m0"))[0] == "fresh"
    status, body = await api.read(protocol, "old", pin="m1")
    assert status == mismatch
    assert "in space 'm0'" in str(body)
    assert (await api.read(protocol, "nobody", pin="m1"))[0] == "cold_start"
    assert (await api.read(protocol, "nobody", pin="m0"))[0] == missing


async def test_grpc_batch_get_in_order_with_float16_and_statuses(api: Api) -> None:
    await api.put("a", space="m0")
    await api.put("b")
    response = await api.stub.BatchGetEmbeddings(
        pb.BatchGetEmbeddingsRequest(
            user_ids=["b", "a", "zz", "b"], encoding=pb.ENCODING_FLOAT16, model_version="m1"
        )
    )
    got = [(e.user_id, STATUS[e.status], len(e.vector)) for e in response.embeddings]
    assert got == [
        ("b", "STATUS_FRESH", 8),
        ("a", "STATUS_VERSION_MISMATCH", 0),
        ("zz", "STATUS_COLD_START", 8),
        ("b", "STATUS_FRESH", 8),
    ]
    vector = np.frombuffer(response.embeddings[0].vector, "<f2")
    assert vector.tolist() == VECTOR.tolist()


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        (pb.GetEmbeddingRequest(user_id="a b"), "invalid user_id 'a b'"),
        (pb.GetEmbeddingRequest(user_id=""), "1..128 chars"),
        (pb.GetEmbeddingRequest(user_id="u1", encoding=7), "unknown encoding 7"),  # type: ignore[arg-type]
        (pb.GetEmbeddingRequest(user_id="u1", model_version="../x"), "invalid model version"),
    ],
)
async def test_grpc_invalid_arguments(
    api: Api, request_: pb.GetEmbeddingRequest, reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.GetEmbedding(request_)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert reason in (caught.value.details() or "")


async def test_grpc_oversized_batch(api_factory: Callable[..., Any]) -> None:
    api: Api = await api_factory(batch_get_max_ids=2)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await api.stub.BatchGetEmbeddings(pb.BatchGetEmbeddingsRequest(user_ids=["a", "b", "c"]))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "3 user_ids requested; at most 2 per call"


async def test_grpc_request_ids_and_metrics(api: Api) -> None:
    requests = Delta(
        "userembed_api_request_seconds_count",
        {"protocol": "grpc", "route": "/userembed.v1.Embeddings/GetEmbedding", "status": "OK"},
    )
    call = api.stub.GetEmbedding(
        pb.GetEmbeddingRequest(user_id="u9"), metadata=(("x-request-id", "rank-9"),)
    )
    await call
    assert ("x-request-id", "rank-9") in tuple(await call.trailing_metadata())
    assert requests() == 1


async def test_grpc_health_and_reflection(api: Api) -> None:
    health = health_pb2_grpc.HealthStub(api.channel)
    for service in ("", "userembed.v1.Embeddings"):
        answer = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert answer.status == health_pb2.HealthCheckResponse.SERVING
    stub = reflection_pb2_grpc.ServerReflectionStub(api.channel)
    responses = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names = [s.name async for r in responses for s in r.list_services_response.service]
    assert "userembed.v1.Embeddings" in names and "grpc.health.v1.Health" in names


async def test_grpc_api_keys(api_factory: Callable[..., Any]) -> None:
    api: Api = await api_factory(api_keys=["k1", "k2"])
    request = pb.GetEmbeddingRequest(user_id="u1")
    for metadata in ((), (("authorization", "Bearer nope"),), (("authorization", "k2"),)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await api.stub.GetEmbedding(request, metadata=metadata)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    answer = await api.stub.GetEmbedding(request, metadata=(("authorization", "Bearer k2"),))
    assert answer.status == pb.STATUS_COLD_START
    health = health_pb2_grpc.HealthStub(api.channel)
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == 1  # open by default


async def test_grpc_ops_services_can_require_keys(api_factory: Callable[..., Any]) -> None:
    api: Api = await api_factory(api_keys=["k1"], api_auth_ops=True)
    health = health_pb2_grpc.HealthStub(api.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await health.Check(health_pb2.HealthCheckRequest())
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ok = await health.Check(
        health_pb2.HealthCheckRequest(), metadata=(("authorization", "Bearer k1"),)
    )
    assert ok.status == health_pb2.HealthCheckResponse.SERVING
