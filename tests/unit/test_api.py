"""The HTTP API in process (TestClient) on the embedded store: read semantics, encodings,
pinning, errors, auth, request ids, metrics and event intake."""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.cold_start import ColdStart
from service.api.refresh import RefreshRequester
from service.core.embeddings import EmbeddingRecord
from service.ingest.updater import InProcessEventSource
from service.settings import Settings
from service.store.memory import MemoryStore
from tests.helpers import BASE_TS

COLD = ColdStart(np.full(4, 0.5, dtype=np.float32), "m1")
VECTOR = np.array([0.0, 1.0, 2.0, -3.5], dtype=np.float16)


class Clock:
    def __init__(self) -> None:
        self.now = BASE_TS

    def __call__(self) -> int:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


def client_for(
    store: MemoryStore, clock: Clock, cold: ColdStart | None = COLD, **settings: Any
) -> TestClient:
    config = Settings(refresh_after_s=60, refresh_coalesce_s=10, **settings)
    return TestClient(create_app(store, config, lambda: cold, clock=clock))


@pytest.fixture
def client(store: MemoryStore, clock: Clock) -> Iterator[TestClient]:
    with client_for(store, clock) as c:
        yield c


def put(
    client: TestClient, store: MemoryStore, user_id: str, computed_at: int, space: str = "m1"
) -> None:
    record = EmbeddingRecord(VECTOR, "m1", space, computed_at, 3)
    assert client.portal is not None
    client.portal.call(store.put_embeddings, {user_id: record})


def queued(client: TestClient, store: MemoryStore, timeout_s: float = 5.0) -> list[str]:
    """Users the read path asked to refresh (waits for the background flush)."""
    assert client.portal is not None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if popped := client.portal.call(store.pop_dirty, 100):
            return sorted(u for u, _ in popped)
        time.sleep(0.01)
    return []


BARRIER = "barrier-user"


def queued_up_to_a_barrier(client: TestClient, store: MemoryStore) -> list[str]:
    """Every refresh asked for so far, barrier excluded. A cold read of ``BARRIER`` asks
    for one more; a flush writes every pending request at once, so once the barrier is
    queued, each earlier request is too (this does not race the background flusher)."""
    assert client.get(f"/v1/users/{BARRIER}/embedding").json()["status"] == "cold_start"
    found: list[str] = []
    while BARRIER not in found:
        popped = queued(client, store)
        assert popped, "the barrier's refresh was never flushed"
        found += popped
    found.remove(BARRIER)
    return sorted(found)


def test_fresh_embedding_is_served_with_its_provenance(
    client: TestClient, store: MemoryStore
) -> None:
    put(client, store, "u1", BASE_TS - 1000)
    response = client.get("/v1/users/u1/embedding")
    assert response.json() == {
        "user_id": "u1",
        "embedding": [0.0, 1.0, 2.0, -3.5],
        "dim": 4,
        "model_version": "m1",
        "space_version": "m1",
        "computed_at": BASE_TS - 1000,
        "feature_version": 3,
        "staleness_ms": 1000,
        "status": "fresh",
    }
    assert response.headers["content-type"] == "application/json"
    assert queued_up_to_a_barrier(client, store) == []  # a fresh read asks for no refresh


def test_missing_user_gets_cold_start_at_once_and_a_refresh(
    client: TestClient, store: MemoryStore
) -> None:
    body = client.get("/v1/users/new-user/embedding").json()
    assert body["status"] == "cold_start"
    assert body["embedding"] == [0.5] * 4 and body["model_version"] == "m1"
    assert body["computed_at"] is None and body["staleness_ms"] is None
    assert queued(client, store) == ["new-user"]


def test_stale_embedding_is_served_flagged_and_refreshed(
    client: TestClient, store: MemoryStore, clock: Clock
) -> None:
    put(client, store, "u1", BASE_TS)
    clock.now = BASE_TS + 61_000
    body = client.get("/v1/users/u1/embedding").json()
    assert (body["status"], body["staleness_ms"]) == ("stale", 61_000)
    assert queued(client, store) == ["u1"]


def test_refreshes_are_coalesced_per_user(client: TestClient, store: MemoryStore) -> None:
    for _ in range(5):
        client.get("/v1/users/u7/embedding")
    assert queued(client, store) == ["u7"]
    client.get("/v1/users/u7/embedding")  # flushed already, and within refresh_coalesce_s
    assert queued_up_to_a_barrier(client, store) == []


def test_batch_get_keeps_request_order(client: TestClient, store: MemoryStore) -> None:
    put(client, store, "a", BASE_TS)
    response = client.post("/v1/embeddings:batchGet", json={"user_ids": ["zz", "a", "a"]})
    assert response.status_code == 200
    answers = response.json()["embeddings"]
    assert [(x["user_id"], x["status"]) for x in answers] == [
        ("zz", "cold_start"),
        ("a", "fresh"),
        ("a", "fresh"),
    ]


@pytest.mark.parametrize(
    ("encoding", "dtype"), [("base64_float16", "<f2"), ("base64_float32", "<f4")]
)
def test_base64_encodings_carry_little_endian_floats(
    client: TestClient, store: MemoryStore, encoding: str, dtype: str
) -> None:
    put(client, store, "u1", BASE_TS)
    single = client.get(f"/v1/users/u1/embedding?encoding={encoding}").json()
    batch = client.post(
        "/v1/embeddings:batchGet", json={"user_ids": ["u1", "cold"], "encoding": encoding}
    ).json()["embeddings"]
    for body in (single, batch[0]):
        vector = np.frombuffer(base64.b64decode(body["embedding"]), dtype=dtype)
        assert vector.tolist() == VECTOR.astype(np.float32).tolist()
        assert body["dim"] == 4
    cold = np.frombuffer(base64.b64decode(batch[1]["embedding"]), dtype=dtype)
    assert cold.tolist() == [0.5] * 4


def test_pinned_space_is_served_or_refused_clearly(client: TestClient, store: MemoryStore) -> None:
    put(client, store, "old", BASE_TS, space="m0")
    put(client, store, "new", BASE_TS, space="m1")
    ok = client.get("/v1/users/new/embedding?model_version=m1")
    mismatch = client.get("/v1/users/old/embedding?model_version=m1")
    cold_ok = client.get("/v1/users/nobody/embedding?model_version=m1")
    cold_other = client.get("/v1/users/nobody/embedding?model_version=m0")
    assert ok.status_code == 200 and ok.json()["space_version"] == "m1"
    assert mismatch.status_code == 409
    assert mismatch.json()["error"] == {
        "code": "version_mismatch",
        "message": "the embedding of 'old' is in space 'm0' (model 'm1'), not the requested 'm1'",
    }
    assert cold_ok.status_code == 200 and cold_ok.json()["status"] == "cold_start"
    assert cold_other.status_code == 404
    assert "no embedding of 'nobody' in space 'm0'" in cold_other.json()["error"]["message"]

    batch = client.post(
        "/v1/embeddings:batchGet",
        json={"user_ids": ["new", "old", "nobody"], "model_version": "m0"},
    ).json()["embeddings"]
    assert [(a["status"], a["embedding"] is None) for a in batch] == [
        ("version_mismatch", True),
        ("fresh", False),
        ("not_found", True),
    ]
    assert batch[0]["space_version"] == "m1"  # what is there instead


@pytest.mark.parametrize(
    ("method", "path", "body", "code", "reason"),
    [
        ("GET", "/v1/users/a%20b/embedding", None, "invalid_user_id", "invalid user_id 'a b'"),
        ("GET", f"/v1/users/{'x' * 129}/embedding", None, "invalid_user_id", "1..128 chars"),
        ("GET", "/v1/users/a%2Fb/embedding", None, "invalid_user_id", "invalid user_id 'a/b'"),
        ("GET", "/v1/users//embedding", None, "invalid_user_id", "1..128 chars"),
        ("GET", "/v1/users/u1/embedding?encoding=xml", None, "invalid_encoding", "'xml'"),
        ("GET", "/v1/users/u1/embedding?model_version=a%20b", None, "invalid_model_version", ""),
        ("POST", "/v1/embeddings:batchGet", {"user_ids": ["ok", "no/pe"]}, "invalid_user_id", ""),
        ("POST", "/v1/embeddings:batchGet", {"user_ids": "u1"}, "invalid_request", "user_ids"),
        ("POST", "/v1/embeddings:batchGet", {}, "invalid_request", "missing required field"),
        ("POST", "/v1/embeddings:batchGet", {"user_ids": [1]}, "invalid_request", "$.user_ids[0]"),
        (
            "POST",
            "/v1/embeddings:batchGet",
            {"user_ids": ["u1"], "encoding": "f64"},
            "invalid_encoding",
            "use one of json, base64_float16, base64_float32",
        ),
    ],
)
def test_bad_requests_get_400_with_a_reason(
    client: TestClient, method: str, path: str, body: Any, code: str, reason: str
) -> None:
    response = client.request(method, path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code and reason in error["message"]


def test_malformed_json_and_wrong_methods(client: TestClient) -> None:
    not_json = client.post("/v1/embeddings:batchGet", content=b"{")
    wrong_method = client.post("/v1/users/u1/embedding")
    unknown = client.get("/v2/nothing")
    assert (not_json.status_code, not_json.json()["error"]["code"]) == (400, "invalid_request")
    assert (wrong_method.status_code, wrong_method.json()["error"]["code"]) == (
        405,
        "method_not_allowed",
    )
    assert (unknown.status_code, unknown.json()["error"]["code"]) == (404, "not_found")


def test_oversized_batches_are_refused(store: MemoryStore, clock: Clock) -> None:
    with client_for(store, clock, batch_get_max_ids=3) as c:
        response = c.post("/v1/embeddings:batchGet", json={"user_ids": ["a", "b", "c", "d"]})
        huge = c.post("/v1/embeddings:batchGet", content=b" " * (2 << 20))
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "batch_too_large",
        "message": "4 user_ids requested; at most 3 per call",
    }
    assert huge.status_code == 413


def test_cold_start_404_mode(store: MemoryStore, clock: Clock) -> None:
    with client_for(store, clock, cold_start_404=True) as c:
        single = c.get("/v1/users/u1/embedding")
        batch = c.post("/v1/embeddings:batchGet", json={"user_ids": ["u1"]}).json()
    assert single.status_code == 404 and single.json()["error"]["code"] == "not_found"
    assert batch["embeddings"][0]["status"] == "not_found"
    assert batch["embeddings"][0]["embedding"] is None


def test_api_keys_are_required_when_configured(store: MemoryStore, clock: Clock) -> None:
    with client_for(store, clock, api_keys=["k1", "k2"]) as c:
        missing = c.get("/v1/users/u1/embedding")
        wrong = c.get("/v1/users/u1/embedding", headers={"Authorization": "Bearer nope"})
        basic = c.get("/v1/users/u1/embedding", headers={"Authorization": "Basic k2"})
        good = c.get("/v1/users/u1/embedding", headers={"Authorization": "Bearer k2"})
        batch = c.post("/v1/embeddings:batchGet", json={"user_ids": ["u1"]})
        events = c.post("/v1/events", json=[])
        open_paths = [c.get(p).status_code for p in ("/healthz", "/readyz", "/metrics")]
    assert [r.status_code for r in (missing, wrong, basic, good, batch, events)] == [
        401,
        401,
        401,
        200,
        401,
        401,
    ]
    assert open_paths == [200, 200, 200]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "unauthenticated"


def test_ops_endpoints_can_require_keys_too(store: MemoryStore, clock: Clock) -> None:
    with client_for(store, clock, api_keys=["k1"], api_auth_ops=True) as c:
        closed = [c.get(p).status_code for p in ("/healthz", "/readyz", "/metrics")]
        allowed = c.get("/metrics", headers={"Authorization": "Bearer k1"})
        docs = c.get("/openapi.json")
    assert closed == [401, 401, 401]
    assert allowed.status_code == 200 and docs.status_code == 200


def test_api_keys_from_a_file(tmp_path: Path, store: MemoryStore, clock: Clock) -> None:
    keys = tmp_path / "keys"
    keys.write_text("\nsecret-1\n  secret-2  \n")
    with client_for(store, clock, api_keys_file=keys) as c:
        ok = c.get("/v1/users/u1/embedding", headers={"Authorization": "Bearer secret-2"})
        no = c.get("/v1/users/u1/embedding")
    assert (ok.status_code, no.status_code) == (200, 401)


def test_request_ids_are_echoed_or_made(client: TestClient) -> None:
    given = client.get("/v1/users/u1/embedding", headers={"X-Request-ID": "rank-42"})
    made = client.get("/v1/users/u1/embedding")
    made_again = client.get("/healthz")
    insane = client.get("/healthz", headers={"X-Request-ID": "a b"})
    assert given.headers["x-request-id"] == "rank-42"
    assert made.headers["x-request-id"] != made_again.headers["x-request-id"]
    assert insane.headers["x-request-id"] != "a b"


def test_request_id_appears_in_failure_logs(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level("DEBUG", logger="service.api.app"):
        client.get("/v1/users/a%20b/embedding", headers={"X-Request-ID": "trace-7"})
    assert any(
        "request_id=trace-7" in r.getMessage() and "invalid_user_id" in r.getMessage()
        for r in caplog.records
    )


def test_readiness_needs_a_model(store: MemoryStore, clock: Clock) -> None:
    with client_for(store, clock) as ready, client_for(store, clock, cold=None) as unready:
        assert ready.get("/readyz").status_code == 200
        response = unready.get("/readyz")
    assert response.status_code == 503
    assert "no model published" in response.json()["error"]["message"]


def test_metrics_are_exposed(client: TestClient) -> None:
    client.get("/v1/users/u1/embedding")
    text = client.get("/metrics").text
    assert (
        'userembed_api_request_seconds_count{protocol="http",'
        'route="/v1/users/{user_id}/embedding",status="200"}' in text
    )
    for name in (
        "userembed_api_embeddings_served_total",
        "userembed_api_in_flight_requests",
        "userembed_api_served_staleness_seconds_bucket",
        "userembed_api_refresh_enqueued_total",
        "userembed_api_store_errors_total",
        "userembed_api_cache_requests_total",
    ):
        assert name in text, name


def test_openapi_documents_the_read_routes(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    get = schema["paths"]["/v1/users/{user_id}/embedding"]["get"]
    batch = schema["paths"]["/v1/embeddings:batchGet"]["post"]
    names = {p["name"] for p in get["parameters"]}
    assert names == {"user_id", "encoding", "model_version", "model"}
    assert set(get["responses"]) == {"200", "400", "401", "404", "409", "503"}
    assert set(batch["responses"]) == {"200", "400", "401", "404", "413", "503"}
    assert batch["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/BatchGetRequest"
    )
    request = schema["components"]["schemas"]["BatchGetRequest"]
    assert request["properties"]["user_ids"]["maxItems"] == 1000


async def test_refresh_requester_coalesces_and_bounds(store: MemoryStore) -> None:
    clock = Clock()
    requester = RefreshRequester(store, coalesce_ms=1000, max_pending=2, clock=clock)
    assert requester.request(["a", "a", "b", "c"]) == 2  # c dropped: pending is full
    assert await requester.flush() == 2
    assert requester.request(["a"]) == 0
    clock.now += 1000
    assert requester.request(["a"]) == 1
    assert await requester.flush() == 1
    assert await store.pop_dirty(10) == [("a", BASE_TS), ("b", BASE_TS)]


async def test_refresh_requester_never_exceeds_its_rate(store: MemoryStore) -> None:
    clock = Clock()
    requester = RefreshRequester(store, coalesce_ms=60_000, max_rate=10, clock=clock)
    assert requester.request(f"u{i}" for i in range(25)) == 10  # one second's worth
    assert requester.request(["u20"]) == 0  # still no tokens
    clock.now += 500
    assert requester.request(f"u{i}" for i in range(10, 25)) == 5  # half a second refills 5
    clock.now += 60_000
    # the users turned away were not remembered, so they are requested once tokens return
    assert requester.request(["u24"]) == 1
    await requester.flush()
    assert len(await store.pop_dirty(100)) == 16


def event_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "event_id": "e1",
        "user_id": "u1",
        "ts": BASE_TS,
        "type": "click",
        "item_id": "i1",
    }
    body.update(overrides)
    return body


def test_posted_events_are_validated_and_handed_to_the_sink(
    store: MemoryStore, clock: Clock
) -> None:
    sink = InProcessEventSource()
    config = Settings()
    app = create_app(store, config, lambda: COLD, event_sink=sink, clock=clock)
    with TestClient(app) as c:
        accepted = c.post("/v1/events", json=[event_body(), event_body(event_id="e2")])
        rejected = c.post(
            "/v1/events",
            json=[event_body(), event_body(user_id="a b"), event_body(ts="now")],
        )
        empty = c.post("/v1/events", json=[])
        not_json = c.post("/v1/events", content=b"[{")
    assert (accepted.status_code, accepted.json()) == (202, {"accepted": 2})
    assert sink.pending == 2
    assert rejected.status_code == 400
    error = rejected.json()["error"]
    assert error["code"] == "invalid_events"
    assert error["message"] == "2 of 3 events rejected; nothing was accepted"
    assert [d["index"] for d in error["details"]] == [1, 2]
    assert "invalid user_id 'a b'" in error["details"][0]["reason"]
    assert "Expected `int`, got `str` - at `$.ts`" in error["details"][1]["reason"]
    assert empty.status_code == 400 and not_json.status_code == 400


def test_event_intake_without_a_sink_is_503(client: TestClient) -> None:
    response = client.post("/v1/events", json=[event_body()])
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "intake_disabled"


def test_openapi_states_every_rule_the_server_enforces(store: MemoryStore, clock: Clock) -> None:
    with client_for(store, clock, batch_get_max_ids=3000, api_events_max=7) as c:
        schema = c.get("/openapi.json").json()
        clock.now += 60_000
        later = c.get("/openapi.json").json()
    get = schema["paths"]["/v1/users/{user_id}/embedding"]["get"]
    params = {p["name"]: p for p in get["parameters"]}
    assert params["user_id"]["schema"]["pattern"] == "^[A-Za-z0-9_.:@-]{1,128}$"
    assert params["encoding"]["allowEmptyValue"] and params["model_version"]["allowEmptyValue"]
    batch = schema["paths"]["/v1/embeddings:batchGet"]["post"]["requestBody"]
    assert (batch["x-max-bytes"], batch["x-max-depth"]) == (3000 * 512, 32)
    assert f"at most {3000 * 512} bytes" in batch["description"]
    request = schema["components"]["schemas"]["BatchGetRequest"]["properties"]["user_ids"]
    assert request["maxItems"] == 3000
    assert request["items"]["pattern"] == "^[A-Za-z0-9_.:@-]{1,128}$"
    events = schema["paths"]["/v1/events"]["post"]
    assert (events["requestBody"]["x-max-bytes"], events["requestBody"]["x-max-depth"]) == (
        1 << 20,
        32,
    )
    assert events["requestBody"]["content"]["application/json"]["schema"]["maxItems"] == 7
    assert {"400", "401", "413", "503"} <= set(events["responses"])
    ts = schema["components"]["schemas"]["Event"]["properties"]["ts"]
    assert (ts["minimum"], ts["maximum"]) == (946_684_800_000, BASE_TS + 86_400_000)
    later_ts = later["components"]["schemas"]["Event"]["properties"]["ts"]
    assert later_ts["maximum"] == BASE_TS + 60_000 + 86_400_000  # as of each fetch
    for rule in ("16384 bytes (431", "5 s", "10 s", "(413", "400 for two or more"):
        assert rule in schema["info"]["description"], rule


def test_an_empty_query_value_is_the_default(client: TestClient, store: MemoryStore) -> None:
    put(client, store, "u1", BASE_TS)
    plain = client.get("/v1/users/u1/embedding")
    empty = client.get("/v1/users/u1/embedding?encoding=&model_version=")
    bad = client.get("/v1/users/u1/embedding?encoding=%20")
    assert (plain.status_code, empty.status_code) == (200, 200)
    assert empty.json() == plain.json()
    assert (bad.status_code, bad.json()["error"]["code"]) == (400, "invalid_encoding")


def test_integral_floats_are_integers_to_event_intake(store: MemoryStore, clock: Clock) -> None:
    """JSON Schema (and so the OpenAPI document) counts 1.76e12 as an integer: so does the
    API, which hands Kafka the integer."""
    sink = InProcessEventSource()
    app = create_app(store, Settings(), lambda: COLD, event_sink=sink, clock=clock)
    body = f'[{{"event_id": "e1", "user_id": "u1", "ts": {float(BASE_TS)}, "type": "view", '
    with TestClient(app) as c:
        accepted = c.post("/v1/events", content=body + '"item_id": 3.0, "category": 4.0}]')
        fractional = c.post("/v1/events", content=body + '"item_id": 3.5}]')
        assert c.portal is not None
        [sourced] = c.portal.call(sink.next_batch, 10, 1.0)
    assert accepted.status_code == 202
    assert (sourced.event.ts, sourced.event.item_id, sourced.event.category) == (BASE_TS, 3, 4)
    assert type(sourced.event.item_id) is int
    assert fractional.status_code == 400
    assert fractional.json()["error"]["code"] == "invalid_events"


def test_an_unexpected_failure_is_a_500_in_the_envelope(clock: Clock) -> None:
    class BrokenStore(MemoryStore):
        async def ping(self) -> None:
            raise RuntimeError("boom")

    with client_for(BrokenStore(), clock) as c:
        response = c.get("/readyz")
        after = c.get("/healthz")
    assert response.status_code == 500
    assert response.json() == {
        "error": {"code": "internal", "message": "internal error; see the server log"}
    }
    assert response.headers["x-request-id"]
    assert after.status_code == 200


def test_deep_json_and_duplicate_keys_in_process(store: MemoryStore, clock: Clock) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    with client_for(store, clock, api_keys=["k1"]) as c:
        auth = {"Authorization": "Bearer k1"}
        batch = c.post("/v1/embeddings:batchGet", content=deep, headers=auth)
        events = c.post("/v1/events", content=deep, headers=auth)
        twice = c.get(
            "/v1/users/u1/embedding",
            headers=[("Authorization", "Bearer no"), ("Authorization", "Bearer k1")],
        )
    for response in (batch, events):
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_request"
        assert "nested 100000 levels deep" in response.json()["error"]["message"]
    assert (twice.status_code, twice.json()["error"]["code"]) == (400, "invalid_request")
