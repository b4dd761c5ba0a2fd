from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.api import create_app
from service.cold_start import ColdStart
from service.embeddings import EmbeddingRecord
from service.ingest import InProcessEventSource
from service.refresh import RefreshRequester
from service.settings import Settings
from service.store import MemoryStore
from tests.helpers import BASE_TS

COLD = ColdStart(np.full(4, 0.5, dtype=np.float32), "m1")


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


def put(client: TestClient, store: MemoryStore, user_id: str, computed_at: int) -> None:
    record = EmbeddingRecord(np.arange(4, dtype=np.float16), "m1", "m1", computed_at, 3)
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


def test_fresh_embedding_is_served_with_its_provenance(
    client: TestClient, store: MemoryStore, clock: Clock
) -> None:
    put(client, store, "u1", BASE_TS - 1000)
    body = client.get("/v1/users/u1/embedding").json()
    assert body == {
        "user_id": "u1",
        "embedding": [0.0, 1.0, 2.0, 3.0],
        "dim": 4,
        "model_version": "m1",
        "space_version": "m1",
        "computed_at": BASE_TS - 1000,
        "feature_version": 3,
        "staleness_ms": 1000,
        "status": "fresh",
    }
    assert queued(client, store, timeout_s=0.2) == []


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
    client.get("/v1/users/u7/embedding")
    assert queued(client, store, timeout_s=0.2) == []


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
    ("method", "path", "body", "code", "reason"),
    [
        ("GET", "/v1/users/a%20b/embedding", None, "invalid_user_id", "invalid user_id 'a b'"),
        ("GET", f"/v1/users/{'x' * 129}/embedding", None, "invalid_user_id", "1..128 chars"),
        ("POST", "/v1/embeddings:batchGet", {"user_ids": ["ok", "no/pe"]}, "invalid_user_id", ""),
        ("POST", "/v1/embeddings:batchGet", {"user_ids": "u1"}, "invalid_request", "user_ids"),
        ("POST", "/v1/embeddings:batchGet", {}, "invalid_request", "body.user_ids: Field required"),
        ("POST", "/v1/embeddings:batchGet", {"user_ids": [1]}, "invalid_request", "valid string"),
    ],
)
def test_bad_requests_get_400_with_a_reason(
    client: TestClient, method: str, path: str, body: Any, code: str, reason: str
) -> None:
    response = client.request(method, path, json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == code and reason in error["message"]


def test_oversized_batches_are_refused(store: MemoryStore, clock: Clock) -> None:
    with client_for(store, clock, batch_get_max_ids=3) as c:
        response = c.post("/v1/embeddings:batchGet", json={"user_ids": ["a", "b", "c", "d"]})
    assert response.status_code == 400
    assert response.json()["error"] == {
        "code": "batch_too_large",
        "message": "4 user_ids requested; at most 3 per call",
    }


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
        health = c.get("/healthz")
    assert [r.status_code for r in (missing, wrong, basic, good, health)] == [
        401,
        401,
        401,
        200,
        200,
    ]
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "unauthenticated"


def test_api_keys_from_a_file(tmp_path: Any, store: MemoryStore, clock: Clock) -> None:
    keys = tmp_path / "keys"
    keys.write_text("\nsecret-1\n  secret-2  \n")
    with client_for(store, clock, api_keys_file=keys) as c:
        ok = c.get("/v1/users/u1/embedding", headers={"Authorization": "Bearer secret-2"})
        no = c.get("/v1/users/u1/embedding")
    assert (ok.status_code, no.status_code) == (200, 401)


def test_readiness_needs_a_model(store: MemoryStore, clock: Clock) -> None:
    with client_for(store, clock) as ready, client_for(store, clock, cold=None) as unready:
        assert ready.get("/readyz").status_code == 200
        response = unready.get("/readyz")
    assert response.status_code == 503
    assert "no model published" in response.json()["error"]["message"]


def test_metrics_are_exposed(client: TestClient) -> None:
    client.get("/v1/users/u1/embedding")
    text = client.get("/metrics").text
    assert 'userembed_api_request_seconds_count{route="/v1/users/{user_id}/embedding"' in text
    assert "userembed_api_embeddings_served_total" in text


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
