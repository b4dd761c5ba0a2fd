"""The user-event contract (see DESIGN.md) and its fast typed decoder.

Decoding never raises anything but :class:`EventRejected`, whose ``reason`` is a
sentence a human can act on; ingest sends it to the dead-letter topic and the API
returns it in a 4xx body.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import StrEnum
from typing import Final, Protocol

import msgspec

USER_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
USER_ID_RULE: Final = "only [A-Za-z0-9_.:@-], 1..128 chars"

# 2000-01-01T00:00:00Z: anything earlier is a unit mistake (seconds, not ms) or garbage.
MIN_TS_MS: Final = 946_684_800_000
# Producer clocks drift, but an event a day in the future is not drift.
MAX_FUTURE_SKEW_MS: Final = 24 * 3600 * 1000


class EventType(StrEnum):
    """Closed set of event types; the position is the type's code in feature state."""

    VIEW = "view"
    CLICK = "click"
    LIKE = "like"
    SHARE = "share"
    PURCHASE = "purchase"
    SEARCH = "search"
    ADD_TO_CART = "add_to_cart"
    HIDE = "hide"

    @property
    def code(self) -> int:
        return _TYPE_CODES[self]


_TYPE_CODES: Final = {t: i for i, t in enumerate(EventType)}
NUM_EVENT_TYPES: Final = len(EventType)


class Event(msgspec.Struct, frozen=True):
    """One user event as it travels on the wire (JSON). Unknown fields are ignored."""

    event_id: str
    user_id: str
    ts: int
    type: EventType
    item_id: str | int
    category: str | int | None = None
    value: float | None = None


class EventRejected(ValueError):
    """A message that does not satisfy the event contract; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class SourcedEvent(msgspec.Struct, frozen=True):
    """An event with the log position it was read from (partition, offset)."""

    event: Event
    partition: int
    offset: int


_decoder: Final = msgspec.json.Decoder(Event)


def user_id_problem(user_id: str) -> str | None:
    """Return why ``user_id`` is invalid, or None when it is valid."""
    if USER_ID_PATTERN.fullmatch(user_id) is None:
        shown = user_id if len(user_id) <= 40 else user_id[:40] + "..."
        return f"invalid user_id {shown!r}: {USER_ID_RULE}"
    return None


def validate_event(event: Event, now_ms: int) -> Event:
    """Check the rules a type cannot express; raise :class:`EventRejected` otherwise."""
    problem = user_id_problem(event.user_id)
    if problem is not None:
        raise EventRejected(problem)
    if not event.event_id:
        raise EventRejected("empty event_id: every event needs a unique id")
    if event.ts < MIN_TS_MS:
        raise EventRejected(
            f"absurd ts {event.ts}: before 2000-01-01; ts is epoch milliseconds, not seconds"
        )
    if event.ts > now_ms + MAX_FUTURE_SKEW_MS:
        raise EventRejected(f"absurd ts {event.ts}: more than a day in the future (now={now_ms})")
    if isinstance(event.item_id, str) and not event.item_id:
        raise EventRejected("empty item_id")
    return event


def decode_event(raw: bytes | str, now_ms: int) -> Event:
    """Decode and validate one JSON event; raise :class:`EventRejected` with the reason."""
    try:
        event = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        raise EventRejected(f"event does not match the contract: {exc}") from None
    except msgspec.DecodeError as exc:
        raise EventRejected(f"not valid JSON: {exc}") from None
    return validate_event(event, now_ms)


def convert_event(obj: object, now_ms: int) -> Event:
    """Validate one already-parsed JSON value (e.g. an element of a request's array)."""
    try:
        event = msgspec.convert(obj, Event)
    except msgspec.ValidationError as exc:
        raise EventRejected(f"event does not match the contract: {exc}") from None
    return validate_event(event, now_ms)


def encode_event(event: Event) -> bytes:
    """JSON bytes for one event (what producers put on the wire)."""
    return msgspec.json.encode(event)


class EventSink(Protocol):
    """Where accepted events go (Kafka in production, the in-process source in the demo)."""

    async def send(self, events: Sequence[Event]) -> None:
        """Return once ``events`` are durably accepted; raise otherwise."""
