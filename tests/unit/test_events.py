from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.events import (
    MIN_TS_MS,
    Event,
    EventRejected,
    EventType,
    decode_event,
    encode_event,
    user_id_problem,
)
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
