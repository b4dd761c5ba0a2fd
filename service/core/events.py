"""The user-event contract (see DESIGN.md) and its fast typed decoder.

Decoding never raises anything but :class:`EventRejected`, whose ``reason`` is a
sentence a human can act on and whose ``kind`` is one of a small closed set
(:class:`RejectionKind`, the label of the rejection metrics); ingest sends it to the
dead-letter topic and the API returns it in a 4xx body.

Hostile input is bounded before it is parsed (:class:`DecodeLimits`): the message size
by its length, the JSON nesting by a linear pre-scan (msgspec recurses per level and
raises RecursionError near 1,000), and every id by the type (``MAX_ID_LENGTH``). Any
other failure while decoding becomes a rejection of kind ``decoder_error`` whose
reason names the exception, so no message can take a consumer down.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Final, Protocol

import msgspec

from service.core.json_depth import json_depth_problem

USER_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9_.:@-]{1,128}")
USER_ID_RULE: Final = "only [A-Za-z0-9_.:@-], 1..128 chars"

# 2000-01-01T00:00:00Z: anything earlier is a unit mistake (seconds, not ms) or garbage.
MIN_TS_MS: Final = 946_684_800_000
# Producer clocks drift, but an event a day in the future is not drift.
MAX_FUTURE_SKEW_MS: Final = 24 * 3600 * 1000
# event_id, item_id and category (as strings): UUIDs and catalogue keys fit many times over.
MAX_ID_LENGTH: Final = 256
# A reason quotes the input at most this far (an enum error repeats the whole value).
MAX_REASON_CHARS: Final = 1000

Id = Annotated[str, msgspec.Meta(max_length=MAX_ID_LENGTH)]


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

    event_id: Id
    user_id: str
    ts: int
    type: EventType
    item_id: Id | int
    category: Id | int | None = None
    value: float | None = None


class RejectionKind(StrEnum):
    """Why an input was refused, as a closed set (metric label, dead-letter header)."""

    TOO_LARGE = "too_large"  # over DecodeLimits.max_bytes, not parsed at all
    TOO_DEEP = "too_deep"  # JSON nested deeper than DecodeLimits.max_depth, not parsed
    STRING_TOO_LONG = "string_too_long"  # an id over MAX_ID_LENGTH characters
    NOT_JSON = "not_json"  # malformed JSON or invalid UTF-8
    CONTRACT = "contract"  # valid JSON of the wrong shape: missing field, wrong type
    INVALID = "invalid"  # the right shape, a rule broken: user_id, ts range, empty id
    DECODER_ERROR = "decoder_error"  # anything else the decoder raised (a bug to report)


# The rejections that are a bound on the input rather than a rule of the contract.
LIMIT_KINDS: Final = frozenset(
    {RejectionKind.TOO_LARGE, RejectionKind.TOO_DEEP, RejectionKind.STRING_TOO_LONG}
)


class EventRejected(ValueError):
    """A message that does not satisfy the event contract; ``reason`` says why."""

    def __init__(self, reason: str, kind: RejectionKind = RejectionKind.INVALID) -> None:
        if len(reason) > MAX_REASON_CHARS:
            reason = reason[:MAX_REASON_CHARS] + "..."
        super().__init__(reason)
        self.reason = reason
        self.kind = kind


@dataclass(frozen=True, slots=True)
class DecodeLimits:
    """Bounds checked before a message is parsed."""

    max_bytes: int = 64 * 1024
    max_depth: int = 32  # well under msgspec's recursion (about 1,000 levels)


DEFAULT_LIMITS: Final = DecodeLimits()


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


def check_limits(data: bytes, limits: DecodeLimits = DEFAULT_LIMITS) -> None:
    """Raise :class:`EventRejected` if ``data`` is over a bound; cheap, before parsing."""
    if len(data) > limits.max_bytes:
        raise EventRejected(
            f"message is {len(data)} bytes, over the {limits.max_bytes}-byte limit for an "
            "event; not parsed",
            RejectionKind.TOO_LARGE,
        )
    if json_depth_problem(data, limits.max_depth) is not None:
        raise EventRejected(
            f"JSON nests deeper than {limits.max_depth} levels (an event is a flat object); "
            "not parsed",
            RejectionKind.TOO_DEEP,
        )


def _contract_rejection(exc: msgspec.ValidationError) -> EventRejected:
    if "of length <=" in str(exc):
        return EventRejected(
            f"a string is too long: {exc} (ids and categories are at most "
            f"{MAX_ID_LENGTH} characters)",
            RejectionKind.STRING_TOO_LONG,
        )
    return EventRejected(f"event does not match the contract: {exc}", RejectionKind.CONTRACT)


def decode_event(raw: bytes | str, now_ms: int, limits: DecodeLimits = DEFAULT_LIMITS) -> Event:
    """Decode and validate one JSON event; raise :class:`EventRejected` with the reason.

    Nothing else escapes: an unexpected exception (a decoder bug, memory) becomes a
    rejection of kind ``decoder_error`` with the exception's class and message.
    """
    try:
        data = raw.encode() if isinstance(raw, str) else raw
        check_limits(data, limits)
        return validate_event(_decoder.decode(data), now_ms)
    except EventRejected:
        raise
    except msgspec.ValidationError as exc:
        raise _contract_rejection(exc) from None
    except msgspec.DecodeError as exc:
        raise EventRejected(f"not valid JSON: {exc}", RejectionKind.NOT_JSON) from None
    except UnicodeError as exc:
        raise EventRejected(f"not valid UTF-8 text: {exc}", RejectionKind.NOT_JSON) from None
    except Exception as exc:  # the contract: only EventRejected escapes
        raise EventRejected(f"{type(exc).__name__}: {exc}", RejectionKind.DECODER_ERROR) from exc


def convert_event(obj: object, now_ms: int) -> Event:
    """Validate one already-parsed JSON value (e.g. an element of a request's array)."""
    try:
        event = msgspec.convert(obj, Event)
    except msgspec.ValidationError as exc:
        raise _contract_rejection(exc) from None
    return validate_event(event, now_ms)


def encode_event(event: Event) -> bytes:
    """JSON bytes for one event (what producers put on the wire)."""
    return msgspec.json.encode(event)


class EventSink(Protocol):
    """Where accepted events go (Kafka in production, the in-process source in the demo)."""

    async def send(self, events: Sequence[Event]) -> None:
        """Return once ``events`` are durably accepted; raise otherwise."""
