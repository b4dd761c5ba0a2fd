"""Several models on the read API, in process: the registry follower (served models, a
cold start per model, added and retired models, a broken version), and both front ends'
model parameters, answer shapes, errors and model listing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from fastapi.testclient import TestClient

from models.registry import model_root, retire_model
from models.standin import publish_standin
from service.api.app import create_app
from service.api.cold_start import (
    ColdStart,
    ModelState,
    RegistryColdStart,
    SingleModel,
    as_served_models,
)
from service.api.grpc_service import start_grpc_server
from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.api.proto.userembed.v1 import embeddings_pb2_grpc as pb_grpc
from service.api.reads import EmbeddingReader
from service.core.embeddings import EmbeddingRecord
from service.settings import Settings
from service.store.memory import MemoryStore
from tests.helpers import ANSWER_FIELDS_BEFORE_MODELS, BASE_TS

COLD = ColdStart(np.full(4, 0.5, dtype=np.float32), "m1")
CLICKS_COLD = ColdStart(np.full(2, -1.0, dtype=np.float32), "c2", "c1")
TODAY = ANSWER_FIELDS_BEFORE_MODELS


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- the registry follower -----------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """The default model (8-d) and 'clicks' (16-d)."""
    root = tmp_path / "registry"
    publish_standin(root, version="base-1", history_length=20, output_dim=8)
    publish_standin(
        model_root(root, "clicks"), version="clicks-1", history_length=20, output_dim=16, seed=3
    )
    return root


def test_the_registry_follower_knows_every_served_model(registry: Path) -> None:
    clock = Clock()
    models = RegistryColdStart(registry, recheck_s=5.0, monotonic=clock)
    assert models.served() == ("default", "clicks")
    default, clicks = models.cold_start("default"), models.cold_start("clicks")
    assert default is not None and clicks is not None
    assert (default.model_version, default.vector.shape) == ("base-1", (8,))
    assert (clicks.model_version, clicks.space_version, clicks.vector.shape) == (
        "clicks-1",
        "clicks-1",
        (16,),
    )
    assert models() is default  # called: the default model's cold start
    assert models.cold_start("nope") is None
    states = models.states()
    assert [(s.name, s.version, s.space_version, s.dim, s.cold_start_loaded) for s in states] == [
        ("default", "base-1", "base-1", 8, True),
        ("clicks", "clicks-1", "clicks-1", 16, True),
    ]
    assert all(s.input_schema_hash and len(s.input_schema_hash) == 64 for s in states)
    assert as_served_models(models) is models


def test_the_follower_sees_models_added_and_retired_at_its_next_check(registry: Path) -> None:
    clock = Clock()
    models = RegistryColdStart(registry, recheck_s=5.0, monotonic=clock)
    assert models.served() == ("default", "clicks")
    publish_standin(model_root(registry, "extra"), version="extra-1", history_length=20)
    retire_model(registry, "clicks")
    clock.now = 4.9
    assert models.served() == ("default", "clicks")  # not re-checked yet
    clock.now = 5.0
    assert models.served() == ("default", "extra")
    assert models.cold_start("clicks") is None
    extra = models.cold_start("extra")
    assert extra is not None and extra.vector.shape == (128,)
    publish_standin(registry, version="base-2", history_length=20, output_dim=8, seed=5)
    clock.now = 10.0
    default = models.cold_start("default")
    assert default is not None and default.model_version == "base-2"


def test_a_broken_version_keeps_the_last_good_cold_start(registry: Path, tmp_path: Path) -> None:
    clock = Clock()
    models = RegistryColdStart(registry, recheck_s=1.0, monotonic=clock)
    assert models.served() == ("default", "clicks")
    publish_standin(
        model_root(registry, "clicks"), version="clicks-2", history_length=20, output_dim=16
    )
    (model_root(registry, "clicks") / "clicks-2" / "model.onnx").write_bytes(b"corrupted")
    broken = model_root(registry, "broken")
    publish_standin(broken, version="broken-1", history_length=20, output_dim=8)
    (broken / "broken-1" / "manifest.json").write_text("{")
    clock.now = 1.0
    clicks = models.cold_start("clicks")
    assert clicks is not None and clicks.model_version == "clicks-1"
    assert models.served() == ("default", "broken", "clicks")
    assert models.cold_start("broken") is None
    states = {s.name: s for s in models.states()}
    assert states["broken"] == ModelState("broken", "broken-1")
    assert (states["clicks"].version, states["clicks"].cold_start_loaded) == ("clicks-1", True)
    # repaired in place: loaded at the next check (a broken version is tried again)
    publish_standin(broken, version="broken-2", history_length=20, output_dim=8)
    clock.now = 2.0
    assert models.states()[1] == ModelState(
        "broken", "broken-2", "broken-2", 8, models.states()[1].input_schema_hash, True
    )
    empty = RegistryColdStart(tmp_path / "nothing-here")
    assert (empty.served(), empty(), empty.states()) == ((), None, [])


def test_a_plain_cold_start_is_the_default_model_alone() -> None:
    single = as_served_models(lambda: COLD)
    assert isinstance(single, SingleModel)
    assert single.served() == ("default",)
    assert single.cold_start("default") is COLD and single.cold_start("clicks") is None
    assert single.states() == [ModelState("default", "m1", "m1", 4, None, True)]
    assert SingleModel(lambda: None).states() == [ModelState("default", None)]
    state = ModelState("x", "v", cold_start_loaded=True)
    assert (state.cold_start_status(False), state.cold_start_status(True)) == (
        "available",
        "disabled",
    )
    assert ModelState("x", None).cold_start_status(False) == "unavailable"


# -- the front ends ---------------------------------------------------------------------------


class Models:
    """'default' and 'clicks', each with a cold start."""

    def served(self) -> Sequence[str]:
        return ("default", "clicks")

    def cold_start(self, model: str) -> ColdStart | None:
        return {"default": COLD, "clicks": CLICKS_COLD}.get(model)

    def states(self) -> list[ModelState]:
        return [
            ModelState("default", "m1", "m1", 4, "a" * 64, True),
            ModelState("clicks", "c2", "c1", 2, None, False),
        ]


async def _fill(store: MemoryStore) -> None:
    vector = np.array([0.0, 1.0, 2.0, -3.5], dtype=np.float16)
    await store.put_embeddings({"u1": EmbeddingRecord(vector, "m1", "m1", BASE_TS - 10, 3)})
    clicks = EmbeddingRecord(np.array([0.5, 0.25], np.float16), "c1", "c1", BASE_TS - 20, 4)
    await store.put_embeddings({"u1": clicks}, "clicks")


@pytest.fixture
def client() -> Iterator[TestClient]:
    store = MemoryStore()
    settings = Settings(refresh_after_s=60, batch_get_max_ids=4, embedding_dtype="float32")
    app = create_app(store, settings, Models(), clock=lambda: BASE_TS)
    with TestClient(app) as c:
        assert c.portal is not None
        c.portal.call(_fill, store)
        yield c


def test_http_reads_name_their_model(client: TestClient) -> None:
    plain = client.get("/v1/users/u1/embedding").json()
    assert list(plain) == TODAY  # a client that names no model: today's answer exactly
    assert client.get("/v1/users/u1/embedding?model=").json() == plain
    named = client.get("/v1/users/u1/embedding?model=default").json()
    assert named == {**plain, "model": "default"}
    clicks = client.get("/v1/users/u1/embedding?model=clicks&encoding=base64_float32").json()
    assert (clicks["model"], clicks["dim"], clicks["space_version"], clicks["status"]) == (
        "clicks",
        2,
        "c1",
        "fresh",
    )
    assert clicks["embedding"] == "AAAAPwAAgD4="  # 0.5, 0.25 as float32
    cold = client.get("/v1/users/nobody/embedding?model=clicks").json()
    assert (cold["status"], cold["embedding"], cold["model_version"]) == (
        "cold_start",
        [-1.0, -1.0],
        "c2",
    )


def test_http_batch_reads_several_models(client: TestClient) -> None:
    url = "/v1/embeddings:batchGet"
    plain = client.post(url, json={"user_ids": ["u1"]}).json()["embeddings"]
    assert [list(a) for a in plain] == [TODAY]
    body = {"user_ids": ["u1", "u2"], "models": ["clicks", "default"]}
    answers = client.post(url, json=body).json()["embeddings"]
    assert [(a["user_id"], a["model"], a["status"], a["dim"]) for a in answers] == [
        ("u1", "clicks", "fresh", 2),
        ("u1", "default", "fresh", 4),
        ("u2", "clicks", "cold_start", 2),
        ("u2", "default", "cold_start", 4),
    ]
    assert {**plain[0], "model": "default"} == answers[1]
    pinned = client.post(url, json={**body, "model_versions": {"clicks": "c9", "default": ""}})
    assert [a["status"] for a in pinned.json()["embeddings"]] == [
        "version_mismatch",
        "fresh",
        "not_found",
        "cold_start",
    ]
    one = client.post(url, json={"user_ids": ["u1"], "models": ["clicks"], "model_version": "c1"})
    assert [(a["model"], a["status"]) for a in one.json()["embeddings"]] == [("clicks", "fresh")]


@pytest.mark.parametrize(
    ("request_body", "status", "code", "message"),
    [
        (
            {"user_ids": ["u1"], "models": ["nope"]},
            404,
            "unknown_model",
            "model 'nope' is not served; served models: default, clicks",
        ),
        ({"user_ids": ["u1"], "models": ["no.pe"]}, 400, "invalid_model", None),
        ({"user_ids": ["u1"], "models": []}, 400, "invalid_request", None),
        ({"user_ids": ["u1"], "models": ["clicks", "clicks"]}, 400, "invalid_request", None),
        (
            {"user_ids": ["u1"], "models": ["clicks", "default"], "model_version": "c1"},
            400,
            "invalid_request",
            None,
        ),
        ({"user_ids": ["u1"], "model_versions": {"clicks": "c1"}}, 400, "invalid_request", None),
        ({"user_ids": ["u1"], "model_versions": {"clicks": 1}}, 400, "invalid_request", None),
        (
            {"user_ids": ["a", "b", "c"], "models": ["clicks", "default"]},
            400,
            "batch_too_large",
            "3 user_ids x 2 models = 6 embeddings requested; at most 4 per call",
        ),
    ],
)
def test_http_batch_errors(
    client: TestClient, request_body: dict[str, Any], status: int, code: str, message: str | None
) -> None:
    response = client.post("/v1/embeddings:batchGet", json=request_body)
    error = response.json()["error"]
    assert (response.status_code, error["code"]) == (status, code)
    if message is not None:
        assert error["message"] == message


def test_http_single_read_errors(client: TestClient) -> None:
    unknown = client.get("/v1/users/u1/embedding?model=nope")
    assert unknown.status_code == 404
    assert unknown.json()["error"] == {
        "code": "unknown_model",
        "message": "model 'nope' is not served; served models: default, clicks",
    }
    invalid = client.get("/v1/users/u1/embedding?model=a:b")
    assert (invalid.status_code, invalid.json()["error"]["code"]) == (400, "invalid_model")
    mismatch = client.get("/v1/users/u1/embedding?model=clicks&model_version=c9")
    assert (mismatch.status_code, mismatch.json()["error"]["code"]) == (409, "version_mismatch")


def test_http_lists_the_served_models(client: TestClient) -> None:
    assert client.get("/v1/models").json() == {
        "models": [
            {
                "name": "default",
                "version": "m1",
                "space_version": "m1",
                "dim": 4,
                "dtype": "float32",
                "input_schema_hash": "a" * 64,
                "cold_start": "available",
            },
            {
                "name": "clicks",
                "version": "c2",
                "space_version": "c1",
                "dim": 2,
                "dtype": "float32",
                "input_schema_hash": None,
                "cold_start": "unavailable",
            },
        ]
    }
    with TestClient(create_app(MemoryStore(), Settings(cold_start_404=True), lambda: COLD)) as c:
        (only,) = c.get("/v1/models").json()["models"]
    assert (only["name"], only["dim"], only["dtype"], only["cold_start"]) == (
        "default",
        4,
        "float16",
        "disabled",
    )


def test_openapi_describes_the_model_parameters(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    get = schema["paths"]["/v1/users/{user_id}/embedding"]["get"]
    model = {p["name"]: p for p in get["parameters"]}["model"]
    assert model["allowEmptyValue"] and model["schema"]["pattern"].startswith("^(")
    request = schema["components"]["schemas"]["BatchGetRequest"]["properties"]
    assert request["models"]["anyOf"][0]["minItems"] == 1
    assert request["models"]["anyOf"][0]["uniqueItems"] is True
    pins = request["model_versions"]["anyOf"][0]
    assert set(pins) == {"type", "propertyNames", "additionalProperties"}
    assert "model" in schema["components"]["schemas"]["EmbeddingAnswer"]["properties"]
    listing = schema["paths"]["/v1/models"]["get"]["responses"]["200"]
    assert listing["content"]["application/json"]["schema"]["$ref"].endswith("/ModelsResponse")


@pytest.fixture
async def stub() -> AsyncIterator[pb_grpc.EmbeddingsStub]:
    store = MemoryStore()
    await _fill(store)
    settings = Settings(refresh_after_s=60, batch_get_max_ids=4)
    reader = EmbeddingReader.from_settings(store, settings, Models(), clock=lambda: BASE_TS)
    server, port = await start_grpc_server(reader, settings, "127.0.0.1", 0)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield pb_grpc.EmbeddingsStub(channel)
    await server.stop(None)


async def test_grpc_reads_name_their_model(stub: pb_grpc.EmbeddingsStub) -> None:
    plain = await stub.GetEmbedding(pb.GetEmbeddingRequest(user_id="u1"))
    assert (plain.model, plain.dim) == ("", 4)  # not named: not set, as before
    clicks = await stub.GetEmbedding(pb.GetEmbeddingRequest(user_id="u1", model="clicks"))
    assert (clicks.model, clicks.dim, clicks.space_version) == ("clicks", 2, "c1")
    assert np.frombuffer(clicks.vector, "<f4").tolist() == [0.5, 0.25]
    batch = await stub.BatchGetEmbeddings(
        pb.BatchGetEmbeddingsRequest(
            user_ids=["u1", "u2"], models=["default", "clicks"], model_versions={"clicks": "c9"}
        )
    )
    assert [(e.user_id, e.model, pb.Status.Name(e.status)) for e in batch.embeddings] == [
        ("u1", "default", "STATUS_FRESH"),
        ("u1", "clicks", "STATUS_VERSION_MISMATCH"),
        ("u2", "default", "STATUS_COLD_START"),
        ("u2", "clicks", "STATUS_NOT_FOUND"),
    ]
    old = await stub.BatchGetEmbeddings(pb.BatchGetEmbeddingsRequest(user_ids=["u1"]))
    assert [(e.model, e.dim) for e in old.embeddings] == [("", 4)]


async def test_grpc_model_errors_and_listing(stub: pb_grpc.EmbeddingsStub) -> None:
    for call, code in (
        (stub.GetEmbedding(pb.GetEmbeddingRequest(user_id="u1", model="nope")), "NOT_FOUND"),
        (stub.GetEmbedding(pb.GetEmbeddingRequest(user_id="u1", model="a b")), "INVALID_ARGUMENT"),
        (
            stub.BatchGetEmbeddings(
                pb.BatchGetEmbeddingsRequest(user_ids=["u1"], models=["default", "nope"])
            ),
            "NOT_FOUND",
        ),
        (
            stub.BatchGetEmbeddings(
                pb.BatchGetEmbeddingsRequest(user_ids=["a", "b", "c"], models=["default", "clicks"])
            ),
            "INVALID_ARGUMENT",
        ),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code().name == code
        if code == "NOT_FOUND":
            assert caught.value.details() == (
                "model 'nope' is not served; served models: default, clicks"
            )
    listing = await stub.ListModels(pb.ListModelsRequest())
    assert [
        (m.name, m.version, m.space_version, m.dim, m.dtype, pb.ColdStartStatus.Name(m.cold_start))
        for m in listing.models
    ] == [
        ("default", "m1", "m1", 4, "float16", "COLD_START_AVAILABLE"),
        ("clicks", "c2", "c1", 2, "float16", "COLD_START_UNAVAILABLE"),
    ]
    assert listing.models[0].input_schema_hash == "a" * 64
