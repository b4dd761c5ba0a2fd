"""The client library against a real `userembed serve` (HTTP and gRPC) on a real
redis-server: stored vectors, every status and error, batch splitting, deadlines,
retries while Redis is stopped, hedging, the asyncio client and its coalescing, HTTP
and gRPC giving the same arrays, and several models: a named model's reads, reads of
two models at once, per-model pins, unknown models and the model listing."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import httpx
import numpy as np
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from models.registry import ModelArtifact, install, model_root
from models.standin import publish_standin
from service.core.clock import now_ms
from service.core.embeddings import EmbeddingRecord
from service.store.redis import RedisStore
from service.store.redis_server import free_port, private_redis
from tests.processes import Role, userembed, wait_for
from userembed import (
    NO_RETRIES,
    AsyncClient,
    Client,
    DeadlineExceeded,
    InvalidRequest,
    ModelBatches,
    NotFound,
    RetryPolicy,
    Unauthenticated,
    Unavailable,
    UnknownModel,
    VersionMismatch,
)
from userembed import client as client_module
from userembed.retry import call_with_retries

pytestmark = [pytest.mark.redis, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]

KEY = "ranker-key"
MAX_IDS = 5  # the server's batch_get_max_ids: small, so that splitting shows
PROTOCOLS = ["http", "grpc"]
GET_ROUTE = {
    "http": "/v1/users/{user_id}/embedding",
    "grpc": "/userembed.v1.Embeddings/GetEmbedding",
}
BATCH_ROUTE = {
    "http": "/v1/embeddings:batchGet",
    "grpc": "/userembed.v1.Embeddings/BatchGetEmbeddings",
}
CLICKS, CLICKS_VERSION, CLICKS_DIM = "clicks", "clicks-1", 16  # the second model
T = TypeVar("T")


@dataclass
class Server:
    http: str
    grpc: str
    process: Role
    version: str
    vectors: dict[str, np.ndarray]
    clicks: dict[str, np.ndarray]  # the clicks model's vectors

    def url(self, protocol: str) -> str:
        return self.http if protocol == "http" else self.grpc

    def requests(self, protocol: str, route: dict[str, str], status: str | None = None) -> float:
        """Requests the server has counted on ``route`` (``userembed_api_request_seconds``)."""
        text = httpx.get(f"{self.http}/metrics", timeout=5).text
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = sample.labels
                if (
                    sample.name == "userembed_api_request_seconds_count"
                    and labels.get("protocol") == protocol
                    and labels.get("route") == route[protocol]
                    and (status is None or labels.get("status") == status)
                ):
                    total += sample.value
        return total


def _require_redis_server() -> None:
    if shutil.which("redis-server") is None:
        if os.environ.get("CI"):
            pytest.fail("redis-server is required in CI (.ci/run installs it)")
        pytest.skip("redis-server is not installed")


def put(redis_url: str, records: dict[str, EmbeddingRecord], model: str = "default") -> None:
    async def write() -> None:
        store = RedisStore(redis_url, timeout_ms=2000)
        try:
            await store.put_embeddings(records, model=model)
        finally:
            await store.close()

    asyncio.run(write())


@contextmanager
def serve(
    redis_url: str, standin: ModelArtifact, registry: Path | None = None, **env: str
) -> Iterator[Server]:
    """`userembed serve` on free HTTP and gRPC ports, ready; the registry is
    ``standin``'s, or ``registry`` (where ``standin`` is the default model)."""
    http_port, grpc_port = free_port(), free_port()
    environment = {
        "USEREMBED_REDIS_URL": redis_url,
        "USEREMBED_REGISTRY_PATH": str(registry or standin.directory.parent),
        "USEREMBED_API_EVENTS_ENABLED": "false",
        "USEREMBED_REFRESH_AFTER_S": "3600",
        **env,
    }
    args = ("serve", "--port", str(http_port), "--grpc-port", str(grpc_port))
    with userembed(*args, env=environment) as process:
        http = f"http://127.0.0.1:{http_port}"
        wait_for(lambda: httpx.get(f"{http}/readyz").status_code == 200, 60, "serve ready")
        yield Server(http, f"grpc://127.0.0.1:{grpc_port}", process, standin.version, {}, {})


@pytest.fixture(scope="module")
def server(
    redis_url: str, standin: ModelArtifact, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One server for the module, with API keys and a batch limit of MAX_IDS, serving the
    stand-in as the default model and a 16-d model 'clicks', and records: fresh-0..11
    (fresh), stale (computed two hours ago), elsewhere (in another space); of clicks:
    fresh-0..5 and elsewhere (in space old-clicks)."""
    registry = tmp_path_factory.mktemp("client-registry")
    install(registry, standin)
    publish_standin(
        model_root(registry, CLICKS),
        version=CLICKS_VERSION,
        history_length=20,
        output_dim=CLICKS_DIM,
        seed=3,
    )
    env = {"USEREMBED_API_KEYS": f'["{KEY}"]', "USEREMBED_BATCH_GET_MAX_IDS": str(MAX_IDS)}
    with serve(redis_url, standin, registry, **env) as running:
        cold = httpx.get(
            f"{running.http}/v1/users/nobody/embedding",
            headers={"authorization": f"Bearer {KEY}"},
        ).json()
        rng = np.random.default_rng(0)
        now = now_ms()
        records = {}
        for user_id, computed_at, space in [
            *((f"fresh-{i}", now, running.version) for i in range(12)),
            ("stale", now - 7_200_000, running.version),
            ("elsewhere", now, "old-space"),
        ]:
            vector = rng.standard_normal(cold["dim"]).astype(np.float16)
            records[user_id] = EmbeddingRecord(vector, running.version, space, computed_at, 7)
            running.vectors[user_id] = vector.astype(np.float32)
        # the model's float32 cold start, as float16 on the wire (the client's default)
        cold_vector = np.asarray(cold["embedding"], dtype=np.float32)
        running.vectors["cold"] = cold_vector.astype(np.float16).astype(np.float32)
        put(redis_url, records)
        clicks = {}
        for user_id, space in [
            *((f"fresh-{i}", CLICKS_VERSION) for i in range(6)),
            ("elsewhere", "old-clicks"),
        ]:
            vector = rng.standard_normal(CLICKS_DIM).astype(np.float16)
            clicks[user_id] = EmbeddingRecord(vector, CLICKS_VERSION, space, now, 3)
            running.clicks[user_id] = vector.astype(np.float32)
        put(redis_url, clicks, CLICKS)
        yield running
    assert running.process.returncode in (0, None), running.process.output()[-3000:]


def client(server: Server, protocol: str, **options: object) -> Client:
    return Client(server.url(protocol), api_key=KEY, max_batch=MAX_IDS, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_get_returns_the_stored_vector(server: Server, protocol: str) -> None:
    with client(server, protocol) as ranker:
        got = ranker.get("fresh-3")
    assert got.status == "fresh" and got.vector is not None
    assert got.vector.dtype == np.float32
    np.testing.assert_array_equal(got.vector, server.vectors["fresh-3"])  # float16 is exact
    assert (got.model_version, got.space_version, got.feature_version) == (
        server.version,
        server.version,
        7,
    )
    assert got.computed_at is not None and got.staleness_ms is not None
    assert 0 <= got.staleness_ms < 600_000


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_get_many_in_request_order_with_every_status(server: Server, protocol: str) -> None:
    ids = ["fresh-1", "stale", "nobody-1", "elsewhere", "fresh-1"]
    with client(server, protocol) as ranker:
        batch = ranker.get_many(ids)
        pinned = ranker.get_many(["fresh-2", "elsewhere", "nobody-2"], model_version="old-space")
    assert [e.user_id for e in batch] == ids
    assert batch.statuses == ["fresh", "stale", "cold_start", "fresh", "fresh"]
    expected = [server.vectors[u] for u in ("fresh-1", "stale", "cold", "elsewhere", "fresh-1")]
    np.testing.assert_array_equal(batch.matrix(), np.stack(expected))
    assert batch[2].computed_at is None and batch[2].staleness_ms is None
    assert batch[1].staleness_ms is not None and batch[1].staleness_ms >= 7_200_000
    assert pinned.statuses == ["version_mismatch", "fresh", "not_found"]
    assert pinned.found.tolist() == [False, True, False]
    assert pinned[0].space_version == server.version and pinned[0].vector is None


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_pinning_errors_of_single_gets(server: Server, protocol: str) -> None:
    with client(server, protocol, model_version=server.version) as ranker:
        assert ranker.get("fresh-0").status == "fresh"
        assert ranker.get("nobody-3").status == "cold_start"  # the current model's space
        with pytest.raises(VersionMismatch, match="in space 'old-space'"):
            ranker.get("elsewhere")
        assert ranker.get("elsewhere", model_version="old-space").status == "fresh"
        with pytest.raises(NotFound, match="in space 'old-space'"):
            ranker.get("nobody-4", model_version="old-space")


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_typed_errors_for_auth_and_bad_requests(server: Server, protocol: str) -> None:
    for key in (None, "wrong"):
        with Client(server.url(protocol), api_key=key) as anonymous:
            with pytest.raises(Unauthenticated) as caught:
                anonymous.get("fresh-0")
            assert caught.value.attempts == 1
    with client(server, protocol) as ranker:
        with pytest.raises(InvalidRequest, match="invalid model version") as bad_pin:
            ranker.get("fresh-0", model_version="-x")
        assert bad_pin.value.code == "invalid_model_version"  # gRPC: its trailing metadata
        assert bad_pin.value.request_id  # the server's, for its logs
        with pytest.raises(InvalidRequest, match="invalid user_id 'a b'"):
            ranker.get("a b")  # refused before it is sent
    unsplit = Client(server.url(protocol), api_key=KEY, max_batch=1000)
    with unsplit, pytest.raises(InvalidRequest, match=f"at most {MAX_IDS} per call") as too_many:
        unsplit.get_many([f"fresh-{i}" for i in range(MAX_IDS + 1)])
    assert too_many.value.code == "batch_too_large"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_batches_above_the_server_limit_are_split(server: Server, protocol: str) -> None:
    ids = [f"fresh-{i}" for i in range(12)]
    before = server.requests(protocol, BATCH_ROUTE)
    with client(server, protocol) as ranker:
        batch = ranker.get_many(ids)
    assert [e.user_id for e in batch] == ids and set(batch.statuses) == {"fresh"}
    np.testing.assert_array_equal(batch.matrix(), np.stack([server.vectors[u] for u in ids]))
    assert server.requests(protocol, BATCH_ROUTE) - before == 3  # 5 + 5 + 2


def test_grpc_and_http_give_the_same_arrays(server: Server) -> None:
    ids = ["fresh-5", "stale", "nobody-5", "elsewhere", "fresh-6", "fresh-7", "fresh-8"]
    answers = {}
    for protocol in PROTOCOLS:
        for precision in ("float16", "float32"):
            with client(server, protocol, precision=precision) as ranker:
                answers[protocol, precision] = ranker.get_many(ids, model_version=server.version)
    for (_, precision), batch in answers.items():
        reference = answers["http", precision]
        assert batch.statuses == reference.statuses
        np.testing.assert_array_equal(batch.matrix(), reference.matrix())
        for got, want in zip(batch, reference, strict=True):
            assert (got.model_version, got.space_version, got.feature_version) == (
                want.model_version,
                want.space_version,
                want.feature_version,
            )
    stored = [i for i, user_id in enumerate(ids) if user_id != "nobody-5"]
    half, full = answers["grpc", "float16"].matrix(), answers["grpc", "float32"].matrix()
    np.testing.assert_array_equal(half[stored], full[stored])  # stored float16, widened exactly


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_named_model_is_read_by_name_and_pinned_on_its_own(server: Server, protocol: str) -> None:
    with client(server, protocol) as ranker:
        got = ranker.get("fresh-3", model=CLICKS)
        cold = ranker.get("nobody-7", model=CLICKS)
        with pytest.raises(VersionMismatch, match="the 'clicks' embedding of 'fresh-3'"):
            ranker.get("fresh-3", model=CLICKS, model_version="old-clicks")
        batch = ranker.get_many(["fresh-1", "elsewhere", "nobody-8"], model=CLICKS)
    assert (got.model, got.status, got.dim, got.model_version) == (
        CLICKS,
        "fresh",
        CLICKS_DIM,
        CLICKS_VERSION,
    )
    np.testing.assert_array_equal(got.vector, server.clicks["fresh-3"])
    assert (cold.status, cold.space_version, cold.dim) == ("cold_start", CLICKS_VERSION, 16)
    assert batch.statuses == ["fresh", "fresh", "cold_start"]
    assert {e.model for e in batch} == {CLICKS}
    np.testing.assert_array_equal(
        batch.matrix()[:2], np.stack([server.clicks["fresh-1"], server.clicks["elsewhere"]])
    )
    # a client of the clicks model: its calls read clicks, pinned to the client's space
    with client(server, protocol, model=CLICKS, model_version="old-clicks") as clicks_ranker:
        assert clicks_ranker.get("elsewhere").model == CLICKS
        with pytest.raises(NotFound, match="no 'clicks' embedding of 'nobody-9' in space"):
            clicks_ranker.get("nobody-9")
        default = clicks_ranker.get("fresh-3", model="default")  # not pinned: another model
    np.testing.assert_array_equal(default.vector, server.vectors["fresh-3"])


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_several_models_in_one_request_per_part(server: Server, protocol: str) -> None:
    ids = ["fresh-0", "elsewhere", "nobody-10", "stale", "fresh-5"]
    before = server.requests(protocol, BATCH_ROUTE)
    with client(server, protocol) as ranker:
        both = ranker.get_many(
            ids, models=["default", CLICKS], model_versions={CLICKS: CLICKS_VERSION}
        )
    # MAX_IDS answers per request: 2 users x 2 models, so 3 requests for 5 users
    assert server.requests(protocol, BATCH_ROUTE) - before == 3
    assert isinstance(both, ModelBatches) and list(both) == ["default", CLICKS]
    assert both.user_ids == ids
    assert both["default"].statuses == ["fresh", "fresh", "cold_start", "stale", "fresh"]
    assert both[CLICKS].statuses == [
        "fresh",
        "version_mismatch",  # in old-clicks, pinned to clicks-1
        "cold_start",
        "cold_start",
        "fresh",
    ]
    default = both["default"].matrix()
    assert default.shape == (5, server.vectors["fresh-0"].shape[0])
    np.testing.assert_array_equal(default[0], server.vectors["fresh-0"])
    clicks = both[CLICKS].matrix()
    assert clicks.shape == (5, CLICKS_DIM) and not clicks[1].any()
    np.testing.assert_array_equal(
        clicks[[0, 4]], np.stack([server.clicks[u] for u in ("fresh-0", "fresh-5")])
    )
    first = both.user(0)
    assert (first["default"].model, first[CLICKS].model) == ("default", CLICKS)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_an_unknown_model_is_its_own_error_and_the_listing_names_the_served(
    server: Server, protocol: str
) -> None:
    with client(server, protocol) as ranker:
        with pytest.raises(UnknownModel, match="served models: default, clicks") as caught:
            ranker.get("fresh-0", model="views")
        with pytest.raises(UnknownModel):
            ranker.get_many(["fresh-0"], models=["default", "views"])
        with pytest.raises(InvalidRequest, match="invalid model name") as bad:
            ranker.get("fresh-0", model="no.dots")
        listing = ranker.list_models()
    assert caught.value.code == "unknown_model" and caught.value.attempts == 1
    assert bad.value.code == "invalid_model"
    assert [m.name for m in listing] == ["default", CLICKS]
    default, clicks = listing
    assert (default.version, default.space_version, default.cold_start) == (
        server.version,
        server.version,
        "available",
    )
    assert (clicks.version, clicks.dim, clicks.dtype) == (CLICKS_VERSION, CLICKS_DIM, "float16")
    assert clicks.input_schema_hash and clicks.input_schema_hash == default.input_schema_hash


def test_both_protocols_list_the_same_models(server: Server) -> None:
    listings = []
    for protocol in PROTOCOLS:
        with client(server, protocol) as ranker:
            listings.append(ranker.list_models())
    assert listings[0] == listings[1]


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_async_client_reads_several_models_and_coalesces_per_model(
    server: Server, protocol: str
) -> None:
    singles = server.requests(protocol, GET_ROUTE)
    batches = server.requests(protocol, BATCH_ROUTE)
    async with AsyncClient(
        server.url(protocol), api_key=KEY, max_batch=MAX_IDS, coalesce_window_s=0.02, timeout=5
    ) as ranker:
        got = await asyncio.gather(
            *(ranker.get(f"fresh-{i}", model=CLICKS) for i in range(3)),
            *(ranker.get(f"fresh-{i}") for i in range(3)),
        )
        unknown = await asyncio.gather(ranker.get("fresh-0", model="views"), return_exceptions=True)
        both = await ranker.get_many(["fresh-1", "nobody-11"], models=[CLICKS, "default"])
        listing = await ranker.list_models()
    for i, embedding in enumerate(got):
        model = CLICKS if i < 3 else "default"
        vectors = server.clicks if i < 3 else server.vectors
        assert (embedding.user_id, embedding.model) == (f"fresh-{i % 3}", model)
        np.testing.assert_array_equal(embedding.vector, vectors[f"fresh-{i % 3}"])
    assert [type(e) for e in unknown] == [UnknownModel]
    assert server.requests(protocol, GET_ROUTE) == singles  # no single GET was sent
    # one window per model (and one for the unknown model), then the batch of two models
    assert server.requests(protocol, BATCH_ROUTE) - batches == 2 + 1 + 1
    assert both[CLICKS].statuses == ["fresh", "cold_start"]
    assert both["default"].statuses == ["fresh", "cold_start"]
    assert [m.name for m in listing] == ["default", CLICKS]


@contextmanager
def paused(redis_url: str, ms: int) -> Iterator[None]:
    """Redis stalls every client for ``ms`` (CLIENT PAUSE): reads hang, nothing fails."""
    admin = redis.Redis.from_url(redis_url)
    admin.execute_command("CLIENT", "PAUSE", ms, "ALL")
    try:
        yield
    finally:
        admin.execute_command("CLIENT", "UNPAUSE")
        admin.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_deadline_exceeded(server: Server, redis_url: str, protocol: str) -> None:
    with client(server, protocol, timeout=0.25) as ranker:
        ranker.get("fresh-0")  # connected before the stall
        # Redis stalls far past the calls' deadlines: the server cannot answer them in
        # time (its own bound, api_read_timeout_ms = 1 s, answers 503: Unavailable)
        with paused(redis_url, 3000):
            with pytest.raises(DeadlineExceeded) as single:
                ranker.get("fresh-0")
            with pytest.raises(DeadlineExceeded) as batch:
                ranker.get_many(["fresh-1", "fresh-2"], timeout=0.1)
    for caught in (single, batch):
        # the client's own deadline after one request, not an answer of the server's
        # (which would carry its request id)
        assert caught.value.code == "deadline_exceeded" and caught.value.request_id is None
        assert caught.value.attempts == 1


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_hedged_request_is_sent_when_the_first_is_late(server: Server, protocol: str) -> None:
    before = server.requests(protocol, GET_ROUTE)
    # hedge every call at once; the client stays open (closing it would cancel a hedge
    # not yet sent) until the server has answered both requests
    with client(server, protocol, hedge_after_s=0.0, timeout=30) as ranker:
        got = ranker.get("fresh-4")
        wait_for(lambda: server.requests(protocol, GET_ROUTE) - before == 2, 30, "two requests")
    np.testing.assert_array_equal(got.vector, server.vectors["fresh-4"])


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_async_client_and_coalescing(server: Server, protocol: str) -> None:
    ids = [f"fresh-{i}" for i in range(10)]
    singles = server.requests(protocol, GET_ROUTE)
    batches = server.requests(protocol, BATCH_ROUTE)
    async with AsyncClient(
        server.url(protocol), api_key=KEY, max_batch=MAX_IDS, coalesce_window_s=0.02, timeout=5
    ) as ranker:
        got = await asyncio.gather(*(ranker.get(u) for u in ids))
        errors = await asyncio.gather(
            ranker.get("elsewhere", model_version=server.version),
            ranker.get("nobody-6", model_version="old-space"),
            return_exceptions=True,
        )
    for user_id, embedding in zip(ids, got, strict=True):
        assert embedding.user_id == user_id and embedding.status == "fresh"
        np.testing.assert_array_equal(embedding.vector, server.vectors[user_id])
    assert [type(e) for e in errors] == [VersionMismatch, NotFound]
    assert server.requests(protocol, GET_ROUTE) == singles  # no single GET was sent
    # the ten gets join one window, sent as it fills (5 + 5); each pin has its own window
    assert server.requests(protocol, BATCH_ROUTE) - batches == 2 + 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_async_client_without_coalescing(server: Server, protocol: str) -> None:
    async with AsyncClient(server.url(protocol), api_key=KEY, max_batch=MAX_IDS) as ranker:
        single = await ranker.get("fresh-9")
        batch = await ranker.get_many([f"fresh-{i}" for i in range(12)])
        with pytest.raises(Unauthenticated):
            async with AsyncClient(server.url(protocol)) as anonymous:
                await anonymous.get("fresh-9")
    np.testing.assert_array_equal(single.vector, server.vectors["fresh-9"])
    assert len(batch) == 12 and set(batch.statuses) == {"fresh"}


class RetryWaits:
    """The blocking client's waits before its retries, in order, seen through the sleep
    its retry loop takes (it still sleeps them); ``before_next`` runs once, at the start
    of the next wait."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.waits: list[float] = []
        self.before_next: Callable[[], object] | None = None

        def retrying(attempt: Callable[[], T], policy: RetryPolicy, deadline: float) -> T:
            return call_with_retries(attempt, policy, deadline, sleep=self._sleep)

        monkeypatch.setattr(client_module, "call_with_retries", retrying)

    def _sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        action, self.before_next = self.before_next, None
        if action is not None:
            action()
        time.sleep(seconds)


def test_retries_on_503_while_redis_is_down_then_success(
    standin: ModelArtifact, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis stopped under a running `serve`: bounded retries honouring Retry-After, no
    wait past the deadline; Redis started again on its port while a call waits to retry:
    the call's retry succeeds within its deadline."""
    _require_redis_server()
    port = free_port()
    node = ExitStack()  # the redis-server, stopped and started again by this test
    url = node.enter_context(private_redis(port))
    try:
        put(url, {"u1": EmbeddingRecord(np.ones(4, np.float16), "m", standin.version, 0, 1)})
        with serve(url, standin, USEREMBED_API_RETRY_AFTER_S="1") as api:
            with Client(api.http) as ranker:
                assert ranker.get("u1").status == "stale"
            node.close()
            failed = api.requests("http", GET_ROUTE, "503")
            retries = RetryWaits(monkeypatch)

            stubborn = Client(api.http, timeout=10)
            with stubborn, pytest.raises(Unavailable, match="retry shortly") as caught:
                stubborn.get("u1")
            assert caught.value.attempts == 3 and caught.value.retry_after_s == 1.0
            assert caught.value.code == "store_unavailable" and caught.value.http_status == 503
            # Retry-After (1 s) before each of the two retries, plus at most the default
            # policy's jitter (0.05 s before the first retry, 0.1 s before the second)
            assert len(retries.waits) == 2, retries.waits
            assert 1.0 <= retries.waits[0] <= 1.05 and 1.0 <= retries.waits[1] <= 1.1
            wait_for(
                lambda: api.requests("http", GET_ROUTE, "503") - failed == 3,
                30,
                "the server to count the call's three requests",
            )

            with Client(api.http, timeout=0.5) as ranker, pytest.raises(Unavailable) as caught:
                ranker.get("u1")  # Retry-After would pass the deadline: no retry
            assert caught.value.attempts == 1 and len(retries.waits) == 2  # nor a wait

            with Client(api.grpc, timeout=10) as ranker, pytest.raises(Unavailable) as caught:
                ranker.get_many(["u1", "u2"])
            assert caught.value.attempts == 3 and caught.value.code == "store_unavailable"
            assert len(retries.waits) == 4

            once = Client(api.http, timeout=5, retry=NO_RETRIES)
            with once, pytest.raises(Unavailable) as caught:
                once.get("u1")
            assert caught.value.attempts == 1 and len(retries.waits) == 4
            assert api.requests("http", GET_ROUTE, "503") - failed == 5

            for protocol in PROTOCOLS:
                node.close()
                waits = len(retries.waits)
                # Redis starts again on its port once the call failed and waits to retry
                retries.before_next = lambda: node.enter_context(private_redis(port))
                retry = RetryPolicy(max_attempts=20, initial_backoff_s=0.2)
                with Client(api.url(protocol), timeout=30, retry=retry) as ranker:
                    got = ranker.get("u1")
                assert got.status == "cold_start"  # read from the restarted, empty Redis
                assert retries.before_next is None and len(retries.waits) > waits
    finally:
        node.close()


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_example_ranker_scores_items_with_the_served_embedding(
    server: Server, protocol: str, tmp_path: Path
) -> None:
    items = np.stack([server.vectors["fresh-0"], -server.vectors["fresh-0"]])
    np.save(tmp_path / "items.npy", items)
    ranker = ROOT / "examples" / "ranker.py"
    args = ["--url", server.url(protocol), "--user", "fresh-0", "--api-key", KEY, "--top", "2"]
    done = subprocess.run(
        [sys.executable, str(ranker), *args, "--items", str(tmp_path / "items.npy")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("user fresh-0: fresh, model standin-1")
    best = float(np.dot(server.vectors["fresh-0"], server.vectors["fresh-0"]))
    assert lines[1].split()[:3] == ["1.", "item", "0"]
    assert float(lines[1].split()[-1]) == pytest.approx(best, rel=1e-4)
    assert lines[2].split()[:3] == ["2.", "item", "1"]
