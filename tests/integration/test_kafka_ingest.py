"""Kafka ingest against a real Kafka-protocol broker (librdkafka's mock cluster, or
KAFKA_BOOTSTRAP) and a real redis-server: exactly once in effect, dead letters,
crashes, redelivery and consumer groups."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from confluent_kafka import Consumer, Producer
from prometheus_client import REGISTRY

from service.api.app import create_app
from service.core.clock import now_ms
from service.core.events import Event, SourcedEvent, encode_event
from service.core.features import FeatureState, apply_events
from service.ingest.dead_letters import DLQ_REASON_HEADER
from service.ingest.kafka import KafkaEventSink, KafkaEventSource
from service.ingest.mock_broker import mock_kafka_cluster
from service.ingest.synthetic import MALFORMED_KINDS, SyntheticTraffic, malformed_payload
from service.ingest.updater import FeatureUpdater, run_ingest
from service.settings import Settings
from service.store.keys import KeyLayout
from service.store.redis import RedisStore
from service.store.redis_server import private_redis
from tests.processes import userembed, wait_for

pytestmark = pytest.mark.slow
HISTORY = 50


@pytest.fixture(scope="module")
def kafka_bootstrap() -> Iterator[str]:
    configured = os.environ.get("KAFKA_BOOTSTRAP")
    if configured:
        yield configured
        return
    with mock_kafka_cluster() as bootstrap:
        yield bootstrap
        gc.collect()  # destroy clients held in cycles while their broker still exists


@pytest.fixture
def settings(kafka_bootstrap: str, clean_redis: str) -> Settings:
    """A fresh topic and group per test, so tests never see each other's messages."""
    name = f"events-{uuid.uuid4().hex[:8]}"
    return Settings(
        redis_url=clean_redis,
        kafka_bootstrap=kafka_bootstrap,
        kafka_topic=name,
        kafka_group=f"{name}-group",
        history_length=HISTORY,
        ingest_batch_max_events=500,
    )


def env_of(settings: Settings) -> dict[str, str]:
    return {
        "USEREMBED_REDIS_URL": settings.redis_url,
        "USEREMBED_KAFKA_BOOTSTRAP": settings.kafka_bootstrap,
        "USEREMBED_KAFKA_TOPIC": settings.kafka_topic,
        "USEREMBED_KAFKA_GROUP": settings.kafka_group,
        "USEREMBED_HISTORY_LENGTH": str(HISTORY),
        "USEREMBED_INGEST_BATCH_MAX_EVENTS": "200",
        # a killed member is noticed after 6 s instead of the default 45 s
        "USEREMBED_KAFKA_EXTRA": '{"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}',
    }


def produce(settings: Settings, messages: list[tuple[str, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap, "linger.ms": 5})
    for key, value in messages:
        producer.produce(settings.kafka_topic, key=key, value=value)
        producer.poll(0)
    assert producer.flush(30) == 0


def synthetic_events(count: int, users: int = 40) -> list[Event]:
    return SyntheticTraffic(users, seed=3).events(count, now_ms())


def reference_states(events: list[Event]) -> dict[str, FeatureState]:
    """What every user's state must be: all its events applied once, in log order."""
    by_user: dict[str, list[SourcedEvent]] = defaultdict(list)
    for offset, event in enumerate(events):
        by_user[event.user_id].append(SourcedEvent(event, 0, offset))
    return {u: apply_events(FeatureState.empty(), evs, HISTORY)[0] for u, evs in by_user.items()}


async def stored_states(redis_url: str, user_ids: list[str]) -> list[FeatureState | None]:
    store = RedisStore(redis_url, timeout_ms=2000)
    try:
        return await store.get_features(user_ids)
    finally:
        await store.close()


def matches(state: FeatureState | None, expected: FeatureState) -> bool:
    return (
        state is not None
        and state.timestamps.tolist() == expected.timestamps.tolist()
        and state.item_hashes.tolist() == expected.item_hashes.tolist()
        and state.category_hashes.tolist() == expected.category_hashes.tolist()
        and state.types.tolist() == expected.types.tolist()
        and state.last_event_ms == expected.last_event_ms
        and bool(np.allclose(state.counters, expected.counters, rtol=1e-5, atol=1e-6))
    )


def all_match(redis_url: str, reference: dict[str, FeatureState]) -> bool:
    users = sorted(reference)
    states = asyncio.run(stored_states(redis_url, users))
    return all(matches(s, reference[u]) for s, u in zip(states, users, strict=True))


async def ingest_until(settings: Settings, done: Any, timeout_s: float = 60.0) -> FeatureUpdater:
    """Run in-process ingest until ``done()`` (checked between batches) or time out."""
    store = RedisStore(settings.redis_url, timeout_ms=2000)
    source = KafkaEventSource(settings)
    updater = FeatureUpdater(store, settings.history_length)
    stop = asyncio.Event()
    task = asyncio.create_task(run_ingest(source, updater, stop, max_wait_s=0.2))
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not await done(store):
            assert asyncio.get_running_loop().time() < deadline, "ingest did not finish in time"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task
        await source.close()
        await store.close()
    return updater


def reaches(reference: dict[str, FeatureState]) -> Any:
    users = sorted(reference)

    async def done(store: RedisStore) -> bool:
        states = await store.get_features(users)
        return all(matches(s, reference[u]) for s, u in zip(states, users, strict=True))

    return done


async def test_feature_states_equal_the_reference(settings: Settings) -> None:
    events = synthetic_events(3000)
    produce(settings, [(e.user_id, encode_event(e)) for e in events])
    updater = await ingest_until(settings, reaches(reference_states(events)))
    assert updater.applied_total == len(events)


async def test_redelivered_messages_are_not_counted_twice(settings: Settings) -> None:
    events = synthetic_events(1000)
    produce(settings, [(e.user_id, encode_event(e)) for e in events])
    reference = reference_states(events)
    await ingest_until(settings, reaches(reference))
    users = sorted(reference)
    before = [s.version for s in await stored_states(settings.redis_url, users) if s]

    # A group with no committed offsets starts from the beginning: every message is
    # delivered a second time, at the same (partition, offset), as after lost commits.
    settings = settings.model_copy(update={"kafka_group": settings.kafka_group + "-again"})

    duplicates_before = ingest_events("duplicate")

    async def redelivered_everything(_: RedisStore) -> bool:
        return ingest_events("duplicate") - duplicates_before >= len(events)

    updater = await ingest_until(settings, redelivered_everything)
    assert updater.applied_total == 0
    after = [s.version for s in await stored_states(settings.redis_url, users) if s]
    assert after == before  # nothing was written again
    check = RedisStore(settings.redis_url)
    assert await reaches(reference)(check)
    await check.close()


async def test_malformed_messages_go_to_the_dlq_with_reasons(settings: Settings) -> None:
    good = synthetic_events(400)
    bad_events = synthetic_events(len(MALFORMED_KINDS) * 2)
    bad = [
        (e.user_id, malformed_payload(e, MALFORMED_KINDS[i % len(MALFORMED_KINDS)]))
        for i, e in enumerate(bad_events)
    ]
    mixed = [(e.user_id, encode_event(e)) for e in good]
    for i, message in enumerate(bad):  # spread the bad ones through the batch
        mixed.insert(i * 40, message)
    produce(settings, mixed)
    await ingest_until(settings, reaches(reference_states(good)))

    dlq = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"dlq-reader-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
        }
    )
    dlq.subscribe([settings.kafka_dlq_topic])
    dead: list[Any] = []
    deadline = asyncio.get_running_loop().time() + 30
    while len(dead) < len(bad) and asyncio.get_running_loop().time() < deadline:
        dead += [m for m in dlq.consume(100, 0.5) if m.error() is None]
    dlq.close()
    assert sorted(m.value() for m in dead) == sorted(value for _, value in bad)
    for message in dead:
        headers = dict(message.headers() or [])
        assert headers[DLQ_REASON_HEADER]
        assert headers["userembed.topic"].decode() == settings.kafka_topic
        assert int(headers["userembed.offset"]) >= 0
    reasons = " | ".join(dict(m.headers())[DLQ_REASON_HEADER].decode() for m in dead)
    for expected in ("not valid JSON", "missing required field `user_id`", "invalid user_id"):
        assert expected in reasons
    assert "epoch milliseconds, not seconds" in reasons and "Invalid enum value" in reasons


def test_kill_9_mid_stream_then_restart_loses_nothing_and_counts_nothing_twice(
    settings: Settings,
) -> None:
    events = synthetic_events(20_000, users=200)
    reference = reference_states(events)
    produce(settings, [(e.user_id, encode_event(e)) for e in events])
    env = env_of(settings)
    with userembed("ingest", env=env) as first:
        wait_for(
            lambda: any(asyncio.run(stored_states(settings.redis_url, sorted(reference)))),
            60,
            "ingest to make progress",
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)
    assert not all_match(settings.redis_url, reference), "killed too late to test anything"
    with userembed("ingest", env=env) as second:
        wait_for(lambda: all_match(settings.redis_url, reference), 120, "states to match")
        os.killpg(second.pid, signal.SIGTERM)
        assert second.wait(30) == 0, second.output()
    assert "event=ingest_stopped" in second.output()


def test_two_ingest_processes_split_the_partitions(settings: Settings) -> None:
    events = synthetic_events(4000, users=100)
    reference = reference_states(events)
    messages = [(e.user_id, encode_event(e)) for e in events]
    produce(settings, messages[:10])  # the topic exists before the members subscribe
    env = env_of(settings)
    with userembed("ingest", env=env) as a, userembed("ingest", env=env) as b:
        wait_for(
            lambda: _last_assignment(a.output()) and _last_assignment(b.output()),
            90,
            "both members to hold partitions",
        )
        produce(settings, messages[10:])
        wait_for(lambda: all_match(settings.redis_url, reference), 120, "states to match")
        outputs = (a.output(), b.output())
    assigned = [_last_assignment(out) for out in outputs]
    assert all(assigned), outputs
    assert sorted(assigned[0] + assigned[1]) == [0, 1, 2, 3]


def _last_assignment(output: str) -> list[int]:
    lines = [line for line in output.splitlines() if "event=partitions_assigned" in line]
    text = lines[-1].split("partitions=")[1] if lines else "[]"
    return [int(p) for p in text.strip("[] \n").split(",") if p.strip()]


async def test_posted_events_reach_the_feature_state_through_kafka(settings: Settings) -> None:
    events = synthetic_events(50, users=5)
    sink = KafkaEventSink(settings)
    store = RedisStore(settings.redis_url)
    app = create_app(store, settings, lambda: None, event_sink=sink, clock=now_ms)
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            response = await client.post(
                "/v1/events", content=b"[" + b",".join(encode_event(e) for e in events) + b"]"
            )
    finally:
        await sink.close()
        await store.close()
    assert (response.status_code, response.json()) == (202, {"accepted": 50})
    await ingest_until(settings, reaches(reference_states(events)))


def store_retries() -> float:
    value = REGISTRY.get_sample_value("userembed_ingest_retries_total", {"operation": "store"})
    return value or 0.0


def ingest_events(outcome: str) -> float:
    value = REGISTRY.get_sample_value("userembed_ingest_events_total", {"outcome": outcome})
    return value or 0.0


async def test_a_redis_outage_is_retried_and_nothing_is_committed_until_applied(
    settings: Settings,
) -> None:
    events = synthetic_events(300)
    with private_redis() as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        settings = settings.model_copy(update={"redis_url": url})
        store = RedisStore(url, timeout_ms=200)
        source = KafkaEventSource(settings)
        stop = asyncio.Event()
        before = store_retries()
        task = asyncio.create_task(
            run_ingest(source, FeatureUpdater(store, HISTORY), stop, max_backoff_s=0.5)
        )
        redis.Redis.from_url(url).shutdown(nosave=True)
        produce(settings, [(e.user_id, encode_event(e)) for e in events])
        deadline = asyncio.get_running_loop().time() + 30
        while store_retries() == before:
            assert asyncio.get_running_loop().time() < deadline, "no retry while Redis was down"
            await asyncio.sleep(0.1)
        with private_redis(port=port):  # Redis is back, empty, on the same address
            checker = RedisStore(url)
            while not await reaches(reference_states(events))(checker):
                assert asyncio.get_running_loop().time() < deadline + 60
                await asyncio.sleep(0.1)
            await checker.close()
            stop.set()
            await task
            await source.close()
            await store.close()


def test_a_partitions_users_fall_in_the_shards_congruent_to_it(settings: Settings) -> None:
    """librdkafka's default partitioner is crc32(key) % partitions, the store's shard is
    crc32(user_id) % shards: with shards a multiple of partitions, a partition's batch
    touches only shards / partitions of them (docs/capacity.md)."""
    sink = KafkaEventSink(settings)
    events = synthetic_events(400, users=200)
    for e in events:
        sink.produce_nowait(e.user_id, encode_event(e))
    assert sink.flush(30) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"partition-check-{uuid.uuid4().hex[:6]}",
            "auto.offset.reset": "earliest",
        }
    )
    consumer.subscribe([settings.kafka_topic])
    seen: list[Any] = []
    for _ in range(60):
        seen += [m for m in consumer.consume(500, 0.5) if m.error() is None]
        if len(seen) >= len(events):
            break
    consumer.close()
    assert len(seen) == len(events)
    partitions = len({m.partition() for m in seen})
    assert partitions > 1
    layout = KeyLayout(64)
    for message in seen:
        assert layout.shard(message.key().decode()) % partitions == message.partition()
