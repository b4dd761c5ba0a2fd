from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.events import (
    MAX_REASON_CHARS,
    MIN_TS_MS,
    USER_ID_RULE,
    Event,
    EventRejected,
    EventType,
    RejectionKind,
    check_limits,
    convert_event,
    decode_event,
    encode_event,
    user_id_problem,
)
from service.core.json_depth import json_depth
from tests.helpers import BASE_TS, event
from tests.helpers import raw_event as raw

NOW = BASE_TS


def reason_of(data: bytes | str) -> str:
    with pytest.raises(EventRejected) as info:
        decode_event(data, NOW)
    return info.value.reason


def test_decodes_a_valid_event_and_ignores_unknown_fields() -> None:
    decoded = decode_event(raw(category=3, value=1.5, extra={"x": 1}), NOW)
    assert decoded == Event("e1", "u1", BASE_TS, EventType.CLICK, "i9", 3, 1.5)


def test_round_trips_through_the_wire_format() -> None:
    original = event(item_id=42, category=None)
    assert decode_event(encode_event(original), NOW) == original


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (raw(user_id=...), "missing required field `user_id`"),
        (raw(ts="yesterday"), "Expected `int`, got `str` - at `$.ts`"),
        (raw(type="teleport"), "Invalid enum value 'teleport' - at `$.type`"),
        (raw(item_id=[1]), "at `$.item_id`"),
        (raw(user_id="a b"), "invalid user_id 'a b': only [A-Za-z0-9_.:@-], 1..128 chars"),
        (raw(user_id=""), "invalid user_id ''"),
        (raw(user_id="x" * 129), "invalid user_id"),
        (raw(ts=BASE_TS // 1000), "before 2000-01-01; ts is epoch milliseconds, not seconds"),
        (raw(ts=NOW + 2 * 86_400_000), "more than a day in the future"),
        (raw(event_id=""), "empty event_id"),
        (raw(item_id=""), "empty item_id"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "does not match the contract"),
    ],
)
def test_rejections_carry_a_readable_reason(data: bytes, expected: str) -> None:
    assert expected in reason_of(data)


def test_boolean_is_not_a_timestamp() -> None:
    assert "$.ts" in reason_of(raw(ts=True))


def test_oldest_and_newest_acceptable_timestamps() -> None:
    assert decode_event(raw(ts=MIN_TS_MS), NOW).ts == MIN_TS_MS
    assert decode_event(raw(ts=NOW + 86_400_000), NOW).ts == NOW + 86_400_000


@given(st.from_regex(r"[A-Za-z0-9_.:@-]{1,128}", fullmatch=True))
def test_every_valid_user_id_is_accepted(user_id: str) -> None:
    assert user_id_problem(user_id) is None
    assert decode_event(raw(user_id=user_id), NOW).user_id == user_id


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_escape_as_anything_but_a_rejection(data: bytes) -> None:
    try:
        decode_event(data, NOW)
    except EventRejected as exc:
        assert exc.reason


def test_bounds_are_refused_before_parsing_with_exact_reasons() -> None:
    with pytest.raises(EventRejected) as large:
        decode_event(b" " * (64 * 1024 + 1), NOW)
    assert large.value.kind == RejectionKind.TOO_LARGE
    assert large.value.reason == (
        "message is 65537 bytes, over the 65536-byte limit for an event; not parsed"
    )
    with pytest.raises(EventRejected) as deep:
        decode_event(b"[" * 33, NOW)
    assert deep.value.kind == RejectionKind.TOO_DEEP
    assert deep.value.reason == (
        "JSON nests deeper than 32 levels (an event is a flat object); not parsed"
    )
    check_limits(b" " * (64 * 1024))  # exactly at the bound: accepted
    check_limits(b"[" * 32)


@pytest.mark.parametrize(
    ("user_id", "shown"),
    [("a b" + "x" * 37, "a b" + "x" * 37), ("a b" + "x" * 38, "a b" + "x" * 37 + "...")],
)
def test_a_long_invalid_user_id_is_quoted_up_to_40_characters(user_id: str, shown: str) -> None:
    assert user_id_problem(user_id) == f"invalid user_id {shown!r}: {USER_ID_RULE}"


def test_empty_ids_are_refused_with_exact_reasons() -> None:
    assert reason_of(raw(event_id="")) == "empty event_id: every event needs a unique id"
    assert reason_of(raw(item_id="")) == "empty item_id"
    assert decode_event(raw(item_id=0), NOW).item_id == 0  # an int id is never 'empty'


def test_a_reason_is_cut_at_its_limit() -> None:
    exact = EventRejected("r" * MAX_REASON_CHARS)
    assert exact.reason == "r" * MAX_REASON_CHARS == str(exact)
    cut = EventRejected("r" * (MAX_REASON_CHARS + 1), RejectionKind.CONTRACT)
    assert cut.reason == "r" * MAX_REASON_CHARS + "..." == str(cut)
    assert cut.kind == RejectionKind.CONTRACT
    assert EventRejected("x").kind == RejectionKind.INVALID


@pytest.mark.parametrize(
    ("body", "depth"),
    [
        (b"", 0),
        (b"123", 0),
        (b'"[[{"', 0),
        (b"]]", 0),
        (b"[]", 1),
        (b'[{"a":[1]}]', 3),
        (b'["\\\\", [[]]]', 3),  # an escaped backslash, then a real closing quote
        (b'["\\"[[[", []]', 2),  # an escaped quote keeps the string open
    ],
)
def test_json_depth_is_exact(body: bytes, depth: int) -> None:
    assert json_depth(body) == depth


def test_an_already_parsed_event_is_validated_like_a_decoded_one() -> None:
    obj = {"event_id": "e1", "user_id": "u1", "ts": NOW, "type": "like", "item_id": 5}
    assert convert_event(obj, NOW) == Event("e1", "u1", NOW, EventType.LIKE, 5)
    with pytest.raises(EventRejected) as future:
        convert_event({**obj, "ts": NOW + 86_400_001}, NOW)
    assert future.value.reason == (
        f"absurd ts {NOW + 86_400_001}: more than a day in the future (now={NOW})"
    )
    with pytest.raises(EventRejected) as shape:
        convert_event({**obj, "ts": "now"}, NOW)
    assert shape.value.kind == RejectionKind.CONTRACT
    with pytest.raises(EventRejected) as long:
        convert_event({**obj, "item_id": "i" * 257}, NOW)
    assert long.value.kind == RejectionKind.STRING_TOO_LONG
