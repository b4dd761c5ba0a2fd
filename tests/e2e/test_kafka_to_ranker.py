"""Producer -> Kafka -> `userembed ingest` -> `worker` -> `serve` -> ranker, all real processes on
a real redis-server and a Kafka-protocol broker: every user is served exactly the embedding
the model computes in-process from the feature state built from the same events (within
float16), with the feature version of its stored state; and again after each role restarts,
when the served vector is the stabilized step from the one served before."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import numpy.typing as npt
import pytest

from models.standin import publish_standin
from service.core.clock import now_ms
from service.core.embeddings import EmbeddingRecord
from service.core.events import Event, encode_event
from service.core.features import FeatureState
from service.core.stabilization import stabilize
from service.core.tensors import assemble
from service.ingest.synthetic import SyntheticTraffic
from service.settings import Settings
from service.store.redis import RedisStore
from service.store.redis_server import free_port
from service.worker.embedding_worker import WorkerConfig
from service.worker.serving_model import ServingModel, load_serving_model
from tests.integration.test_kafka_ingest import (
    all_match,
    env_of,
    kafka_bootstrap,
    produce,
    reference_states,
    settings,
    synthetic_events,
)
from tests.processes import Role, userembed, wait_for

pytestmark = pytest.mark.slow
__all__ = ["kafka_bootstrap", "settings"]  # fixtures, shared with test_kafka_ingest

# float16 keeps 11 significant bits: the stored vector is the float32 one rounded to that.
FLOAT16_RTOL = 2.0**-10
FLOAT16_ATOL = 2.0**-14


@dataclass(frozen=True, slots=True)
class Stored:
    state: FeatureState
    record: EmbeddingRecord | None


async def stored(redis_url: str, users: list[str]) -> dict[str, Stored]:
    store = RedisStore(redis_url, timeout_ms=2000)
    try:
        states, (records,) = await store.get_features_and_embeddings(users)
    finally:
        await store.close()
    found = {}
    for user, state, record in zip(users, states, records, strict=True):
        assert state is not None, f"{user} has no feature state"
        found[user] = Stored(state, record)
    return found


def embedded(redis_url: str, users: list[str]) -> bool:
    """Every user has a record of its current feature state."""
    now = asyncio.run(stored(redis_url, users))
    return all(
        s.record is not None and s.record.feature_version == s.state.version for s in now.values()
    )


def expected_vector(
    model: ServingModel, state: FeatureState, record: EmbeddingRecord, previous: Stored | None
) -> npt.NDArray[np.float32]:
    """What the worker must have served: the model on ``state`` as seen at the record's
    computation time, stabilized against the previously served vector if there was one."""
    tensors = assemble([state], record.computed_at_ms, model.runtime.schema)
    fresh = model.embed(tensors)
    if previous is None or previous.record is None:
        return np.asarray(fresh[0], dtype=np.float32)
    before = previous.record
    if before.computed_at_ms == record.computed_at_ms:  # no new events: not recomputed
        assert before.feature_version == record.feature_version
        return before.vector.astype(np.float32)
    served = stabilize(
        fresh,
        before.vector.astype(np.float32)[None, :],
        np.array([record.computed_at_ms - before.computed_at_ms], dtype=np.int64),
        np.array([True]),
        normalized=model.normalized,
        config=WorkerConfig.from_settings(Settings()).stabilization,
    )
    return np.asarray(served[0], dtype=np.float32)


def check_served(
    api_url: str,
    model: ServingModel,
    reference: dict[str, FeatureState],
    now: dict[str, Stored],
    before: dict[str, Stored] | None,
) -> None:
    users = sorted(reference)
    with httpx.Client(base_url=api_url, timeout=5) as client:
        for user in users:
            answer = client.get(f"/v1/users/{user}/embedding")
            assert answer.status_code == 200, answer.text
            body = answer.json()
            record = now[user].record
            assert record is not None
            assert body["status"] == "fresh"
            assert body["model_version"] == model.version
            assert body["feature_version"] == now[user].state.version
            served = np.asarray(body["embedding"], dtype=np.float32)
            assert np.array_equal(served, record.vector.astype(np.float32)), user
            previous = None if before is None else before[user]
            expected = expected_vector(model, reference[user], record, previous)
            np.testing.assert_allclose(
                served, expected, rtol=FLOAT16_RTOL, atol=FLOAT16_ATOL, err_msg=user
            )


def run_roles(
    env: dict[str, str],
    settings: Settings,
    events: list[Event],
    model: ServingModel,
    before: dict[str, Stored] | None,
) -> dict[str, Stored]:
    """Start ingest, wait until it applied ``events`` exactly once, then start the worker
    (so each user is computed once, from its final state) and serve; check every answer."""
    reference = reference_states(events)
    users = sorted(reference)
    port = free_port()
    with userembed("ingest", env=env) as ingest:
        wait_for(lambda: all_match(settings.redis_url, reference), 90, "ingest to settle")
        with (
            userembed("worker", env=env) as worker,
            userembed("serve", "--port", str(port), "--grpc-port", "0", env=env) as api,
        ):
            api_url = f"http://127.0.0.1:{port}"
            wait_for(lambda: httpx.get(f"{api_url}/readyz").is_success, 60, "serve ready")
            wait_for(lambda: embedded(settings.redis_url, users), 90, "every user embedded")
            now = asyncio.run(stored(settings.redis_url, users))
            check_served(api_url, model, reference, now, before)
            alive(ingest, worker, api)
    return now


def alive(*roles: Role) -> None:
    for role in roles:
        assert role.poll() is None, role.output()[-3000:]


def test_what_kafka_delivers_is_served_as_the_model_computes_it_across_restarts(
    settings: Settings, tmp_path: Path
) -> None:
    registry = tmp_path / "registry"
    publish_standin(registry, history_length=20)
    model = load_serving_model(registry)
    env = {**env_of(settings), "USEREMBED_REGISTRY_PATH": str(registry)}

    first = synthetic_events(1500, users=60)
    produce(settings, [(e.user_id, encode_event(e)) for e in first])
    served_first = run_roles(env, settings, first, model, before=None)

    # Every role stopped; new events arrive; every role starts again from what it left.
    second = SyntheticTraffic(60, seed=4).events(600, now_ms() + 90_000)
    produce(settings, [(e.user_id, encode_event(e)) for e in second])
    served_second = run_roles(env, settings, first + second, model, before=served_first)

    # the second run re-embedded (and stabilized) exactly the users that got new events
    touched = {e.user_id for e in second}
    assert len(touched) > 30
    assert {u for u in served_second if u not in served_first} <= touched
    for user, now in served_second.items():
        if user in served_first:
            grew = now.state.version > served_first[user].state.version
            assert grew == (user in touched), user
