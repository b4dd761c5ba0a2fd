"""Hostile Kafka input against the real pipeline (librdkafka's mock broker, or
KAFKA_BOOTSTRAP, and a real redis-server): no message stops ingest (issue 16).

Each poison pill is dead-lettered with its reason and class while every good event
around it is applied exactly once, ingest stays alive and the group's committed
offsets reach the high watermark. A dead-letter topic that cannot be written stops
consumption visibly and commits nothing past it; a message that kills ingest is
found by the crash-loop guard and dead-lettered, the rest of its batch applied.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
from collections.abc import Sequence
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from service.core.events import Event, SourcedEvent, encode_event
from service.ingest import dead_letters as dead_letters_module
from service.ingest import lag_watch
from service.ingest.dead_letters import (
    DLQ_ORIGINAL_SIZE_HEADER,
    DLQ_REASON_CLASS_HEADER,
    DLQ_REASON_HEADER,
    DLQ_TRUNCATED_HEADER,
)
from service.ingest.kafka import KafkaEventSource
from service.ingest.synthetic import MALFORMED_KINDS, malformed_payload
from service.ingest.updater import BatchResult, FeatureUpdater, run_ingest
from service.settings import Settings
from service.store.redis import RedisStore
from tests.helpers import sample
from tests.integration.test_kafka_ingest import (  # the harness of the Kafka ingest tests
    HISTORY,
    committed_and_high,
    ingest_until,
    kafka_bootstrap,
    reaches,
    read_topic,
    reference_states,
    settings,
    synthetic_events,
)

pytestmark = pytest.mark.slow
__all__ = ["kafka_bootstrap", "settings"]  # fixtures, shared with test_kafka_ingest

DEPTH = 10_000
# KIP-848 groups join in ~0.1 s on the mock broker, where a classic group's first join
# waits 3 s: the tests that restart ingest many times use it (the guard does not care).
FAST_GROUP = {"group.protocol": "consumer"}


def deep_json(depth: int = DEPTH) -> bytes:
    """What killed ingest with a RecursionError: an event whose field nests ``depth`` deep."""
    return b'{"event_id": "deep", "user_id": "u1", "x": ' + b"[" * depth + b"]" * depth + b"}"


def huge_malformed(size: int) -> bytes:
    """A ``size``-byte message that is not JSON (it was too big for the DLQ's headers)."""
    head = b'{"event_id": "huge", "user_id": "u1", "padding": "'
    return head + b"x" * (size - len(head))


def produce(
    settings: Settings,
    messages: Sequence[tuple[str, bytes]],
    headers: dict[int, list[tuple[str, bytes]]] | None = None,
) -> None:
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "linger.ms": 5,
            "message.max.bytes": 4_000_000,  # the hostile producer sends 1 MiB messages
        }
    )
    for index, (key, value) in enumerate(messages):
        producer.produce(
            settings.kafka_topic, key=key, value=value, headers=(headers or {}).get(index)
        )
        producer.poll(0)
    assert producer.flush(30) == 0


def read_dlq(settings: Settings, expected: int) -> list[Any]:
    return read_topic(settings, settings.kafka_dlq_topic, expected)


def assert_committed_to_the_end(settings: Settings) -> None:
    committed, high = committed_and_high(settings)
    assert {p: committed[p] for p, h in high.items() if h > 0} == {
        p: h for p, h in high.items() if h > 0
    }, (committed, high)


def position_of(settings: Settings, value: bytes, produced: int) -> tuple[int, int]:
    """(partition, offset) of the message whose value is ``value``."""
    for message in read_topic(settings, settings.kafka_topic, expected=produced):
        if message.value() == value:
            return int(message.partition()), int(message.offset())
    raise AssertionError(f"{value!r} is not in {settings.kafka_topic}")


def headers_of(message: Any) -> dict[str, bytes]:
    return dict(message.headers() or [])


def dead_letters(reason: str) -> float:
    return sample("userembed_ingest_dead_letters_total", {"reason": reason})


def interleave(good: list[Event], bad: list[bytes], spacing: int) -> list[tuple[str, bytes]]:
    mixed = [(e.user_id, encode_event(e)) for e in good]
    for i, value in enumerate(bad):
        mixed.insert(min(i * spacing + spacing // 2, len(mixed)), (f"u{i % 7}", value))
    return mixed


# --- each poison pill -------------------------------------------------------------------------


async def test_a_10000_deep_json_is_dead_lettered_and_ingest_goes_on(settings: Settings) -> None:
    good = synthetic_events(300)
    settings = settings.model_copy(update={"kafka_extra": FAST_GROUP})
    produce(settings, interleave(good, [deep_json()], spacing=300))
    before = sample("userembed_ingest_decoder_rejections_total", {"limit": "depth"})
    updater = await ingest_until(settings, reaches(reference_states(good)))
    assert updater.applied_total == len(good)
    [dead] = read_dlq(settings, 1)
    assert dead.value() == deep_json()
    headers = headers_of(dead)
    assert headers[DLQ_REASON_CLASS_HEADER] == b"too_deep"
    assert b"nests deeper than 32 levels" in headers[DLQ_REASON_HEADER]
    assert sample("userembed_ingest_decoder_rejections_total", {"limit": "depth"}) == before + 1
    assert_committed_to_the_end(settings)


async def test_a_1_mib_malformed_message_is_dead_lettered_truncated(settings: Settings) -> None:
    good = synthetic_events(300)
    settings = settings.model_copy(update={"kafka_extra": FAST_GROUP})
    mib = huge_malformed(1 << 20)  # over the DLQ's 1,000,000 bytes by itself
    edge = huge_malformed(999_900)  # fits the topic, but not with the dead-letter headers
    original_headers = [("trace-id", b"abc123"), ("source", b"hostile")]
    messages = interleave(good, [mib, edge], spacing=150)
    at = {i for i, (_, value) in enumerate(messages) if value in (mib, edge)}
    produce(settings, messages, headers={i: original_headers for i in at})
    truncated_before = sample("userembed_ingest_dead_letters_truncated_total")
    updater = await ingest_until(settings, reaches(reference_states(good)))
    assert updater.applied_total == len(good)

    dead = read_dlq(settings, 2)
    assert len(dead) == 2
    for message in dead:
        headers = headers_of(message)
        original = mib if int(headers[DLQ_ORIGINAL_SIZE_HEADER]) == len(mib) else edge
        assert headers[DLQ_TRUNCATED_HEADER] == b"1"
        assert int(headers[DLQ_ORIGINAL_SIZE_HEADER]) == len(original)
        assert headers[DLQ_REASON_CLASS_HEADER] == b"too_large"
        assert b"over the 65536-byte limit" in headers[DLQ_REASON_HEADER]
        assert headers["trace-id"] == b"abc123" and headers["source"] == b"hostile"
        assert message.key() in {f"u{i}".encode() for i in range(7)}
        value = message.value()
        assert 900_000 < len(value) < len(original) and original.startswith(value)
    assert sample("userembed_ingest_dead_letters_truncated_total") == truncated_before + 2
    assert_committed_to_the_end(settings)


async def test_poison_pills_mixed_into_a_stream_of_good_events(settings: Settings) -> None:
    """A few thousand good events with deep, huge and every other kind of malformed
    message spread through them: each good one applied once, each bad one dead-lettered
    once with its reason, committed to the end."""
    good = synthetic_events(3000, users=100)
    malformed = synthetic_events(len(MALFORMED_KINDS))
    bad = [
        deep_json(),
        huge_malformed(1 << 20),
        deep_json(50),
        huge_malformed(200_000),
        b"\xff\xfe not utf-8 \xc3\x28",
        b'{"event_id": "' + b"e" * 300 + b'", "user_id": "u1", "ts": 1, "type": "view"}',
        *(malformed_payload(e, kind) for e, kind in zip(malformed, MALFORMED_KINDS, strict=True)),
    ]
    produce(settings, interleave(good, bad, spacing=3000 // len(bad)))
    updater = await ingest_until(settings, reaches(reference_states(good)), timeout_s=90)
    assert updater.applied_total == len(good)

    dead = read_dlq(settings, len(bad))
    assert sorted(len(m.value()) for m in dead if DLQ_TRUNCATED_HEADER not in headers_of(m)) == (
        sorted(len(v) for v in bad if len(v) < 1_000_000)
    )
    assert len(dead) == len(bad)
    classes = sorted(headers_of(m)[DLQ_REASON_CLASS_HEADER].decode() for m in dead)
    expected = ["too_deep", "too_large", "too_deep", "too_large", "not_json", "string_too_long"]
    expected += ["not_json", "contract", "invalid", "invalid", "contract"]  # MALFORMED_KINDS
    assert classes == sorted(expected)
    assert all(headers_of(m)[DLQ_REASON_HEADER] for m in dead)
    assert_committed_to_the_end(settings)


async def test_a_dead_letter_the_producer_refuses_for_its_size_is_cut_further(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Our size estimate is a kilobyte short: librdkafka refuses the record
    (MSG_SIZE_TOO_LARGE) and it is produced again, cut to half the budget."""
    monkeypatch.setattr(dead_letters_module, "_RECORD_OVERHEAD", -1000)
    settings = settings.model_copy(
        update={"kafka_extra": FAST_GROUP, "ingest_dlq_max_message_bytes": 20_000}
    )
    good = synthetic_events(50)
    bad = huge_malformed(30_000)  # under the 64 KiB event limit: malformed JSON
    produce(settings, interleave(good, [bad], spacing=50))
    await ingest_until(settings, reaches(reference_states(good)))
    [dead] = read_dlq(settings, 1)
    headers = headers_of(dead)
    assert headers[DLQ_REASON_CLASS_HEADER] == b"not_json"
    assert headers[DLQ_TRUNCATED_HEADER] == b"1"
    assert headers[DLQ_ORIGINAL_SIZE_HEADER] == b"30000"
    assert 10_000 < len(dead.value()) < 11_000  # half the budget (+ the estimate's error)
    assert bad.startswith(dead.value())
    assert_committed_to_the_end(settings)


# --- the dead-letter topic cannot be written ----------------------------------------------------


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_an_unwritable_dlq_stops_consumption_visibly_and_commits_nothing_past_it(
    settings: Settings, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DLQ's broker is down: the batch with the bad message is not committed, nothing
    more is consumed, the gauge says so and the lag keeps being measured; once the DLQ is
    back (here: ingest restarted with it reachable) everything is applied exactly once."""
    monkeypatch.setattr(lag_watch, "_STATS_INTERVAL_S", 0.2)  # the lag watch, sooner
    first, second = synthetic_events(200), synthetic_events(200)
    produce(settings, interleave(first, [b"{not json"], spacing=200))
    broken = settings.model_copy(
        update={
            "kafka_dlq_extra": {"bootstrap.servers": f"127.0.0.1:{closed_port()}"},
            "ingest_dlq_timeout_ms": 300,
            "kafka_extra": FAST_GROUP,
        }
    )
    store = RedisStore(settings.redis_url, timeout_ms=2000)
    source = KafkaEventSource(broken)
    stop = asyncio.Event()
    caplog.set_level(logging.WARNING, logger="service.ingest.kafka")
    task = asyncio.create_task(
        run_ingest(source, FeatureUpdater(store, HISTORY), stop, max_wait_s=0.2, max_backoff_s=0.2)
    )
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while sample("userembed_ingest_dlq_blocked") != 1:
            assert asyncio.get_running_loop().time() < deadline, "the DLQ never showed blocked"
            assert not task.done(), task.exception()
            await asyncio.sleep(0.05)
        consumed = sample("userembed_ingest_events_total", {"outcome": "consumed"})
        produce(settings, [(e.user_id, encode_event(e)) for e in second])
        await asyncio.sleep(1.5)  # several retries; and the lag watch sees the new events
        assert not task.done(), task.exception()
        assert "event=dlq_blocked" in caplog.text
        assert sample("userembed_ingest_events_total", {"outcome": "consumed"}) == consumed
        partition, offset = position_of(settings, b"{not json", len(first) + 1)
        committed, high = committed_and_high(settings)
        assert committed[partition] <= offset, (committed, partition, offset)
        lags = {
            p: sample("userembed_ingest_consumer_lag_messages", {"partition": str(p)}) for p in high
        }
        assert sum(lags.values()) > len(second) / 2, (lags, high)
    finally:
        stop.set()
        await task
        await source.close()
    assert sample("userembed_ingest_dlq_blocked") == 1  # still: it never got through

    fixed = settings.model_copy(update={"kafka_extra": FAST_GROUP})
    updater = await ingest_until(fixed, reaches(reference_states(first + second)))
    await store.close()
    assert sample("userembed_ingest_dlq_blocked") == 0
    [dead] = read_dlq(settings, 1)
    assert dead.value() == b"{not json"
    assert_committed_to_the_end(settings)
    # the first run applied the batches before the bad one; nothing twice
    assert updater.applied_total <= len(first) + len(second)


# --- a message that kills ingest ----------------------------------------------------------------

KILLER = "i-kills-ingest"


class IngestDied(Exception):
    """Ingest dying while it applies a batch (a segfault, an OOM kill, a bug)."""


class DyingUpdater(FeatureUpdater):
    """Dies on any batch holding the killer event, before writing anything of it."""

    async def apply(self, batch: Sequence[SourcedEvent]) -> BatchResult:
        if any(s.event.item_id == KILLER for s in batch):
            raise IngestDied(f"batch of {len(batch)}")
        return await super().apply(batch)


async def run_until_death_or_done(
    settings: Settings, done: Any, timeout_s: float = 30.0
) -> tuple[bool, int]:
    """One life of ingest: (died, events applied). The source is closed without a commit,
    as a dead process leaves it; the next life is a new consumer of the same group."""
    store = RedisStore(settings.redis_url, timeout_ms=2000)
    source = KafkaEventSource(settings)
    updater = DyingUpdater(store, HISTORY)
    stop = asyncio.Event()
    task = asyncio.create_task(run_ingest(source, updater, stop, max_events=200, max_wait_s=0.1))
    died = False
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not task.done() and not await done(store):
            assert asyncio.get_running_loop().time() < deadline, "neither died nor finished"
            await asyncio.sleep(0.05)
        if task.done():
            died = isinstance(task.exception(), IngestDied)
            assert died, task.exception()
    finally:
        stop.set()
        with_death = asyncio.gather(task, return_exceptions=True)
        await with_death
        await source.close()
        await store.close()
    return died, updater.applied_total


async def test_a_message_that_kills_ingest_is_dead_lettered_and_its_batch_applied(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    good = synthetic_events(1200, users=60)
    killer = Event("killer", "u7", good[0].ts, good[0].type, KILLER)
    messages = [(e.user_id, encode_event(e)) for e in good]
    messages.insert(700, (killer.user_id, encode_event(killer)))
    produce(settings, messages)
    settings = settings.model_copy(
        update={"kafka_extra": FAST_GROUP, "ingest_crash_loop_restarts": 2}
    )
    caplog.set_level(logging.WARNING, logger="service.ingest.kafka")
    reference = reaches(reference_states(good))
    before = dead_letters("crash_loop")
    lives: list[tuple[bool, int]] = []
    while not lives or lives[-1][0]:
        assert len(lives) < 10, f"the crash loop was not broken: {lives}"
        lives.append(await run_until_death_or_done(settings, reference))
    # Two restarts at the offset of the batch, then the killer dies alone twice. A death
    # in a batch that is not an assignment's first is not counted (only the restarts
    # are), so it takes a life or two more when the killer is not in the first batch.
    deaths = [died for died, _ in lives]
    assert deaths[-1] is False and 4 <= sum(deaths) <= 8, lives
    assert sum(applied for _, applied in lives) == len(good)  # each good event once
    assert "event=crash_loop_detected" in caplog.text

    [dead] = read_dlq(settings, 1)
    assert json.loads(dead.value())["item_id"] == KILLER
    headers = headers_of(dead)
    assert headers[DLQ_REASON_CLASS_HEADER] == b"crash_loop"
    assert b"crashed the consumer 4 times" in headers[DLQ_REASON_HEADER]
    assert dead_letters("crash_loop") == before + 1
    assert sample("userembed_ingest_crash_loop_partitions") == 0
    assert_committed_to_the_end(settings)
    # the guard left no trace in the committed offsets' metadata
    consumer = Consumer(
        {"bootstrap.servers": settings.kafka_bootstrap, "group.id": settings.kafka_group}
    )
    partitions = [TopicPartition(settings.kafka_topic, p) for p in range(4)]
    metadata = [tp.metadata for tp in consumer.committed(partitions, timeout=10)]
    consumer.close()
    assert all(not m for m in metadata), metadata


async def test_restarts_that_make_progress_are_not_a_crash_loop(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Ingest stopped and started (deploys, rebalances) after it committed: no replay,
    even with the guard at its most sensitive (one restart)."""
    settings = settings.model_copy(
        update={"kafka_extra": FAST_GROUP, "ingest_crash_loop_restarts": 1}
    )
    caplog.set_level(logging.WARNING, logger="service.ingest.kafka")
    events: list[Event] = []
    applied = 0
    for _ in range(3):
        more = synthetic_events(200)
        produce(settings, [(e.user_id, encode_event(e)) for e in more])
        events += more
        died, count = await run_until_death_or_done(settings, reaches(reference_states(events)))
        assert not died
        applied += count
        assert sample("userembed_ingest_crash_loop_partitions") == 0
    assert applied == len(events)
    assert "crash_loop" not in caplog.text and "restarted_at_same_offset" not in caplog.text
