"""The whole pipeline on a real Redis Cluster (3 primaries, 3 replicas): Kafka (a real
Kafka-protocol broker) -> ingest -> two workers -> serve, then a primary killed with
kill -9 mid-stream: nothing lost, nothing counted twice, every dirty user embedded."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
from redis.cluster import RedisCluster

from models.registry import ModelArtifact
from service.core.events import encode_event
from service.core.features import FeatureState
from service.settings import Settings
from service.store.redis import RedisStore
from service.store.redis_server import LocalCluster, free_port
from tests.integration.test_kafka_ingest import (
    env_of,
    kafka_bootstrap,
    matches,
    produce,
    reference_states,
    synthetic_events,
)
from tests.processes import Role, userembed, wait_for

pytestmark = pytest.mark.slow
SHARDS = 16
__all__ = ["kafka_bootstrap"]  # a fixture, shared with test_kafka_ingest


def cluster_env(cluster: LocalCluster, kafka_bootstrap: str, registry: Path) -> dict[str, str]:
    name = f"events-{uuid.uuid4().hex[:8]}"
    settings = Settings(
        kafka_bootstrap=kafka_bootstrap, kafka_topic=name, kafka_group=f"{name}-group"
    )
    return {
        **env_of(settings),
        "USEREMBED_REDIS_URL": cluster.url,
        "USEREMBED_REDIS_SHARDS": str(SHARDS),
        "USEREMBED_REDIS_WRITE_REPLICAS": "1",
        "USEREMBED_REDIS_TIMEOUT_MS": "1000",
        "USEREMBED_INGEST_MAX_BACKOFF_S": "1",
        "USEREMBED_REGISTRY_PATH": str(registry),
        "USEREMBED_WORKER_LEASE_MS": "3000",
    }


async def progress(
    url: str, reference: dict[str, FeatureState]
) -> tuple[int, int, list[FeatureState | None]]:
    """(users whose state equals the reference, users embedded from their latest state)."""
    store = RedisStore(url, timeout_ms=2000, shards=SHARDS)
    users = sorted(reference)
    try:
        states, (records,) = await store.get_features_and_embeddings(users)
    finally:
        await store.close()
    equal = sum(matches(s, reference[u]) for s, u in zip(states, users, strict=True))
    embedded = sum(
        s is not None and r is not None and r.feature_version == s.version
        for s, r in zip(states, records, strict=True)
    )
    return equal, embedded, states


def wait_until_settled(
    url: str, reference: dict[str, FeatureState], timeout_s: float, *roles: Role
) -> None:
    """Until every state equals the reference and is embedded; else say how far it got."""
    seen = (0, 0)

    def settled() -> bool:
        nonlocal seen
        equal, embedded, _ = asyncio.run(progress(url, reference))
        seen = (equal, embedded)
        return equal == embedded == len(reference)

    try:
        wait_for(settled, timeout_s, "states and embeddings")
    except AssertionError as exc:
        tails = "\n---\n".join(role.output()[-3000:] for role in roles)
        raise AssertionError(
            f"{exc}: {seen[0]} states equal, {seen[1]} embedded of {len(reference)}; "
            f"not embedded: {asyncio.run(not_embedded(url, reference))}\n{tails}"
        ) from None


async def not_embedded(url: str, reference: dict[str, FeatureState]) -> list[str]:
    """Each user without an embedding of its latest state: versions, queue and lease."""
    store = RedisStore(url, timeout_ms=2000, shards=SHARDS)
    users = sorted(reference)
    states, (records,) = await store.get_features_and_embeddings(users)
    client = RedisCluster.from_url(url.replace("redis+cluster://", "redis://").split(",")[0])
    found = []
    for user, state, record in zip(users, states, records, strict=True):
        if state is not None and record is not None and record.feature_version == state.version:
            continue
        shard = store.layout.shard(user)
        found.append(
            f"{user}: state v{state and state.version} record v{record and record.feature_version}"
            f" dirty={client.zscore(store.layout.dirty_key(shard), user)}"
            f" leased={client.zscore(store.layout.leased_key(shard), user)}"
            f" lease={client.hget(store.layout.lease_info_key(shard), user)!r}"
        )
    client.close()
    await store.close()
    return found


def alive(*roles: Role) -> None:
    for role in roles:
        assert role.poll() is None, role.output()


def test_kafka_to_ranker_on_a_cluster_with_two_workers(
    own_cluster: LocalCluster, kafka_bootstrap: str, standin_registry: Path, standin: ModelArtifact
) -> None:
    env = cluster_env(own_cluster, kafka_bootstrap, standin_registry)
    settings = Settings(kafka_bootstrap=kafka_bootstrap, kafka_topic=env["USEREMBED_KAFKA_TOPIC"])
    events = synthetic_events(3000, users=150)
    reference = reference_states(events)
    port = free_port()
    # the topic exists before ingest subscribes (a consumer learns of a new topic only at
    # its next metadata refresh); ingest starts from the earliest offset
    produce(settings, [(e.user_id, encode_event(e)) for e in events])
    with (
        userembed("ingest", env=env) as ingest,
        userembed("worker", env=env) as first,
        userembed("worker", env=env) as second,
        userembed("serve", "--port", str(port), "--grpc-port", "0", env=env) as api,
    ):
        api_url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{api_url}/readyz").is_success, 60, "serve ready")
        wait_until_settled(own_cluster.url, reference, 120, ingest, first, second)
        alive(ingest, first, second, api)
        users = sorted(reference)
        with httpx.Client(base_url=api_url, timeout=5) as client:
            for user in users[:40]:
                answer = client.get(f"/v1/users/{user}/embedding")
                assert answer.status_code == 200, answer.text
                assert answer.json()["status"] == "fresh"
                assert answer.json()["model_version"] == standin.version
            batch = client.post("/v1/embeddings:batchGet", json={"user_ids": users})
            assert batch.status_code == 200, batch.text
            assert [r["user_id"] for r in batch.json()["embeddings"]] == users  # request order
            assert {r["status"] for r in batch.json()["embeddings"]} == {"fresh"}


def test_a_primary_killed_mid_stream_loses_nothing_and_reads_recover(
    own_cluster: LocalCluster, kafka_bootstrap: str, standin_registry: Path, standin: ModelArtifact
) -> None:
    env = cluster_env(own_cluster, kafka_bootstrap, standin_registry)
    settings = Settings(kafka_bootstrap=kafka_bootstrap, kafka_topic=env["USEREMBED_KAFKA_TOPIC"])
    events = synthetic_events(12_000, users=300)
    reference = reference_states(events)
    messages = [(e.user_id, encode_event(e)) for e in events]
    port = free_port()
    produce(settings, messages[:10])  # the topic exists before ingest subscribes
    statuses: Counter[int] = Counter()
    stop_reading = threading.Event()

    def read_all_along() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
            while not stop_reading.is_set():
                try:
                    statuses[client.get("/v1/users/u1/embedding").status_code] += 1
                except httpx.HTTPError:
                    statuses[0] += 1

    with (
        userembed("ingest", env=env) as ingest,
        userembed("worker", env=env) as first,
        userembed("worker", env=env) as second,
        userembed("serve", "--port", str(port), "--grpc-port", "0", env=env) as api,
    ):
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/readyz").is_success, 60, "ready")
        reader = threading.Thread(target=read_all_along)
        reader.start()
        try:
            produce(settings, messages[10 : len(messages) // 2])
            wait_for(
                lambda: asyncio.run(progress(own_cluster.url, reference))[0] > 0,
                60,
                "ingest to make progress",
            )
            victim = own_cluster.primaries()[0]
            own_cluster.kill(victim)  # kill -9 mid-stream
            produce(settings, messages[len(messages) // 2 :])
            own_cluster.wait_healthy(60)  # its replica took over
            assert victim not in own_cluster.primaries()
            wait_until_settled(own_cluster.url, reference, 180, ingest, first, second)
            served_before = statuses[200]
            wait_for(lambda: statuses[200] > served_before + 20, 30, "reads to recover")
        finally:
            stop_reading.set()
            reader.join()
        alive(ingest, first, second, api)
    # 200 before and after; 503 (never a 500 or a dropped connection) only in between
    assert set(statuses) <= {200, 503} and statuses[200] > 0, statuses
