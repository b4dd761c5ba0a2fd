"""Several models on a real `userembed serve` (HTTP and gRPC) over a real redis-server:
two models of different dims read together in one request (one MGET), per-model pins,
unknown models, the model listing following the registry at run time, and a client
that never names a model getting exactly the answers it got before."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import redis

from models.registry import model_root, retire_model
from models.standin import publish_standin
from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.api.proto.userembed.v1 import embeddings_pb2_grpc as pb_grpc
from service.core.clock import now_ms
from service.core.embeddings import EmbeddingRecord
from service.store.redis import RedisStore
from service.store.redis_server import free_port
from tests.helpers import ANSWER_FIELDS_BEFORE_MODELS
from tests.processes import Role, userembed, wait_for

pytestmark = [pytest.mark.redis, pytest.mark.slow]

DIMS = {"default": 8, "clicks": 16}
VERSIONS = {"default": "base-1", "clicks": "clicks-1"}
TODAY = ANSWER_FIELDS_BEFORE_MODELS
BATCH = "/v1/embeddings:batchGet"


def steady(answer: dict[str, Any]) -> dict[str, Any]:
    """An answer without its staleness (the server's clock runs between two reads)."""
    return {k: v for k, v in answer.items() if k != "staleness_ms"}


@dataclass
class Server:
    http: str
    grpc: str
    process: Role
    registry: Path
    redis_url: str

    def post(self, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{self.http}{BATCH}", json=body, timeout=10)

    def get(self, user_id: str, **query: str) -> httpx.Response:
        return httpx.get(f"{self.http}/v1/users/{user_id}/embedding", params=query, timeout=10)

    def models(self) -> list[str]:
        listing = httpx.get(f"{self.http}/v1/models", timeout=10).json()
        return [m["name"] for m in listing["models"]]

    def mget_calls(self) -> int:
        client = redis.Redis.from_url(self.redis_url)
        try:
            stats = client.info("commandstats").get("cmdstat_mget", {"calls": 0})
            return int(stats["calls"])
        finally:
            client.close()

    def grpc_call(self, method: str, request: Any) -> Any:
        async def call() -> Any:
            async with grpc.aio.insecure_channel(self.grpc) as channel:
                return await getattr(pb_grpc.EmbeddingsStub(channel), method)(request, timeout=10)

        return asyncio.run(call())


def _registry(root: Path) -> Path:
    publish_standin(root, version=VERSIONS["default"], history_length=20, output_dim=8)
    publish_standin(
        model_root(root, "clicks"),
        version=VERSIONS["clicks"],
        history_length=20,
        output_dim=16,
        seed=3,
    )
    return root


def _put(redis_url: str) -> None:
    """u1 in both models, u2 in clicks only, 'moved' in another space of clicks."""
    now = now_ms()
    rng = np.random.default_rng(0)

    def rec(model: str, space: str | None = None) -> EmbeddingRecord:
        vector = rng.standard_normal(DIMS[model]).astype(np.float16)
        version = VERSIONS[model]
        return EmbeddingRecord(vector, version, space or version, now, 7)

    async def write() -> None:
        store = RedisStore(redis_url, timeout_ms=2000)
        try:
            await store.put_embeddings({"u1": rec("default")})
            clicks = {"u1": rec("clicks"), "u2": rec("clicks"), "moved": rec("clicks", "old")}
            await store.put_embeddings(clicks, "clicks")
        finally:
            await store.close()

    asyncio.run(write())


@contextmanager
def serve(redis_url: str, registry: Path) -> Iterator[Server]:
    http_port, grpc_port = free_port(), free_port()
    environment = {
        "USEREMBED_REDIS_URL": redis_url,
        "USEREMBED_REGISTRY_PATH": str(registry),
        "USEREMBED_API_EVENTS_ENABLED": "false",
        "USEREMBED_REFRESH_AFTER_S": "3600",
        "USEREMBED_BATCH_GET_MAX_IDS": "6",
    }
    args = ("serve", "--port", str(http_port), "--grpc-port", str(grpc_port))
    with userembed(*args, env=environment) as process:
        http = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: httpx.get(f"{http}/readyz").status_code == 200, 60, "serve ready")
        yield Server(http, f"127.0.0.1:{grpc_port}", process, registry, redis_url)
    assert process.returncode in (0, None, -15), process.output()[-3000:]


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    redis.Redis.from_url(redis_url).flushdb()
    _put(redis_url)
    with serve(redis_url, _registry(tmp_path_factory.mktemp("registry"))) as running:
        yield running


def test_two_models_of_different_dims_in_one_request_and_one_read(server: Server) -> None:
    before = server.mget_calls()
    body = {"user_ids": ["u1", "u2", "nobody"], "models": ["default", "clicks"]}
    response = server.post(body)
    assert server.mget_calls() - before == 1
    answers = response.json()["embeddings"]
    assert [(a["user_id"], a["model"], a["status"], a["dim"]) for a in answers] == [
        ("u1", "default", "fresh", 8),
        ("u1", "clicks", "fresh", 16),
        ("u2", "default", "cold_start", 8),
        ("u2", "clicks", "fresh", 16),
        ("nobody", "default", "cold_start", 8),
        ("nobody", "clicks", "cold_start", 16),
    ]
    assert [a["model_version"] for a in answers] == ["base-1", "clicks-1"] * 3
    single = server.get("u2", model="clicks").json()
    assert steady(single) == steady(answers[3])
    too_many = server.post({**body, "user_ids": ["u1", "u2", "u3", "u4"]})
    assert (too_many.status_code, too_many.json()["error"]["message"]) == (
        400,
        "4 user_ids x 2 models = 8 embeddings requested; at most 6 per call",
    )


def test_pins_are_per_model(server: Server) -> None:
    body = {
        "user_ids": ["u1", "moved"],
        "models": ["default", "clicks"],
        "model_versions": {"default": "base-1", "clicks": "old"},
    }
    answers = server.post(body).json()["embeddings"]
    assert [(a["model"], a["status"]) for a in answers] == [
        ("default", "fresh"),
        ("clicks", "version_mismatch"),  # u1's clicks record is in clicks-1, not 'old'
        ("default", "cold_start"),
        ("clicks", "fresh"),
    ]
    mismatch = server.get("moved", model="clicks", model_version="clicks-1")
    assert (mismatch.status_code, mismatch.json()["error"]["code"]) == (409, "version_mismatch")
    assert server.get("u1", model_version="base-1").status_code == 200
    both = server.post({**body, "model_version": "base-1"})
    assert (both.status_code, both.json()["error"]["code"]) == (400, "invalid_request")


def test_an_unknown_model_is_a_404_listing_the_served_ones(server: Server) -> None:
    expected = {
        "code": "unknown_model",
        "message": "model 'views' is not served; served models: default, clicks",
    }
    assert server.get("u1", model="views").json() == {"error": expected}
    response = server.post({"user_ids": ["u1"], "models": ["clicks", "views"]})
    assert (response.status_code, response.json()) == (404, {"error": expected})
    invalid = server.get("u1", model="no.dots")
    assert (invalid.status_code, invalid.json()["error"]["code"]) == (400, "invalid_model")


def test_a_client_that_never_names_a_model_sees_todays_answers(server: Server) -> None:
    plain = server.get("u1").json()
    assert list(plain) == TODAY and plain["dim"] == 8 and plain["status"] == "fresh"
    named = server.get("u1", model="default").json()
    assert steady(named) == {**steady(plain), "model": "default"}
    before = server.mget_calls()
    batch = server.post({"user_ids": ["u1", "nobody"]}).json()["embeddings"]
    assert server.mget_calls() - before == 1
    assert [list(a) for a in batch] == [TODAY, TODAY]
    assert steady(batch[0]) == steady(plain)
    assert [(a["status"], a["dim"]) for a in batch] == [("fresh", 8), ("cold_start", 8)]
    message = server.grpc_call("GetEmbedding", pb.GetEmbeddingRequest(user_id="u1"))
    assert (message.model, message.dim, message.model_version) == ("", 8, "base-1")
    assert message.computed_at == plain["computed_at"]


def test_grpc_reads_several_models(server: Server) -> None:
    request = pb.BatchGetEmbeddingsRequest(
        user_ids=["u1", "moved"], models=["clicks", "default"], model_versions={"clicks": "old"}
    )
    before = server.mget_calls()
    answers = server.grpc_call("BatchGetEmbeddings", request).embeddings
    assert server.mget_calls() - before == 1
    assert [(a.user_id, a.model, pb.Status.Name(a.status), a.dim) for a in answers] == [
        ("u1", "clicks", "STATUS_VERSION_MISMATCH", 0),
        ("u1", "default", "STATUS_FRESH", 8),
        ("moved", "clicks", "STATUS_FRESH", 16),
        ("moved", "default", "STATUS_COLD_START", 8),
    ]
    one = server.grpc_call("GetEmbedding", pb.GetEmbeddingRequest(user_id="u2", model="clicks"))
    assert (one.model, one.dim, len(one.vector)) == ("clicks", 16, 64)  # float32 by default
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        server.grpc_call("GetEmbedding", pb.GetEmbeddingRequest(user_id="u1", model="views"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    assert unknown.value.details() == "model 'views' is not served; served models: default, clicks"
    with pytest.raises(grpc.aio.AioRpcError) as pinned:
        server.grpc_call(
            "GetEmbedding",
            pb.GetEmbeddingRequest(user_id="moved", model="clicks", model_version="clicks-1"),
        )
    assert pinned.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    listing = server.grpc_call("ListModels", pb.ListModelsRequest()).models
    assert [(m.name, m.version, m.dim, m.dtype) for m in listing] == [
        ("default", "base-1", 8, "float16"),
        ("clicks", "clicks-1", 16, "float16"),
    ]


def test_the_model_listing_follows_the_registry_at_run_time(redis_url: str, tmp_path: Path) -> None:
    registry = _registry(tmp_path / "registry")
    with serve(redis_url, registry) as running:
        listing = httpx.get(f"{running.http}/v1/models", timeout=10).json()["models"]
        assert [(m["name"], m["version"], m["space_version"], m["dim"]) for m in listing] == [
            ("default", "base-1", "base-1", 8),
            ("clicks", "clicks-1", "clicks-1", 16),
        ]
        assert {(m["dtype"], m["cold_start"]) for m in listing} == {("float16", "available")}
        assert all(len(m["input_schema_hash"]) == 64 for m in listing)
        publish_standin(model_root(registry, "views"), version="views-1", history_length=20)
        retire_model(registry, "clicks")
        wait_for(lambda: running.models() == ["default", "views"], 30, "views in, clicks out")
        views = running.get("nobody", model="views").json()
        assert (views["model"], views["status"], views["dim"]) == ("views", "cold_start", 128)
        gone = running.get("u1", model="clicks")
        assert gone.status_code == 404
        assert gone.json()["error"]["message"] == (
            "model 'clicks' is not served; served models: default, views"
        )
