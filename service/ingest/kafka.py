"""Kafka implementations of the event seams (confluent-kafka / librdkafka): the source
decodes, dead-letters rejects and commits only once a batch is durable in the store, so no
input can stop it (docs/failures.md); the sink produces and waits for acknowledgement."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Final

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition

from service.core.clock import Clock, now_ms
from service.core.events import (
    DecodeLimits,
    Event,
    EventRejected,
    RejectionKind,
    SourcedEvent,
    decode_event,
    encode_event,
)
from service.ingest.crash_loop import CrashLoopGuard
from service.ingest.dead_letters import CRASH_LOOP, DeadLetterQueue
from service.ingest.lag_watch import LagWatch, statistics_config
from service.ingest.updater import SourceUnavailable
from service.metrics import (
    INGEST_COMMITTED_OFFSET,
    INGEST_DECODER_REJECTIONS,
    INGEST_EVENTS,
    INGEST_LAG,
    INGEST_LAST_COMMIT,
    INGEST_REBALANCES,
)
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
_LIMIT_LABELS: Final = {
    RejectionKind.TOO_LARGE: "size",
    RejectionKind.TOO_DEEP: "depth",
    RejectionKind.STRING_TOO_LONG: "string_length",
}


class SinkUnavailable(RuntimeError):
    """Events could not be handed to Kafka (not acknowledged in time)."""


class KafkaEventSource:
    """Consumer-group source with a dead-letter topic and manual, post-write commits.

    Rebalances need no special draining: librdkafka runs the revoke callback only
    inside ``consume``, and the consume loop calls ``consume`` only after the previous
    batch was applied and committed and every message consumed was handed out, so no
    batch is ever in flight at a revoke.
    """

    def __init__(self, settings: Settings, clock: Clock = now_ms) -> None:
        common: dict[str, Any] = settings.kafka_client_config()
        self._topic = settings.kafka_topic
        self._clock = clock
        self._limits = DecodeLimits(
            settings.ingest_max_message_bytes, settings.ingest_max_json_depth
        )
        self._consumer = Consumer(
            {
                **common,
                "group.id": settings.kafka_group,
                "enable.auto.commit": False,
                "auto.offset.reset": "earliest",
                **statistics_config(self._topic),
                "error_cb": _log_client_error,
            }
        )
        self._dead_letters = DeadLetterQueue(settings, common, on_error=_log_client_error)
        self._guard = CrashLoopGuard(
            self._consumer, self._topic, settings.ingest_crash_loop_restarts
        )
        self._consumer.subscribe(
            [self._topic], on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        self._next_offsets: dict[int, int] = {}
        # consumed, not yet handed out (a replayed partition's messages go one at a time)
        self._buffer: deque[Message] = deque()
        for limit in _LIMIT_LABELS.values():
            INGEST_DECODER_REJECTIONS.labels(limit)
        # Lag while the loop is stuck (no consume, so no statistics callback either).
        self._lag = LagWatch(self._consumer, self._topic, self._guard.committed)

    async def next_batch(self, max_events: int, timeout_s: float) -> list[SourcedEvent]:
        if not self._buffer:
            self._buffer.extend(await asyncio.to_thread(self._fetch, max_events, timeout_s))
        return self._decode(self._guard.take(self._buffer))

    def _fetch(self, max_events: int, timeout_s: float) -> list[Message]:
        """Consume up to ``max_events`` messages; check each newly assigned partition
        against the crash-loop guard before any of its messages is handed out."""
        with self._lag.polling():
            messages = self._consumer.consume(max_events, timeout_s)
        good: list[Message] = []
        spans: dict[int, tuple[int, int]] = {}
        for message in messages:
            error = message.error()
            if error is not None:
                log.warning("event=kafka_consume_error reason=%r", error.str())
                continue
            good.append(message)
            # a message without an error always has its position
            partition, offset = int(message.partition() or 0), int(message.offset() or 0)
            first, _ = spans.get(partition, (offset, offset))
            spans[partition] = (first, offset + 1)
        self._guard.check(spans)
        return good

    def _decode(self, messages: list[Message]) -> list[SourcedEvent]:
        now = self._clock()
        good: list[SourcedEvent] = []
        for message in messages:
            partition, offset = int(message.partition() or 0), int(message.offset() or 0)
            self._next_offsets[partition] = max(self._next_offsets.get(partition, 0), offset + 1)
            if (reason := self._guard.condemns(partition, offset)) is not None:
                self._dead_letters.add(message, reason, CRASH_LOOP)
                continue
            try:
                event = decode_event(message.value() or b"", now, self._limits)
            except EventRejected as rejected:
                if rejected.kind in _LIMIT_LABELS:
                    INGEST_DECODER_REJECTIONS.labels(_LIMIT_LABELS[rejected.kind]).inc()
                self._dead_letters.add(message, rejected.reason, rejected.kind.value)
                continue
            except Exception as exc:  # decode_event promises not; never fatal
                kind = RejectionKind.DECODER_ERROR.value
                self._dead_letters.add(message, f"{type(exc).__name__}: {exc}", kind)
                continue
            good.append(SourcedEvent(event, partition, offset))
        INGEST_EVENTS.labels("consumed").inc(len(messages))
        return good

    async def commit(self) -> None:
        """Make dead letters durable, then commit the offsets of everything consumed."""
        if self._dead_letters.pending:
            await asyncio.to_thread(self._dead_letters.send)
        if not self._next_offsets:
            return
        positions = {p: self._guard.after(p, o) for p, o in self._next_offsets.items()}
        offsets = [
            TopicPartition(self._topic, p, o, metadata=positions[p].encode())
            for p, o in self._next_offsets.items()
        ]
        try:
            await asyncio.to_thread(self._consumer.commit, offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() not in _LOST_OWNERSHIP:
                raise SourceUnavailable(f"offset commit failed: {error.str()}") from exc
            log.warning("event=commit_after_revoke partitions=%s", sorted(self._next_offsets))
        else:
            for partition, offset in self._next_offsets.items():
                self._guard.committed_to(partition, offset, positions[partition])
        self._next_offsets.clear()
        INGEST_LAST_COMMIT.set(time.time())

    def _on_assign(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        INGEST_REBALANCES.labels("assign").inc()
        for p in partitions:
            self._guard.forget(p.partition)
        log.info("event=partitions_assigned partitions=%s", [p.partition for p in partitions])

    def _on_revoke(self, _: Consumer, partitions: list[TopicPartition]) -> None:
        INGEST_REBALANCES.labels("revoke").inc()
        revoked = {p.partition for p in partitions}
        for p in revoked:
            self._guard.forget(p)
            for gauge in (INGEST_LAG, INGEST_COMMITTED_OFFSET):
                with contextlib.suppress(KeyError):
                    gauge.remove(str(p))
        self._buffer = deque(m for m in self._buffer if m.partition() not in revoked)
        self._guard.publish()
        log.info("event=partitions_revoked partitions=%s", [p.partition for p in partitions])

    async def close(self) -> None:
        """Leave the group and release the clients (no background reconnects after this)."""
        await self._lag.close()
        await asyncio.to_thread(self._consumer.close)
        await self._dead_letters.close()


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
