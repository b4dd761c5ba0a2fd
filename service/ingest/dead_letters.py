"""Dead letters: the records of rejected messages, and their delivery to ``<topic>.dlq``.

A record is cut to what the dead-letter topic accepts; until every dead letter is
acknowledged the source commits nothing and consumes nothing (the DLQ is blocked).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import functools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from service.core.events import RejectionKind
from service.ingest.updater import SourceUnavailable
from service.metrics import (
    INGEST_DEAD_LETTERS,
    INGEST_DEAD_LETTERS_TRUNCATED,
    INGEST_DLQ_BLOCKED,
    INGEST_EVENTS,
)
from service.settings import Settings

# The source's logger: its dead-letter lines keep their logger name.
log = logging.getLogger("service.ingest.kafka")

_TOO_LARGE: Final = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE}

DLQ_REASON_HEADER: Final = "userembed.reason"
DLQ_REASON_CLASS_HEADER: Final = "userembed.reason_class"
DLQ_TRUNCATED_HEADER: Final = "userembed.truncated"
DLQ_ORIGINAL_SIZE_HEADER: Final = "userembed.original_size"
# The reason class of a message that killed ingest while it was applied alone.
CRASH_LOOP: Final = "crash_loop"
DEAD_LETTER_CLASSES: Final = (*(kind.value for kind in RejectionKind), CRASH_LOOP)
# Room kept in a dead-letter record for the record's framing and our own extra headers.
_RECORD_OVERHEAD: Final = 512
_MIN_DLQ_RECORD: Final = 1024


class _Delivery(enum.Enum):
    PENDING = "pending"  # to produce now
    IN_FLIGHT = "in_flight"  # produced, waiting for the acknowledgement
    DONE = "done"  # acknowledged by the dead-letter topic
    FAILED = "failed"  # refused or timed out: produced again by the next attempt


@dataclasses.dataclass(eq=False, slots=True)
class _DeadLetter:
    message: Message
    reason: str
    kind: str  # one of DEAD_LETTER_CLASSES
    budget: int  # the largest record to produce (halved when the broker refuses a size)
    state: _Delivery = _Delivery.PENDING
    error: str = ""
    truncated: bool = False


Header = tuple[str, str | bytes | None]


def _header_bytes(headers: Sequence[Header]) -> int:
    return sum(len(name.encode()) + len(value or b"") + 8 for name, value in headers)


def dead_letter_record(
    message: Message, reason: str, kind: str, max_bytes: int
) -> tuple[bytes | None, bytes | None, list[Header], bool]:
    """(value, key, headers, truncated) of the dead letter of ``message``: its key,
    headers and value, then ours; cut to fit ``max_bytes`` where it has to (value first,
    then the original headers and key if those alone are too big), saying so."""
    value, key = message.value(), message.key()
    headers = message.headers() or []
    original: list[Header] = list(headers.items() if isinstance(headers, dict) else headers)
    ours: list[Header] = [
        (DLQ_REASON_HEADER, reason.encode()),
        (DLQ_REASON_CLASS_HEADER, kind.encode()),
        ("userembed.topic", (message.topic() or "").encode()),
        ("userembed.partition", str(message.partition()).encode()),
        ("userembed.offset", str(message.offset()).encode()),
    ]
    room = max_bytes - _RECORD_OVERHEAD - _header_bytes(ours)
    extra: list[Header] = []
    if _header_bytes(original) > room // 4:
        extra.append(("userembed.headers_dropped", str(len(original)).encode()))
        original = []
    if key is not None and len(key) > room // 4:
        extra.append(("userembed.original_key_size", str(len(key)).encode()))
        key = key[: room // 4]
    room -= _header_bytes(original) + len(key or b"")
    if extra or (value is not None and len(value) > room):
        extra += [
            (DLQ_TRUNCATED_HEADER, b"1"),
            (DLQ_ORIGINAL_SIZE_HEADER, str(len(value or b"")).encode()),
        ]
        value = None if value is None else value[: max(room, 0)]
    return value, key, [*original, *ours, *extra], bool(extra)


class DeadLetterQueue:
    """The dead letters of the batches not yet committed, and the producer that writes
    them to the dead-letter topic (at least once)."""

    def __init__(
        self,
        settings: Settings,
        common: dict[str, Any],
        on_error: Callable[[KafkaError], None],
    ) -> None:
        self._topic = settings.kafka_dlq_topic
        self._timeout_s = settings.ingest_dlq_timeout_ms / 1000
        config: dict[str, Any] = {
            **common,
            "linger.ms": 5,
            "acks": "all",
            "message.max.bytes": settings.ingest_dlq_max_message_bytes,
            "message.timeout.ms": settings.ingest_dlq_timeout_ms,
            **settings.kafka_dlq_extra,
            "error_cb": on_error,
        }
        self._max_bytes = int(config["message.max.bytes"])
        self._producer = Producer(config)
        self._letters: list[_DeadLetter] = []
        self._blocked_since: float | None = None
        for reason in DEAD_LETTER_CLASSES:
            INGEST_DEAD_LETTERS.labels(reason)

    @property
    def pending(self) -> bool:
        """Dead letters are waiting to be written."""
        return bool(self._letters)

    def add(self, message: Message, reason: str, kind: str) -> None:
        self._letters.append(_DeadLetter(message, reason, kind, self._max_bytes))

    def send(self) -> None:
        """Produce every pending dead letter and wait for acknowledgement (at least once).

        Each is produced once per attempt at most; an acknowledged one is never produced
        again, one refused for its size is cut further and produced again at once. What
        is still unacknowledged after ``ingest_dlq_timeout_ms`` raises
        :class:`SourceUnavailable`, so nothing is committed and the loop retries.
        """
        letters = self._letters
        for letter in letters:
            if letter.state is _Delivery.FAILED:
                letter.state = _Delivery.PENDING
        deadline = time.monotonic() + self._timeout_s
        while True:
            for letter in letters:
                if letter.state is _Delivery.PENDING and not self._produce(letter):
                    break  # the local queue is full: wait for deliveries first
            waiting = [x for x in letters if x.state in (_Delivery.PENDING, _Delivery.IN_FLIGHT)]
            remaining = deadline - time.monotonic()
            if not waiting or remaining <= 0:
                break
            self._producer.flush(remaining)
        for letter in letters:
            if letter.state is not _Delivery.DONE:
                continue
            INGEST_EVENTS.labels("dead_lettered").inc()
            INGEST_DEAD_LETTERS.labels(letter.kind).inc()
            if letter.truncated:
                INGEST_DEAD_LETTERS_TRUNCATED.inc()
            log.info(
                "event=dead_lettered partition=%d offset=%d class=%s truncated=%s reason=%r",
                letter.message.partition(),
                letter.message.offset(),
                letter.kind,
                letter.truncated,
                letter.reason,
            )
        self._letters = [x for x in letters if x.state is not _Delivery.DONE]
        if self._letters:
            errors = [x.error for x in self._letters if x.error]
            why = errors[0] if errors else f"not acknowledged within {self._timeout_s:g} s"
            if self._blocked_since is None:
                self._blocked_since = time.monotonic()
            INGEST_DLQ_BLOCKED.set(1)
            log.error(
                "event=dlq_blocked topic=%s pending=%d blocked_s=%.1f reason=%r: not committing "
                "or consuming until the dead letters are written",
                self._topic,
                len(self._letters),
                time.monotonic() - self._blocked_since,
                why,
            )
            raise SourceUnavailable(
                f"dead-letter topic {self._topic}: {len(self._letters)} not written ({why})"
            )
        if self._blocked_since is not None:
            log.warning(
                "event=dlq_unblocked topic=%s blocked_s=%.1f",
                self._topic,
                time.monotonic() - self._blocked_since,
            )
            self._blocked_since = None
        INGEST_DLQ_BLOCKED.set(0)

    def _produce(self, letter: _DeadLetter) -> bool:
        """Hand ``letter`` to the producer; False when its local queue is full."""
        while True:
            value, key, headers, letter.truncated = dead_letter_record(
                letter.message, letter.reason, letter.kind, letter.budget
            )
            try:
                self._producer.produce(
                    self._topic,
                    value=value,
                    key=key,
                    headers=headers,
                    on_delivery=functools.partial(self._on_delivery, letter),
                )
            except BufferError:
                return False
            except KafkaException as exc:
                error = exc.args[0]
                if error.code() in _TOO_LARGE and _shrink(letter):
                    continue
                letter.state, letter.error = _Delivery.FAILED, error.str()
                return True
            except Exception as exc:  # never fatal: retried, and visible
                letter.state, letter.error = _Delivery.FAILED, f"{type(exc).__name__}: {exc}"
                return True
            letter.state = _Delivery.IN_FLIGHT
            return True

    @staticmethod
    def _on_delivery(letter: _DeadLetter, error: KafkaError | None, _: Message) -> None:
        if error is None:
            letter.state = _Delivery.DONE
        elif error.code() in _TOO_LARGE and _shrink(letter):
            letter.state = _Delivery.PENDING
        else:
            letter.state, letter.error = _Delivery.FAILED, error.str()

    async def close(self) -> None:
        """Deliver what is queued and release the producer."""
        await asyncio.to_thread(self._producer.flush, 5.0)
        del self._producer


def _shrink(letter: _DeadLetter) -> bool:
    """Halve a dead letter's size budget after a size refusal; False at the floor."""
    if letter.budget // 2 < _MIN_DLQ_RECORD:
        return False
    letter.budget //= 2
    return True
