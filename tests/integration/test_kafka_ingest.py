"""Kafka ingest against a real Kafka-protocol broker (librdkafka's mock cluster, or
KAFKA_BOOTSTRAP) and a real redis-server: exactly once in effect, dead letters,
crashes, redelivery and consumer groups."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import redis
from confluent_kafka import OFFSET_BEGINNING, OFFSET_INVALID, Consumer, Producer, TopicPartition

from service.api.app import create_app
from service.core.clock import now_ms
from service.core.events import Event, SourcedEvent, encode_event
from service.core.features import FeatureState, apply_events
from service.ingest import kafka as kafka_module
from service.ingest.dead_letters import DLQ_REASON_CLASS_HEADER, DLQ_REASON_HEADER
from service.ingest.kafka import KafkaEventSink, KafkaEventSource
from service.ingest.mock_broker import mock_kafka_cluster
from service.ingest.synthetic import MALFORMED_KINDS, SyntheticTraffic, malformed_payload
from service.ingest.updater import FeatureUpdater, run_ingest
from service.settings import Settings
from service.store.keys import KeyLayout
from service.store.redis import RedisStore
from service.store.redis_server import private_redis
from tests.helpers import Delta, sample
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


def read_topic(settings: Settings, topic: str, expected: int, timeout_s: float = 30.0) -> list[Any]:
    """Every message of ``topic`` (at least ``expected`` of them), read without a group."""
    consumer = Consumer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "group.id": f"reader-{uuid.uuid4().hex[:6]}",
            "enable.auto.commit": False,
            "fetch.max.bytes": 8_000_000,
        }
    )
    try:
        found: list[Any] = []
        for _ in range(int(timeout_s / 0.5)):
            metadata = consumer.list_topics(topic, timeout=10).topics[topic]
            if metadata.error is None and metadata.partitions:
                break
            time.sleep(0.5)
        consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in sorted(metadata.partitions)]
        )
        deadline = time.monotonic() + timeout_s
        while len(found) < expected and time.monotonic() < deadline:
            found += [m for m in consumer.consume(500, 0.2) if m.error() is None]
        found += [m for m in consumer.consume(500, 0.5) if m.error() is None]  # no more?
    finally:
        consumer.close()
    return found


def committed_and_high(settings: Settings) -> tuple[dict[int, int], dict[int, int]]:
    """The group's committed offset (OFFSET_INVALID: none) and the high watermark of
    every partition of the topic, asked of the broker (not of the source's consumer)."""
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": settings.kafka_group}
    )
    try:
        topic = consumer.list_topics(settings.kafka_topic, timeout=10).topics[settings.kafka_topic]
        partitions = [TopicPartition(settings.kafka_topic, p) for p in sorted(topic.partitions)]
        committed = {tp.partition: tp.offset for tp in consumer.committed(partitions, timeout=10)}
        high = {
            tp.partition: consumer.get_watermark_offsets(tp, timeout=10, cached=False)[1]
            for tp in partitions
        }
    finally:
        consumer.close()
    return committed, high


def committed_to_the_end(settings: Settings) -> bool:
    """Every partition with messages is committed to its high watermark."""
    committed, high = committed_and_high(settings)
    return bool(high) and all(committed[p] == h for p, h in high.items() if h > 0)


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


# The class of each malformed kind (docs/failures.md) and what its reason says.
DLQ_CLASS = {
    "not_json": "not_json",
    "missing_user_id": "contract",
    "bad_user_id": "invalid",
    "ts_in_seconds": "invalid",
    "bad_type": "contract",
}


def expected_reason(kind: str, event: Event) -> str:
    """The exact reason of the rule-broken kinds (README), a telling part of the others."""
    if kind == "bad_user_id":
        return "invalid user_id 'not a valid id!': only [A-Za-z0-9_.:@-], 1..128 chars"
    if kind == "ts_in_seconds":
        return (
            f"absurd ts {event.ts // 1000}: before 2000-01-01; ts is epoch milliseconds,"
            " not seconds"
        )
    return {
        "not_json": "not valid JSON",
        "missing_user_id": "missing required field `user_id`",
        "bad_type": "Invalid enum value 'teleport'",
    }[kind]


class CommitRecorder:
    """Spies on the source's real consumer: at every commit, before it reaches the
    broker, how many dead letters the DLQ topic already holds (its high watermarks)."""

    def __init__(self, settings: Settings) -> None:
        self.dlq_topic = settings.kafka_dlq_topic
        self.commits: list[tuple[dict[int, int], int]] = []
        self._watcher = Consumer(
            {"bootstrap.servers": settings.kafka_bootstrap, "group.id": "dlq-watcher"}
        )
        recorder = self

        class RecordingConsumer(Consumer):
            def commit(self, *args: Any, **kwargs: Any) -> Any:
                offsets = {tp.partition: tp.offset for tp in kwargs["offsets"]}
                recorder.commits.append((offsets, recorder.dead_letters_written()))
                return super().commit(*args, **kwargs)

        self.consumer_class = RecordingConsumer

    def dead_letters_written(self) -> int:
        metadata = self._watcher.list_topics(self.dlq_topic, timeout=10).topics[self.dlq_topic]
        if metadata.error is not None:
            return 0  # not created yet: nothing was written to it
        return sum(
            self._watcher.get_watermark_offsets(
                TopicPartition(self.dlq_topic, p), timeout=10, cached=False
            )[1]
            for p in metadata.partitions
        )

    def close(self) -> None:
        self._watcher.close()


async def test_malformed_messages_go_to_the_dlq_whole_before_their_batch_is_committed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each dead letter is the original key and value with exactly the documented
    headers (docs/failures.md), and it is acknowledged by the DLQ before any commit that
    covers its offset: a crash between the two must not lose it."""
    good = synthetic_events(400)
    bad_events = synthetic_events(len(MALFORMED_KINDS) * 2)
    kinds = [MALFORMED_KINDS[i % len(MALFORMED_KINDS)] for i in range(len(bad_events))]
    bad = [(e.user_id, malformed_payload(e, k)) for e, k in zip(bad_events, kinds, strict=True)]
    mixed = [(e.user_id, encode_event(e)) for e in good]
    for i, message in enumerate(bad):  # spread the bad ones through the batch
        mixed.insert(i * 40, message)
    produce(settings, mixed)
    recorder = CommitRecorder(settings)
    monkeypatch.setattr(kafka_module, "Consumer", recorder.consumer_class)
    applied = reaches(reference_states(good))

    async def applied_and_committed(store: RedisStore) -> bool:
        return await applied(store) and committed_to_the_end(settings)

    try:
        await ingest_until(settings, applied_and_committed)
    finally:
        recorder.close()

    # where each bad message is in the source topic: its value is unique
    position = {
        m.value(): (m.key(), int(m.partition()), int(m.offset()))
        for m in read_topic(settings, settings.kafka_topic, len(mixed))
    }
    dead = read_topic(settings, settings.kafka_dlq_topic, len(bad))
    assert sorted(m.value() for m in dead) == sorted(value for _, value in bad)
    by_value = {m.value(): m for m in dead}
    for event, kind, (key, value) in zip(bad_events, kinds, bad, strict=True):
        message = by_value[value]
        original_key, partition, offset = position[value]
        assert original_key == key.encode()
        assert (message.key(), message.value()) == (original_key, value)
        headers = message.headers()
        names = [name for name, _ in headers]
        assert names == [
            DLQ_REASON_HEADER,
            DLQ_REASON_CLASS_HEADER,
            "userembed.topic",
            "userembed.partition",
            "userembed.offset",
        ], (kind, headers)  # nothing truncated, no original headers
        values = dict(headers)
        assert values[DLQ_REASON_CLASS_HEADER] == DLQ_CLASS[kind].encode()
        assert values["userembed.topic"] == settings.kafka_topic.encode()
        assert values["userembed.partition"] == str(partition).encode()
        assert values["userembed.offset"] == str(offset).encode()
        reason = values[DLQ_REASON_HEADER].decode()
        if kind in ("bad_user_id", "ts_in_seconds"):
            assert reason == expected_reason(kind, event)
        else:
            assert expected_reason(kind, event) in reason, (kind, reason)

    bad_positions = [position[value][1:] for _, value in bad]
    committed_so_far: dict[int, int] = {}
    covered_at_commit = []  # (dead letters the group's offsets have passed, DLQ holds)
    for offsets, written in recorder.commits:
        committed_so_far.update(offsets)
        passed = sum(offset < committed_so_far.get(p, 0) for p, offset in bad_positions)
        covered_at_commit.append((passed, written))
    assert max(covered for covered, _ in covered_at_commit) == len(bad)
    for covered, written in covered_at_commit:
        assert written >= covered, covered_at_commit


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


def ingest_events(outcome: str) -> float:
    return sample("userembed_ingest_events_total", {"outcome": outcome})


async def test_a_redis_outage_is_retried_and_nothing_is_committed_until_applied(
    settings: Settings,
) -> None:
    """While the batch cannot be applied the group's offsets do not pass its first offset;
    once it is applied they reach the end of every partition."""
    events = synthetic_events(300)
    with private_redis() as url:
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        settings = settings.model_copy(update={"redis_url": url})
        store = RedisStore(url, timeout_ms=200)
        source = KafkaEventSource(settings)
        stop = asyncio.Event()
        retries = Delta("userembed_ingest_retries_total", {"operation": "store"})
        task = asyncio.create_task(
            run_ingest(source, FeatureUpdater(store, HISTORY), stop, max_backoff_s=0.5)
        )
        redis.Redis.from_url(url).shutdown(nosave=True)
        produce(settings, [(e.user_id, encode_event(e)) for e in events])
        deadline = asyncio.get_running_loop().time() + 30
        # two failed applies: the batch was consumed, and a commit made before applying
        # (or between the attempts) would have reached the broker by now
        while retries() < 2:
            assert asyncio.get_running_loop().time() < deadline, "no retry while Redis was down"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.1)
        committed, high = committed_and_high(settings)
        assert sum(high.values()) == len(events)
        # Nothing was applied, so nothing may be committed past each partition's first
        # offset, 0: the crash-loop guard does commit the batch's first offset (with its
        # restart count in the metadata) before applying it, which resumes at the batch.
        assert set(committed) == set(high)
        assert all(offset in (OFFSET_INVALID, 0) for offset in committed.values()), committed
        with private_redis(port=port):  # Redis is back, empty, on the same address
            checker = RedisStore(url)
            while not await reaches(reference_states(events))(checker):
                assert asyncio.get_running_loop().time() < deadline + 60
                await asyncio.sleep(0.1)
            await checker.close()
            while not committed_to_the_end(settings):
                assert asyncio.get_running_loop().time() < deadline + 60, committed_and_high(
                    settings
                )
                await asyncio.sleep(0.1)
            stop.set()
            await task
            await source.close()
            await store.close()
    committed, high = committed_and_high(settings)
    assert {p: committed[p] for p, h in high.items() if h > 0} == {
        p: h for p, h in high.items() if h > 0
    }


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
    metadata = consumer.list_topics(settings.kafka_topic, timeout=10).topics[settings.kafka_topic]
    consumer.close()
    assert len(seen) == len(events)
    partitions = len(metadata.partitions)  # the modulus is the topic's, not those seen
    assert partitions > 1 and {m.partition() for m in seen} == set(range(partitions))
    layout = KeyLayout(64)
    for message in seen:
        assert layout.shard(message.key().decode()) % partitions == message.partition()
