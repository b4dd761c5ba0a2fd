"""The production gRPC server (generic handlers on raw bytes, :class:`WireReads`) answers
exactly as the servicer on generated messages did (kept as the benchmark's
``aio-messages`` candidate): both serve one reader over a real redis-server, and every
call gets the same response bytes, status code, details and error-code and request-id
trailers from both, for every status, refusal and model parameter."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import pytest

from service.api.cold_start import ColdStart, ModelState
from service.api.grpc_service import ERROR_CODE_METADATA, SERVICE_NAME, start_grpc_server
from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.api.reads import EmbeddingReader
from service.bench.grpc_messages import MessagesService
from service.core.embeddings import EmbeddingRecord
from service.settings import Settings
from service.store.records import COLUMNS_FROM
from service.store.redis import RedisStore
from tests.helpers import BASE_TS

pytestmark = [pytest.mark.redis]

VECTOR = np.array([0.25, -1.0, 2.0, 0.0], dtype=np.float16)
CLICKS = np.array([0.5, 0.25], dtype=np.float16)
COLD = ColdStart(np.full(4, 0.5, dtype=np.float32), "m1")
CLICKS_COLD = ColdStart(np.full(2, -1.0, dtype=np.float32), "c2", "c1")
F16, F32 = pb.ENCODING_FLOAT16, pb.ENCODING_FLOAT32
Get, Batch = pb.GetEmbeddingRequest, pb.BatchGetEmbeddingsRequest
KEYS = (("authorization", "Bearer k1"),)


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


@dataclass(frozen=True)
class Outcome:
    code: grpc.StatusCode
    details: str | None
    body: bytes | None
    trailers: tuple[tuple[str, str | bytes], ...]


@dataclass
class Pair:
    """The same reader behind the production server (``new``) and the old servicer."""

    new: grpc.aio.Channel
    old: grpc.aio.Channel

    async def both(
        self, method: str, request: Any, metadata: tuple[tuple[str, str], ...] = ()
    ) -> tuple[Outcome, Outcome]:
        data = request.SerializeToString() if hasattr(request, "SerializeToString") else request
        metadata = (*metadata, ("x-request-id", "parity-1"))
        return (
            await _call(self.new, method, data, metadata),
            await _call(self.old, method, data, metadata),
        )


async def _call(
    channel: grpc.aio.Channel, method: str, data: bytes, metadata: tuple[tuple[str, str], ...]
) -> Outcome:
    call = channel.unary_unary(f"/{SERVICE_NAME}/{method}")(data, metadata=metadata)
    try:
        body = await call
    except grpc.aio.AioRpcError:
        body = None
    ours = ("x-request-id", ERROR_CODE_METADATA)
    trailers = tuple((k, v) for k, v in await call.trailing_metadata() or () if k in ours)
    return Outcome(await call.code(), await call.details(), body, trailers)


@pytest.fixture
async def pair_factory(clean_redis: str) -> AsyncIterator[Callable[..., Awaitable[Pair]]]:
    store = RedisStore(clean_redis, timeout_ms=2000)
    at = BASE_TS - 250
    await store.put_embeddings(
        {
            "fresh": EmbeddingRecord(VECTOR, "m1", "m1", at, 5),
            "stale": EmbeddingRecord(VECTOR, "m1", "m1", BASE_TS - 120_000, 0),
            "old": EmbeddingRecord(VECTOR, "m0", "m0", at, 2),
            "ahead": EmbeddingRecord(VECTOR, "m1", "m1", BASE_TS + 5_000, 7),  # staleness 0
        }
    )
    await store.put_embeddings({"fresh": EmbeddingRecord(CLICKS, "c1", "c1", at, 4)}, "clicks")
    cleanups: list[Callable[[], Awaitable[None]]] = []

    async def make(**overrides: Any) -> Pair:
        settings = Settings(**{"refresh_after_s": 60, "batch_get_max_ids": 6, **overrides})
        reader = EmbeddingReader.from_settings(store, settings, Models(), lambda: BASE_TS)
        new, new_port = await start_grpc_server(reader, settings, "127.0.0.1", 0)
        old_handlers = MessagesService(reader, settings).handlers()
        old, old_port = await start_grpc_server(
            reader, settings, "127.0.0.1", 0, handlers=old_handlers
        )
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in (new_port, old_port)]

        async def cleanup() -> None:
            for channel in channels:
                await channel.close()
            for server in (new, old):
                await server.stop(grace=None)

        cleanups.append(cleanup)
        return Pair(*channels)

    yield make
    for cleanup in reversed(cleanups):
        await cleanup()
    await store.close()


GETS = {
    "fresh": (Get(user_id="fresh"), "OK"),
    "fresh float32": (Get(user_id="fresh", encoding=F32), "OK"),
    "fresh float16": (Get(user_id="fresh", encoding=F16), "OK"),
    "stale": (Get(user_id="stale", encoding=F16), "OK"),
    "ahead of the clock": (Get(user_id="ahead"), "OK"),
    "cold start": (Get(user_id="nobody", encoding=F16), "OK"),
    "pinned": (Get(user_id="fresh", model_version="m1"), "OK"),
    "version mismatch": (Get(user_id="old", model_version="m1"), "FAILED_PRECONDITION"),
    "not found in the pinned space": (Get(user_id="nobody", model_version="m9"), "NOT_FOUND"),
    "named default": (Get(user_id="fresh", model="default"), "OK"),
    "other model": (Get(user_id="fresh", model="clicks", encoding=F16), "OK"),
    "other model cold start": (Get(user_id="nobody", model="clicks"), "OK"),
    "other model pinned": (Get(user_id="fresh", model="clicks", model_version="c1"), "OK"),
    "unknown model": (Get(user_id="fresh", model="nope"), "NOT_FOUND"),
    "invalid model": (Get(user_id="fresh", model="Bad Name"), "INVALID_ARGUMENT"),
    "invalid user id": (Get(user_id="a b"), "INVALID_ARGUMENT"),
    "empty user id": (Get(user_id=""), "INVALID_ARGUMENT"),
    "invalid encoding": (Get(user_id="fresh", encoding=7), "INVALID_ARGUMENT"),  # type: ignore[arg-type]
    "invalid model version": (Get(user_id="fresh", model_version="../x"), "INVALID_ARGUMENT"),
}
USERS = ["fresh", "stale", "old", "nobody", "ahead", "fresh"]
BATCHES = {
    "statuses": (Batch(user_ids=USERS, encoding=F16), "OK"),
    "statuses float32": (Batch(user_ids=USERS, encoding=F32), "OK"),
    "pinned": (Batch(user_ids=USERS, model_version="m1"), "OK"),
    "pinned elsewhere: not found": (Batch(user_ids=USERS, model_version="m9"), "OK"),
    "no users": (Batch(user_ids=[]), "OK"),
    "models": (Batch(user_ids=["fresh", "nobody"], models=["default", "clicks"]), "OK"),
    "model pins": (
        Batch(
            user_ids=["fresh", "old", "nobody"],
            models=["clicks", "default"],
            model_versions={"clicks": "c9", "default": "m1"},
            encoding=F16,
        ),
        "OK",
    ),
    "other model only": (Batch(user_ids=["fresh", "nobody"], models=["clicks"]), "OK"),
    "unknown model": (Batch(user_ids=["fresh"], models=["nope"]), "NOT_FOUND"),
    "model named twice": (Batch(user_ids=["fresh"], models=["clicks"] * 2), "INVALID_ARGUMENT"),
    "pin of an unnamed model": (
        Batch(user_ids=["fresh"], model_versions={"clicks": "c1"}),
        "INVALID_ARGUMENT",
    ),
    "pin and pins": (
        Batch(
            user_ids=["fresh"],
            models=["clicks"],
            model_version="c1",
            model_versions={"clicks": "c1"},
        ),
        "INVALID_ARGUMENT",
    ),
    "one pin, two models": (
        Batch(user_ids=["fresh"], models=["default", "clicks"], model_version="m1"),
        "INVALID_ARGUMENT",
    ),
    "invalid user id": (Batch(user_ids=["fresh", "a b"]), "INVALID_ARGUMENT"),
    "invalid encoding": (Batch(user_ids=["fresh"], encoding=9), "INVALID_ARGUMENT"),  # type: ignore[arg-type]
    "too many users": (Batch(user_ids=[f"u{i}" for i in range(7)]), "INVALID_ARGUMENT"),
    "too many users x models": (
        Batch(user_ids=["a", "b", "c", "d"], models=["default", "clicks"]),
        "INVALID_ARGUMENT",
    ),
}


def assert_same(new: Outcome, old: Outcome, code: str) -> None:
    assert new == old
    assert new.code.name == code, new
    assert ("x-request-id", "parity-1") in new.trailers
    assert (new.body is not None) == (code == "OK")


@pytest.mark.parametrize("case", list(GETS))
async def test_get_embedding_is_answered_as_before(
    pair_factory: Callable[..., Awaitable[Pair]], case: str
) -> None:
    request, code = GETS[case]
    assert_same(*await (await pair_factory()).both("GetEmbedding", request), code)


@pytest.mark.parametrize("case", list(BATCHES))
async def test_batch_get_embeddings_is_answered_as_before(
    pair_factory: Callable[..., Awaitable[Pair]], case: str
) -> None:
    request, code = BATCHES[case]
    assert_same(*await (await pair_factory()).both("BatchGetEmbeddings", request), code)


async def test_a_batch_read_as_columns_is_answered_as_before(
    clean_redis: str, pair_factory: Callable[..., Awaitable[Pair]]
) -> None:
    """Batches of one layout, answered from columns (add_columns), against the
    reference servicer, which builds a message per answer."""
    users = [f"bulk{i}" for i in range(COLUMNS_FROM + 2)]
    vectors = np.random.default_rng(3).standard_normal((len(users), 4)).astype(np.float16)
    store = RedisStore(clean_redis, timeout_ms=2000)
    try:
        await store.put_embeddings(
            {
                user: EmbeddingRecord(vector, "m1", "m1", BASE_TS - 7_000 * i, i)
                for i, (user, vector) in enumerate(zip(users, vectors, strict=True))
            }
        )
    finally:
        await store.close()
    pair = await pair_factory(batch_get_max_ids=100)
    for request in (
        Batch(user_ids=users, encoding=F16),
        Batch(user_ids=users, encoding=F32),
        Batch(user_ids=users),
        Batch(user_ids=users, models=["default"], encoding=F16),
        Batch(user_ids=users, model_version="m1"),
    ):
        new, old = await pair.both("BatchGetEmbeddings", request)
        assert_same(new, old, "OK")
        assert new.body is not None
        answers = pb.BatchGetEmbeddingsResponse.FromString(new.body).embeddings
        assert [e.user_id for e in answers] == users
        assert {e.status for e in answers} == {pb.STATUS_FRESH, pb.STATUS_STALE}


async def test_every_status_and_field_is_covered(
    pair_factory: Callable[..., Awaitable[Pair]],
) -> None:
    """The batch cases above carry every status, and every optional field both set (to 0
    too) and unset, so byte equality covers them."""
    pair = await pair_factory()
    new, _ = await pair.both("BatchGetEmbeddings", Batch(user_ids=USERS, model_version="m1"))
    assert new.body is not None
    answers = pb.BatchGetEmbeddingsResponse.FromString(new.body).embeddings
    assert [pb.Status.Name(e.status) for e in answers] == [
        "STATUS_FRESH",
        "STATUS_STALE",
        "STATUS_VERSION_MISMATCH",
        "STATUS_COLD_START",
        "STATUS_FRESH",
        "STATUS_FRESH",
    ]
    stale, cold, ahead = answers[1], answers[3], answers[4]
    assert stale.HasField("feature_version") and stale.feature_version == 0
    assert ahead.HasField("staleness_ms") and ahead.staleness_ms == 0
    assert not cold.HasField("computed_at") and not cold.HasField("staleness_ms")
    _, missing = await pair.both(
        "BatchGetEmbeddings", Batch(user_ids=["nobody"], model_version="m9")
    )
    assert missing.body is not None
    (not_found,) = pb.BatchGetEmbeddingsResponse.FromString(missing.body).embeddings
    assert (not_found.status, not_found.vector, not_found.dim) == (pb.STATUS_NOT_FOUND, b"", 0)


async def test_cold_start_disabled(pair_factory: Callable[..., Awaitable[Pair]]) -> None:
    pair = await pair_factory(cold_start_404=True)
    assert_same(*await pair.both("GetEmbedding", Get(user_id="nobody")), "NOT_FOUND")
    assert_same(*await pair.both("BatchGetEmbeddings", Batch(user_ids=USERS)), "OK")
    assert_same(*await pair.both("ListModels", pb.ListModelsRequest()), "OK")


async def test_list_models(pair_factory: Callable[..., Awaitable[Pair]]) -> None:
    pair = await pair_factory(embedding_dtype="float32")
    new, old = await pair.both("ListModels", pb.ListModelsRequest())
    assert_same(new, old, "OK")
    assert new.body is not None
    listing = pb.ListModelsResponse.FromString(new.body).models
    assert [(m.name, m.dtype) for m in listing] == [("default", "float32"), ("clicks", "float32")]


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((), "UNAUTHENTICATED"),
        ((("authorization", "Bearer nope"),), "UNAUTHENTICATED"),
        ((*KEYS, *KEYS), "INVALID_ARGUMENT"),
        (KEYS, "OK"),
    ],
)
async def test_api_keys(
    pair_factory: Callable[..., Awaitable[Pair]], metadata: tuple[tuple[str, str], ...], code: str
) -> None:
    pair = await pair_factory(api_keys=["k1"])
    for method, request in (
        ("GetEmbedding", Get(user_id="fresh")),
        ("BatchGetEmbeddings", Batch()),
    ):
        assert_same(*await pair.both(method, request, metadata), code)


@pytest.mark.parametrize("method", ["GetEmbedding", "BatchGetEmbeddings", "ListModels"])
async def test_bytes_that_are_no_request_are_invalid_argument(
    pair_factory: Callable[..., Awaitable[Pair]], method: str
) -> None:
    """The one deliberate difference: grpcio's deserializer answered UNKNOWN ("Unexpected
    <class 'DecodeError'>"), without the request id; now the server parses."""
    new, old = await (await pair_factory()).both(method, b"\xff\xff\xff")
    assert old.code == grpc.StatusCode.UNKNOWN
    assert new.code == grpc.StatusCode.INVALID_ARGUMENT
    assert new.details is not None and "request is not a valid userembed.v1." in new.details
    assert new.trailers == (
        ("x-request-id", "parity-1"),
        (ERROR_CODE_METADATA, "invalid_request"),
    )
