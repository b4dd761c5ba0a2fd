"""The crash-loop guard: restarts at one committed offset, counted in that offset's metadata.

It needs nothing but Kafka and survives any restart; after ``ingest_crash_loop_restarts``
the batch's range is replayed one message at a time, and a message that kills ingest alone
is condemned to the dead-letter topic.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Mapping
from typing import Final

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from service.metrics import INGEST_COMMITTED_OFFSET, INGEST_CRASH_LOOP_PARTITIONS

# The source's logger: the guard's lines keep their logger name.
log = logging.getLogger("service.ingest.kafka")

# Deaths of ingest while a message is applied alone before it is dead-lettered: two, so
# one unlucky kill (or a lost assignment) during the replay condemns nothing.
ALONE_CRASHES: Final = 2
_COMMITTED_TIMEOUT_S: Final = 10.0
_METADATA_TAG: Final = "userembed/1"


@dataclasses.dataclass(frozen=True, slots=True)
class Position:
    """The guard's state of one partition, kept in its committed offset's metadata.

    ``attempts``: batches begun at the committed offset (each by a new assignment) that
    never got committed, i.e. ingest died (or lost the partition) each time.
    ``until``: end (exclusive) of the largest such batch. ``careful``: the range
    [offset, until) is being replayed one message at a time; ``tries``: times the
    message at the committed offset was begun alone without completing.
    """

    attempts: int = 0
    until: int = 0
    careful: bool = False
    tries: int = 0

    def encode(self) -> str:
        if self == Position():
            return ""
        words = [_METADATA_TAG, f"attempts={self.attempts}", f"until={self.until}"]
        if self.careful:
            words += ["careful", f"tries={self.tries}"]
        return " ".join(words)

    @classmethod
    def decode(cls, metadata: str | None) -> Position:
        """The position a metadata string describes; anything unrecognised is fresh."""
        words = (metadata or "").split()
        if not words or words[0] != _METADATA_TAG:
            return cls()
        fields = dict(word.split("=", 1) for word in words[1:] if "=" in word)
        try:
            return cls(
                attempts=max(int(fields.get("attempts", 0)), 0),
                until=int(fields.get("until", 0)),
                careful="careful" in words[1:],
                tries=max(int(fields.get("tries", 0)), 0),
            )
        except ValueError:
            return cls()


@dataclasses.dataclass(frozen=True, slots=True)
class Resume:
    """What to do with a partition whose first batch of an assignment has arrived."""

    position: Position  # the guard's state from now on
    record: bool  # commit ``position`` at the batch's first offset before applying it
    dead_letter: bool  # the first message killed ingest ALONE_CRASHES times alone


def resume_at(committed: Position, first: int, batch_end: int, restarts: int, ours: bool) -> Resume:
    """The guard's decision for a partition's first batch after an assignment.

    ``committed`` is what the committed offset's metadata says, ``first`` the batch's
    first offset in that partition and ``batch_end`` one past its last; ``ours`` means
    this (living) process wrote that metadata itself, so no death happened since.
    """
    if ours:
        return Resume(committed, record=False, dead_letter=False)
    if committed.careful and first < committed.until:
        if committed.tries >= ALONE_CRASHES:
            return Resume(committed, record=False, dead_letter=True)
        return Resume(
            dataclasses.replace(committed, tries=committed.tries + 1),
            record=True,
            dead_letter=False,
        )
    if committed.careful:  # past the replayed range (e.g. retention): a fresh start
        committed = Position()
    until = max(committed.until, batch_end)
    if committed.attempts >= restarts:
        return Resume(
            Position(committed.attempts, until, careful=True, tries=1),
            record=True,
            dead_letter=False,
        )
    return Resume(Position(committed.attempts + 1, until), record=True, dead_letter=False)


def crash_loop_reason(position: Position, offset: int) -> str:
    return (
        f"crashed the consumer {position.attempts + position.tries} times: ingest died "
        f"{position.tries} times while applying this message alone at offset {offset}, after "
        f"{position.attempts} restarts of its batch"
    )


class CrashLoopGuard:
    """The guard's state of the owned partitions: their committed offsets and metadata,
    checked at each assignment's first batch, and the replay plan that follows."""

    def __init__(self, consumer: Consumer, topic: str, restarts: int) -> None:
        self._consumer = consumer
        self._topic = topic
        self._restarts = restarts
        self._checked: set[int] = set()  # first batch of the assignment seen
        self._positions: dict[int, Position] = {}
        self._condemned: dict[int, int] = {}  # partition -> offset to dead-letter
        self._written: dict[int, tuple[int, str]] = {}  # our last commit: offset, metadata
        self._committed: dict[int, int] = {}  # next offset per owned partition, as committed

    @property
    def committed(self) -> Mapping[int, int]:
        """The next offset of each owned partition, as committed (a live view)."""
        return self._committed

    def check(self, spans: dict[int, tuple[int, int]]) -> None:
        """Check each newly assigned partition of a fetch, ``spans`` mapping a partition
        to its (first, end) offsets, before any of its messages is handed out."""
        records = [
            record
            for partition, (first, end) in spans.items()
            if partition not in self._checked
            and (record := self._check(partition, first, end)) is not None
        ]
        if records:
            self._record(records)
        self.publish()

    def _check(self, partition: int, first: int, end: int) -> TopicPartition | None:
        """Decide, from the committed offset's metadata, whether the partition is replayed
        one message at a time; return the count of this first batch of the assignment, to
        be committed before the batch is applied (None: nothing to record)."""
        self._checked.add(partition)
        tp = TopicPartition(self._topic, partition)
        try:
            [committed] = self._consumer.committed([tp], timeout=_COMMITTED_TIMEOUT_S)
        except KafkaException as exc:
            log.warning("event=crash_guard_unavailable partition=%d reason=%r", partition, str(exc))
            return None
        metadata = committed.metadata or ""
        # where consumption resumes: the committed offset, or auto.offset.reset's
        start = committed.offset if committed.offset >= 0 else first
        self._committed[partition] = start
        INGEST_COMMITTED_OFFSET.labels(str(partition)).set(start)
        ours = self._written.get(partition) == (committed.offset, metadata)
        resume = resume_at(Position.decode(metadata), first, end, self._restarts, ours)
        position = resume.position
        self._positions[partition] = position
        if resume.dead_letter:
            self._condemned[partition] = first
        if position.careful and resume.record:
            log.error(
                "event=crash_loop_detected partition=%d offset=%d restarts=%d until=%d try=%d: "
                "replaying one message at a time",
                partition,
                first,
                position.attempts,
                position.until,
                position.tries,
            )
        elif position.attempts > 1 and resume.record:
            log.warning(
                "event=restarted_at_same_offset partition=%d offset=%d attempts=%d",
                partition,
                first,
                position.attempts,
            )
        if not resume.record:
            return None
        return TopicPartition(self._topic, partition, first, metadata=position.encode())

    def _record(self, offsets: list[TopicPartition]) -> None:
        """Commit the guard's counts (the offsets themselves do not move), in one call."""
        try:
            committed = self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            partitions = [tp.partition for tp in offsets]
            log.warning(
                "event=crash_guard_unrecorded partitions=%s reason=%r", partitions, str(exc)
            )
            return
        failed = {tp.partition for tp in committed or [] if tp.error is not None}
        for tp in offsets:
            if tp.partition not in failed:
                self._written[tp.partition] = (tp.offset, tp.metadata or "")

    def take(self, buffer: deque[Message]) -> list[Message]:
        """The next batch from ``buffer`` (removed from it): every message of the
        partitions consumed normally, else the first message of a replayed one, alone."""
        careful = {p for p, position in self._positions.items() if position.careful}
        if not careful:
            batch = list(buffer)
            buffer.clear()
            return batch
        normal = [m for m in buffer if m.partition() not in careful]
        if normal:
            kept = [m for m in buffer if m.partition() in careful]
            buffer.clear()
            buffer.extend(kept)
            return normal
        return [buffer.popleft()] if buffer else []

    def condemns(self, partition: int, offset: int) -> str | None:
        """The reason to dead-letter the message at ``offset``, once: it killed ingest
        ALONE_CRASHES times while applied alone (None: apply it)."""
        if self._condemned.get(partition) != offset:
            return None
        del self._condemned[partition]
        reason = crash_loop_reason(self._positions[partition], offset)
        log.error(
            "event=crash_loop_dead_letter partition=%d offset=%d reason=%r",
            partition,
            offset,
            reason,
        )
        return reason

    def after(self, partition: int, offset: int) -> Position:
        """The guard's state once everything before ``offset`` is applied."""
        position = self._positions.get(partition, Position())
        if not position.careful or offset >= position.until:
            return Position()
        return dataclasses.replace(position, tries=1)  # the next message is begun alone

    def committed_to(self, partition: int, offset: int, position: Position) -> None:
        """``offset`` was committed with ``position`` in its metadata."""
        if partition not in self._checked:
            return  # revoked meanwhile
        if self._positions.get(partition, Position()).careful and not position.careful:
            log.warning("event=crash_loop_cleared partition=%d offset=%d", partition, offset)
        self._positions[partition] = position
        self._written[partition] = (offset, position.encode())
        self._committed[partition] = offset
        INGEST_COMMITTED_OFFSET.labels(str(partition)).set(offset)
        self.publish()

    def forget(self, partition: int) -> None:
        """The partition was assigned or revoked: its first batch is checked anew."""
        self._checked.discard(partition)
        self._positions.pop(partition, None)
        self._condemned.pop(partition, None)
        self._committed.pop(partition, None)

    def publish(self) -> None:
        """Set the gauge of partitions being replayed one message at a time."""
        INGEST_CRASH_LOOP_PARTITIONS.set(sum(p.careful for p in self._positions.values()))
