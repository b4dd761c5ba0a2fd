"""Kafka implementations of the event seams (confluent-kafka / librdkafka).

:class:`KafkaEventSource` is ingest's source: a consumer-group member that decodes
each message with the typed decoder, sends rejects to ``<topic>.dlq`` with the
reason in headers, and commits offsets manually, only when asked to by the consume
loop, i.e. after the batch's effect is durable in the store.

:class:`KafkaEventSink` produces events keyed by user_id (per-user order), and
waits for the brokers' acknowledgement: POST /v1/events and ``userembed produce``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Final

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from service.core.clock import Clock, now_ms
from service.core.events import Event, EventRejected, SourcedEvent, decode_event, encode_event
from service.ingest.updater import SourceUnavailable
from service.metrics import INGEST_EVENTS, INGEST_LAG, INGEST_LAST_COMMIT, INGEST_REBALANCES
from service.settings import Settings

log = logging.getLogger(__name__)

# Commit errors that mean "this partition is no longer ours": the events were applied
# (idempotently), and the new owner resumes from the last commit and skips them.
_LOST_OWNERSHIP: Final = {
    KafkaError.REBALANCE_IN_PROGRESS,
    KafkaError.ILLEGAL_GENERATION,
    KafkaError.UNKNOWN_MEMBER_ID,
    KafkaError._ASSIGNMENT_LOST,
}
DLQ_REASON_HEADER: Final = "userembed.reason"


class SinkUnavailable(RuntimeError):
    """Events could not be handed to Kafka (not acknowledged in time)."""


def _dead_letter_headers(message: Message, reason: str) -> list[tuple[str, str | bytes | None]]:
    return [
        (DLQ_REASON_HEADER, reason.encode()),
        ("userembed.topic", (message.topic() or "").encode()),
        ("userembed.partition", str(message.partition()).encode()),
        ("userembed.offset", str(message.offset()).encode()),
    ]


class KafkaEventSource:
    """Consumer-group source with a dead-letter topic and manual, post-write commits.

    Rebalances need no special draining: librdkafka runs the revoke callback only
    inside ``consume``, and the consume loop calls ``consume`` only after the previous
    batch was applied and committed, so no batch is ever in flight at a revoke.
    """

    def __init__(self, settings: Settings, clock: Clock = now_ms) -> None:
        common: dict[str, Any] = settings.kafka_client_config()
        self._topic = settings.kafka_topic
        self._dlq_topic = settings.kafka_dlq_topic
        self._clock = clock
        self._consumer = Consumer(
            {
                **common,
                "group.id": settings.kafka_group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                "statistics.interval.ms": 5000,
                "stats_cb": self._on_stats,
                "error_cb": _log_client_error,
            }
        )
        self._producer = Producer(
            {**common, "linger.ms": 5, "acks": "all", "error_cb": _log_client_error}
        )
        self._consumer.subscribe(
            [self._topic], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        self._next_offsets: dict[int, int] = {}
        self._dead_letters: list[tuple[Message, str]] = []

    async def next_batch(self, max_events: int, timeout_s: float) -> list[SourcedEvent]:
        messages = await asyncio.to_thread(self._consumer.consume, max_events, timeout_s)
        now = self._clock()
        good: list[SourcedEvent] = []
        consumed = 0
        for message in messages:
            error = message.error()
            if error is not None:
                log.warning("event=kafka_consume_error reason=%r", error.str())
                continue
            consumed += 1
            # a message without an error always has its position
            partition, offset = int(message.partition() or 0), int(message.offset() or 0)
            self._next_offsets[partition] = max(self._next_offsets.get(partition, 0), offset + 1)
            try:
                event = decode_event(message.value() or b"", now)
            except EventRejected as rejected:
                self._dead_letters.append((message, rejected.reason))
                continue
            good.append(SourcedEvent(event, partition, offset))
        INGEST_EVENTS.labels("consumed").inc(consumed)
        return good

    async def commit(self) -> None:
        """Make dead letters durable, then commit the offsets of everything consumed."""
        if self._dead_letters:
            await asyncio.to_thread(self._send_dead_letters)
        if not self._next_offsets:
            return
        offsets = [TopicPartition(self._topic, p, o) for p, o in self._next_offsets.items()]
        try:
            await asyncio.to_thread(self._consumer.commit, offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() not in _LOST_OWNERSHIP:
                raise SourceUnavailable(f"offset commit failed: {error.str()}") from exc
            log.warning("event=commit_after_revoke partitions=%s", sorted(self._next_offsets))
        self._next_offsets.clear()
        INGEST_LAST_COMMIT.set(time.time())

    def _send_dead_letters(self) -> None:
        """Produce every pending dead letter and wait for acknowledgement (at least once)."""
        failed: list[str] = []

        def on_delivery(error: KafkaError | None, _: Message) -> None:
            if error is not None:
                failed.append(error.str())

        for message, reason in self._dead_letters:
            self._producer.produce(
                self._dlq_topic,
                value=message.value(),
                key=message.key(),
                headers=_dead_letter_headers(message, reason),
                on_delivery=on_delivery,
            )
        unacknowledged = self._producer.flush(10.0)
        if failed or unacknowledged:
            reason = failed[0] if failed else f"{unacknowledged} not acknowledged in 10 s"
            raise SourceUnavailable(f"dead-letter topic {self._dlq_topic}: {reason}")
        INGEST_EVENTS.labels("dead_lettered").inc(len(self._dead_letters))
        for message, reason in self._dead_letters:
            log.info(
                "event=dead_lettered partition=%d offset=%d reason=%r",
                message.partition(),
                message.offset(),
                reason,
            )
        self._dead_letters.clear()

    def _on_assign(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        INGEST_REBALANCES.labels("assign").inc()
        log.info("event=partitions_assigned partitions=%s", [p.partition for p in partitions])

    def _on_revoke(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        INGEST_REBALANCES.labels("revoke").inc()
        for p in partitions:
            with contextlib.suppress(KeyError):
                INGEST_LAG.remove(str(p.partition))
        log.info("event=partitions_revoked partitions=%s", [p.partition for p in partitions])

    def _on_stats(self, stats_json: str) -> None:
        """librdkafka statistics -> consumer lag per partition."""
        stats = json.loads(stats_json)
        partitions = stats.get("topics", {}).get(self._topic, {}).get("partitions", {})
        for name, partition in partitions.items():
            lag = partition.get("consumer_lag", -1)
            if int(name) >= 0 and lag >= 0:
                INGEST_LAG.labels(name).set(lag)

    async def close(self) -> None:
        """Leave the group and release the clients (no background reconnects after this)."""
        await asyncio.to_thread(self._consumer.close)
        await asyncio.to_thread(self._producer.flush, 5.0)
        del self._producer


def _log_client_error(error: KafkaError) -> None:
    log.warning("event=kafka_client_error code=%s reason=%r", error.name(), error.str())


class KafkaEventSink:
    """Produces events keyed by user_id and waits until the brokers acknowledge them."""

    def __init__(self, settings: Settings, delivery_timeout_s: float = 5.0) -> None:
        self._topic = settings.kafka_topic
        self._timeout_s = delivery_timeout_s
        self._producer = Producer(
            {
                **settings.kafka_client_config(),
                "acks": "all",
                "enable.idempotence": True,
                "linger.ms": 5,
                "message.timeout.ms": int(delivery_timeout_s * 1000),
                "error_cb": _log_client_error,
            }
        )

    def produce_nowait(self, key: str, value: bytes) -> None:
        """Queue one message (for bulk producers); ``flush`` waits for delivery."""
        while True:
            try:
                self._producer.produce(self._topic, key=key, value=value)
                break
            except BufferError:
                self._producer.poll(0.05)  # local queue full: serve callbacks, retry
        self._producer.poll(0)

    def flush(self, timeout_s: float | None = None) -> int:
        remaining: int = self._producer.flush(self._timeout_s if timeout_s is None else timeout_s)
        return remaining

    async def send(self, events: Sequence[Event]) -> None:
        """Produce ``events`` and return once all are acknowledged, else raise."""
        failed: list[str] = []
        delivered = 0

        def on_delivery(error: KafkaError | None, _: Message) -> None:
            nonlocal delivered
            if error is None:
                delivered += 1
            else:
                failed.append(error.str())

        for event in events:
            self._producer.produce(
                self._topic, key=event.user_id, value=encode_event(event), on_delivery=on_delivery
            )
        await asyncio.to_thread(self._producer.flush, self._timeout_s)
        if failed or delivered < len(events):
            why = failed[0] if failed else "not acknowledged in time"
            raise SinkUnavailable(f"Kafka did not accept {len(events) - delivered} events: {why}")

    async def close(self) -> None:
        """Deliver what is queued and release the client."""
        await asyncio.to_thread(self._producer.flush, self._timeout_s)
        del self._producer
