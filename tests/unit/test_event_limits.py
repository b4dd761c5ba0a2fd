"""The decoder's bounds on hostile input (size, nesting, string lengths), the catch-all
that keeps any decoder failure a rejection, and the Kafka source's pure parts: the
crash-loop guard's metadata and decisions, and the dead-letter record's truncation."""

from __future__ import annotations

from typing import Any, cast

import msgspec
import pytest
from confluent_kafka import Message
from hypothesis import example, given
from hypothesis import strategies as st

from service.core import events as events_module
from service.core.events import (
    MAX_ID_LENGTH,
    MAX_REASON_CHARS,
    DecodeLimits,
    EventRejected,
    RejectionKind,
    convert_event,
    decode_event,
)
from service.core.json_depth import json_depth_problem
from service.ingest.crash_loop import ALONE_CRASHES, Position, crash_loop_reason, resume_at
from service.ingest.dead_letters import (
    DEAD_LETTER_CLASSES,
    DLQ_ORIGINAL_SIZE_HEADER,
    DLQ_REASON_CLASS_HEADER,
    DLQ_REASON_HEADER,
    DLQ_TRUNCATED_HEADER,
    dead_letter_record,
)
from tests.helpers import BASE_TS
from tests.helpers import raw_event as raw

NOW = BASE_TS


def exceeds(data: bytes, max_depth: int) -> bool:
    return json_depth_problem(data, max_depth) is not None


def rejection(data: bytes | str, limits: DecodeLimits | None = None) -> EventRejected:
    with pytest.raises(EventRejected) as info:
        decode_event(data, NOW, limits or DecodeLimits())
    return info.value


def nested(depth: int, inner: bytes = b"") -> bytes:
    return b"[" * depth + inner + b"]" * depth


# --- size -------------------------------------------------------------------------------------


def test_a_message_over_the_size_limit_is_refused_unparsed() -> None:
    huge = b"{" * (1 << 20)  # also absurdly deep: size is checked first, by length alone
    rejected = rejection(huge)
    assert rejected.kind is RejectionKind.TOO_LARGE
    assert rejected.reason == (
        "message is 1048576 bytes, over the 65536-byte limit for an event; not parsed"
    )


def test_the_size_limit_is_inclusive_and_configurable() -> None:
    event = raw(padding="x" * 100)
    assert decode_event(event, NOW, DecodeLimits(max_bytes=len(event))).event_id == "e1"
    assert rejection(event, DecodeLimits(max_bytes=len(event) - 1)).kind is RejectionKind.TOO_LARGE


# --- depth ------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [33, 1_000, 10_000, 60_000])
def test_deep_nesting_is_refused_before_msgspec_recurses(depth: int) -> None:
    data = b'{"event_id": "e", "x": ' + nested(depth) + b"}"
    limits = DecodeLimits(max_bytes=1 << 20)
    rejected = rejection(data, limits)
    assert rejected.kind is RejectionKind.TOO_DEEP
    assert "nests deeper than 32 levels" in rejected.reason


def test_msgspec_alone_would_recurse_out_on_the_issues_message() -> None:
    """Why the pre-scan exists (and why the catch-all matters if a bound is raised)."""
    with pytest.raises(RecursionError):
        msgspec.json.decode(nested(10_000))


def test_nesting_up_to_the_limit_is_parsed() -> None:
    event = raw(extra=msgspec.json.decode(nested(31)))  # 31 arrays inside the event object
    assert decode_event(event, NOW).event_id == "e1"
    too_deep = raw(extra=msgspec.json.decode(nested(32)))
    assert rejection(too_deep).kind is RejectionKind.TOO_DEEP


def test_brackets_inside_strings_do_not_count() -> None:
    assert decode_event(raw(note="[" * 5000 + "{" * 5000), NOW).event_id == "e1"
    assert decode_event(raw(note='\\"[[[[' * 100), NOW).event_id == "e1"
    assert not exceeds(b'["' + b"[" * 100 + b'"]', 2)
    assert not exceeds(b'["\\"' + b"[" * 100 + b'"]', 2)  # an escaped quote
    assert exceeds(b'["\\\\"' + b"[" * 100 + b'"]', 2)  # an escaped backslash


def test_the_depth_scan_reads_pathological_strings_right() -> None:
    """Unterminated strings full of escaped quotes (which made a naive regex quadratic)."""
    hostile = b"[" * 40 + b'"' + b'\\"' * 30_000
    assert exceeds(hostile, 32)
    assert exceeds(b'["' * 30_000, 32)  # [ "[" [ "[" ...: 15,000 deep


def reference_depth(data: bytes) -> int:
    """The deepest nesting a JSON parser would reach, by a plain state machine; like a
    parser, it stops at a backslash outside a string (no JSON text goes on from there)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == ord("\\"):
                escaped = True
            elif byte == ord('"'):
                in_string = False
        elif byte == ord('"'):
            in_string = True
        elif byte == ord("\\"):
            break
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


@given(st.lists(st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b"a", b","]), max_size=80))
@example([b"\\", b'"', b'"', b"[", b"["])  # an escape outside a string: a parser stops there
def test_the_depth_scan_agrees_with_a_state_machine(tokens: list[bytes]) -> None:
    data = b"".join(tokens)
    for limit in (1, 2, 3, 5):
        if reference_depth(data) > limit:  # never says shallow when it is deep
            assert exceeds(data, limit), (data, limit)


@given(st.recursive(st.none() | st.integers() | st.text(), lambda c: st.lists(c, max_size=3)))
def test_the_depth_scan_is_exact_on_valid_json(value: object) -> None:
    data = msgspec.json.encode(value)
    depth = reference_depth(data)
    assert exceeds(data, depth) is False
    if depth:
        assert exceeds(data, depth - 1) is True


# --- string lengths ----------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["event_id", "item_id", "category"])
def test_ids_longer_than_the_limit_are_refused_with_the_field(field: str) -> None:
    assert decode_event(raw(**{field: "x" * MAX_ID_LENGTH}), NOW)
    rejected = rejection(raw(**{field: "x" * (MAX_ID_LENGTH + 1)}))
    assert rejected.kind is RejectionKind.STRING_TOO_LONG
    assert f"at `$.{field}`" in rejected.reason and "at most 256 characters" in rejected.reason


def test_the_string_limit_holds_for_already_parsed_events_too() -> None:
    """POST /v1/events validates parsed JSON: same contract, same reason."""
    event = msgspec.json.decode(raw(item_id="y" * 300))
    with pytest.raises(EventRejected) as info:
        convert_event(event, NOW)
    assert info.value.kind is RejectionKind.STRING_TOO_LONG


def test_the_limits_are_stated_in_the_json_schema() -> None:
    schema = msgspec.json.schema(events_module.Event)["$defs"]["Event"]["properties"]
    assert schema["event_id"]["maxLength"] == MAX_ID_LENGTH
    assert {"type": "string", "maxLength": MAX_ID_LENGTH} in schema["category"]["anyOf"]


def test_reasons_are_bounded_even_when_they_quote_the_input() -> None:
    rejected = rejection(raw(type="t" * 50_000))
    assert rejected.kind is RejectionKind.CONTRACT
    assert len(rejected.reason) <= MAX_REASON_CHARS + 3


# --- every other failure is a rejection ---------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"\xff\xfe", RejectionKind.NOT_JSON),
        (b'{"event_id": "\xff"}', RejectionKind.NOT_JSON),
        ('"\ud800"', RejectionKind.NOT_JSON),  # a str with a lone surrogate
        (b"", RejectionKind.NOT_JSON),
        (b"[]", RejectionKind.CONTRACT),
        (raw(ts=True), RejectionKind.CONTRACT),
        (raw()[:-1] + b', "value": 1e400}', RejectionKind.CONTRACT),
        (raw()[:-1] + b', "item_id": ' + b"9" * 5000 + b"}", RejectionKind.CONTRACT),
        (raw(user_id="bad id"), RejectionKind.INVALID),
        (raw(ts=1), RejectionKind.INVALID),
    ],
)
def test_each_kind_of_bad_input_has_its_class(data: bytes | str, kind: RejectionKind) -> None:
    rejected = rejection(data)
    assert rejected.kind is kind and rejected.reason


def test_an_unexpected_decoder_failure_is_a_rejection_naming_the_exception(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Exploding:
        def decode(self, _: bytes) -> Any:
            raise MemoryError("cannot allocate 12 GB")

    monkeypatch.setattr(events_module, "_decoder", Exploding())
    rejected = rejection(raw())
    assert rejected.kind is RejectionKind.DECODER_ERROR
    assert rejected.reason == "MemoryError: cannot allocate 12 GB"


def test_recursion_past_a_raised_depth_limit_is_still_only_a_rejection() -> None:
    rejected = rejection(b'{"x": ' + nested(5_000) + b"}", DecodeLimits(10**6, max_depth=10**6))
    assert rejected.kind is RejectionKind.DECODER_ERROR
    assert rejected.reason.startswith("RecursionError: ")


def test_the_dead_letter_classes_are_a_closed_set() -> None:
    assert set(DEAD_LETTER_CLASSES) == {k.value for k in RejectionKind} | {"crash_loop"}


# --- crash-loop guard ----------------------------------------------------------------------------


@given(
    st.builds(
        Position,
        attempts=st.integers(0, 10**6),
        until=st.integers(0, 2**62),
        careful=st.booleans(),
        tries=st.integers(0, 9),
    )
)
def test_positions_round_trip_through_commit_metadata(position: Position) -> None:
    if not position.careful:
        position = Position(position.attempts, position.until)
    assert Position.decode(position.encode()) == position
    assert len(position.encode()) < 100  # far below the brokers' 4096-byte metadata limit


@pytest.mark.parametrize("metadata", [None, "", "something else", "userembed/1 attempts=x"])
def test_foreign_or_broken_metadata_reads_as_a_fresh_position(metadata: str | None) -> None:
    assert Position.decode(metadata) == Position()
    assert Position().encode() == ""


def test_each_restart_at_the_same_offset_is_counted() -> None:
    first = resume_at(Position(), first=100, batch_end=300, restarts=3, ours=False)
    assert first.position == Position(1, 300) and first.record and not first.dead_letter
    again = resume_at(first.position, first=100, batch_end=250, restarts=3, ours=False)
    assert again.position == Position(2, 300)  # the largest batch seen is remembered


def test_a_living_process_taking_its_own_partition_back_counts_nothing() -> None:
    resume = resume_at(Position(2, 300), first=100, batch_end=300, restarts=3, ours=True)
    assert resume.position == Position(2, 300) and not resume.record


def test_after_n_restarts_the_batch_is_replayed_one_message_at_a_time() -> None:
    resume = resume_at(Position(3, 300), first=100, batch_end=200, restarts=3, ours=False)
    assert resume.position == Position(3, 300, careful=True, tries=1)
    assert resume.record and not resume.dead_letter


def test_a_message_that_dies_alone_twice_is_dead_lettered() -> None:
    careful = Position(3, 300, careful=True, tries=1)
    retry = resume_at(careful, first=150, batch_end=400, restarts=3, ours=False)
    assert retry.position.tries == 2 and retry.record and not retry.dead_letter
    condemned = resume_at(retry.position, first=150, batch_end=400, restarts=3, ours=False)
    assert condemned.dead_letter and not condemned.record
    assert ALONE_CRASHES == 2
    reason = crash_loop_reason(condemned.position, 150)
    assert reason.startswith("crashed the consumer 5 times")
    assert "at offset 150" in reason


def test_a_replay_past_its_range_starts_afresh() -> None:
    resume = resume_at(Position(3, 300, careful=True, tries=2), 300, 500, restarts=3, ours=False)
    assert resume.position == Position(1, 500) and not resume.dead_letter


# --- dead-letter records -------------------------------------------------------------------------


class FakeMessage:
    """What dead_letter_record reads of a consumed message."""

    def __init__(self, value: bytes | None, key: bytes | None, headers: Any = None) -> None:
        self._value, self._key, self._headers = value, key, headers

    def value(self) -> bytes | None:
        return self._value

    def key(self) -> bytes | None:
        return self._key

    def headers(self) -> Any:
        return self._headers

    def topic(self) -> str:
        return "events"

    def partition(self) -> int:
        return 3

    def offset(self) -> int:
        return 41


def record(message: FakeMessage, max_bytes: int) -> tuple[Any, Any, dict[str, Any], bool]:
    value, key, headers, truncated = dead_letter_record(
        cast(Message, message), "too big", "too_large", max_bytes
    )
    return value, key, dict(headers), truncated


def record_size(value: bytes | None, key: bytes | None, headers: dict[str, Any]) -> int:
    return (
        len(value or b"")
        + len(key or b"")
        + sum(len(k) + len(v or b"") for k, v in headers.items())
    )


def test_a_message_that_fits_is_dead_lettered_whole_with_its_headers() -> None:
    message = FakeMessage(b"x" * 1000, b"u1", [("trace", b"t1")])
    value, key, headers, truncated = record(message, 1_000_000)
    assert (value, key, truncated) == (b"x" * 1000, b"u1", False)
    assert headers["trace"] == b"t1" and headers[DLQ_REASON_HEADER] == b"too big"
    assert headers[DLQ_REASON_CLASS_HEADER] == b"too_large"
    assert headers["userembed.offset"] == b"41" and DLQ_TRUNCATED_HEADER not in headers


def test_a_message_too_big_for_the_dlq_keeps_key_headers_and_a_prefix() -> None:
    original = bytes(range(256)) * 4096  # 1 MiB
    message = FakeMessage(original, b"u1", [("trace", b"t1")])
    value, key, headers, truncated = record(message, 1_000_000)
    assert truncated and key == b"u1" and headers["trace"] == b"t1"
    assert headers[DLQ_TRUNCATED_HEADER] == b"1"
    assert headers[DLQ_ORIGINAL_SIZE_HEADER] == str(len(original)).encode()
    assert original.startswith(value) and len(value) > 990_000
    assert record_size(value, key, headers) < 1_000_000 - 200


def test_oversized_keys_and_headers_are_cut_too_and_said_so() -> None:
    message = FakeMessage(b"v", b"k" * 50_000, [("h", b"y" * 50_000)])
    value, key, headers, truncated = record(message, 20_000)
    assert truncated and value == b"v"
    assert headers["userembed.headers_dropped"] == b"1" and "h" not in headers
    assert headers["userembed.original_key_size"] == b"50000" and len(key) < 5_000
    assert record_size(value, key, headers) < 20_000


def test_a_tombstone_is_dead_lettered_as_one() -> None:
    value, key, _, truncated = record(FakeMessage(None, None), 10_000)
    assert value is None and key is None and not truncated


@given(
    value=st.one_of(st.none(), st.binary(max_size=5000)),
    key=st.one_of(st.none(), st.binary(max_size=3000)),
    headers=st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=2000)), max_size=4),
    max_bytes=st.integers(2048, 8000),
)
def test_every_dead_letter_fits_its_budget(
    value: bytes | None, key: bytes | None, headers: list[tuple[str, bytes]], max_bytes: int
) -> None:
    out_value, out_key, out_headers, _ = dead_letter_record(
        cast(Message, FakeMessage(value, key, headers)), "r", "not_json", max_bytes
    )
    size = len(out_value or b"") + len(out_key or b"")
    size += sum(len(k.encode()) + len(v or b"") for k, v in out_headers)
    assert size <= max_bytes - 100
    if value is not None and out_value is not None:
        assert value.startswith(out_value)
