"""Ingest benchmark: events/s through the batch path, from memory and from Kafka.

(a) memory: pre-encoded JSON messages go through the same code as Kafka ingest
(typed decode -> FeatureUpdater.apply against a real Redis), the ceiling of our code,
with the time split into decode, feature update and Redis I/O;
(b) kafka: the same messages produced to a Kafka-protocol broker and consumed by
KafkaEventSource + run_ingest;
(c) msgspec's typed decoder vs the standard json module on the same messages.
Numbers are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import msgspec
import redis

from service.core.clock import now_ms
from service.core.events import Event, SourcedEvent, decode_event, encode_event
from service.core.features import FeatureState, hash_id
from service.ingest.kafka import KafkaEventSink, KafkaEventSource
from service.ingest.mock_broker import mock_kafka_cluster
from service.ingest.synthetic import SyntheticTraffic
from service.ingest.updater import FeatureUpdater, run_ingest
from service.settings import Settings
from service.store.redis import RedisStore
from service.store.redis_server import private_redis


@dataclass(frozen=True, slots=True)
class IngestBenchConfig:
    # librdkafka's mock broker keeps only a few MB per partition: stay well below
    events: int = 40_000
    users: int = 10_000
    batch: int = 5000
    redis_url: str | None = None
    kafka_bootstrap: str | None = None


class TimedRedisStore(RedisStore):
    """RedisStore that accumulates the time spent in feature I/O."""

    def __init__(self, url: str, timeout_ms: int) -> None:
        super().__init__(url, timeout_ms)
        self.io_s = 0.0

    async def get_features(self, user_ids: Sequence[str]) -> list[FeatureState | None]:
        started = time.perf_counter()
        try:
            return await super().get_features(user_ids)
        finally:
            self.io_s += time.perf_counter() - started

    async def put_features(
        self,
        states: Mapping[str, FeatureState],
        dirty_at_ms: int | None = None,
        expected_versions: Mapping[str, int] | None = None,
    ) -> list[str]:
        started = time.perf_counter()
        try:
            return await super().put_features(states, dirty_at_ms, expected_versions)
        finally:
            self.io_s += time.perf_counter() - started


def _flush(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()


async def _from_memory(messages: list[bytes], redis_url: str, batch: int) -> dict[str, float]:
    store = TimedRedisStore(redis_url, timeout_ms=5000)
    updater = FeatureUpdater(store, history_length=50)
    decode_s = apply_s = 0.0
    for start in range(0, len(messages), batch):
        t0 = time.perf_counter()
        now = now_ms()
        events = [
            SourcedEvent(decode_event(raw, now), 0, start + i)
            for i, raw in enumerate(messages[start : start + batch])
        ]
        t1 = time.perf_counter()
        await updater.apply(events)
        decode_s += t1 - t0
        apply_s += time.perf_counter() - t1
    await store.close()
    total = decode_s + apply_s
    return {
        "events_per_s": len(messages) / total,
        "decode_share": decode_s / total,
        "update_share": (apply_s - store.io_s) / total,
        "redis_share": store.io_s / total,
    }


async def _from_kafka(events: list[Event], settings: Settings) -> float:
    sink = KafkaEventSink(settings, delivery_timeout_s=60)
    for event in events:
        sink.produce_nowait(event.user_id, encode_event(event))
    if sink.flush(60):
        raise RuntimeError("the broker did not acknowledge the benchmark events")
    store = RedisStore(settings.redis_url, timeout_ms=5000)
    updater = FeatureUpdater(store, history_length=50)
    source = KafkaEventSource(settings)
    stop = asyncio.Event()
    first_at: float | None = None
    original = updater.apply

    async def timed_apply(batch: Sequence[SourcedEvent]) -> object:
        nonlocal first_at
        first_at = first_at or time.perf_counter()
        result = await original(batch)
        if updater.applied_total >= len(events):
            stop.set()
        return result

    updater.apply = timed_apply  # type: ignore[method-assign,assignment]
    try:
        await asyncio.wait_for(
            run_ingest(source, updater, stop, max_events=settings.ingest_batch_max_events), 300
        )
    except TimeoutError:
        raise RuntimeError(
            f"only {updater.applied_total} of {len(events)} events arrived in 300 s "
            "(the mock broker truncates large partitions: use fewer --events)"
        ) from None
    elapsed = time.perf_counter() - (first_at or time.perf_counter())
    await source.close()
    await store.close()
    return len(events) / elapsed


def _decoders(messages: list[bytes]) -> dict[str, float]:
    """Messages/s of three ways to decode: parse-only json, json + typed convert, msgspec."""
    now = now_ms()

    def rate(decode: object) -> float:
        started = time.perf_counter()
        for raw in messages:
            decode(raw)  # type: ignore[operator]
        return len(messages) / (time.perf_counter() - started)

    return {
        "json.loads (parse only, no validation)": rate(json.loads),
        "json.loads + msgspec.convert (validated)": rate(
            lambda raw: msgspec.convert(json.loads(raw), Event)
        ),
        "msgspec typed decode_event (validated)": rate(lambda raw: decode_event(raw, now)),
    }


@contextlib.contextmanager
def _backends(config: IngestBenchConfig) -> Iterator[tuple[str, str]]:
    with contextlib.ExitStack() as stack:
        redis_url = config.redis_url or stack.enter_context(private_redis())
        bootstrap = config.kafka_bootstrap or stack.enter_context(mock_kafka_cluster())
        yield redis_url, bootstrap


def run_ingest_bench(config: IngestBenchConfig) -> dict[str, float]:
    """Run all three measurements in one process and print them side by side."""
    events = SyntheticTraffic(config.users, seed=11).events(config.events, now_ms())
    messages = [encode_event(e) for e in events]
    results: dict[str, float] = {}
    with _backends(config) as (redis_url, bootstrap):
        _flush(redis_url)
        hash_id.cache_clear()  # each measurement starts cold
        memory = asyncio.run(_from_memory(messages, redis_url, config.batch))
        _flush(redis_url)
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        settings = Settings(
            redis_url=redis_url,
            kafka_bootstrap=bootstrap,
            kafka_topic=topic,
            kafka_group=f"{topic}-group",
            ingest_batch_max_events=config.batch,
        )
        hash_id.cache_clear()
        kafka = asyncio.run(_from_kafka(events, settings))
        _flush(redis_url)
    decoders = _decoders(messages)
    print(
        f"userembed bench ingest  events={config.events} users={config.users} "
        f"batch={config.batch} broker={'mock' if not config.kafka_bootstrap else bootstrap}"
    )
    print(
        f"(a) memory -> batch path -> Redis : {memory['events_per_s']:>9,.0f} events/s  "
        f"(decode {memory['decode_share']:.0%}, feature update {memory['update_share']:.0%}, "
        f"Redis I/O {memory['redis_share']:.0%})"
    )
    print(f"(b) Kafka broker -> ingest -> Redis: {kafka:>9,.0f} events/s")
    print("(c) decoding the same messages:")
    for name, rate in decoders.items():
        print(f"    {name:<42} {rate:>11,.0f} messages/s")
        results[f"decode:{name}"] = rate
    results.update({f"memory:{k}": v for k, v in memory.items()}, kafka_events_per_s=kafka)
    return results
