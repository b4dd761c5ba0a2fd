"""Fuzzing the event decoder (issue 16): whatever bytes or text arrive, decode_event
returns a valid Event or raises EventRejected with a reason and a documented class.
Anything else, including a rejection of class ``decoder_error`` (the catch-all that
keeps ingest alive, but means a failure mode nobody anticipated), fails.

Structured generators (event-shaped JSON with wrong types, extra fields and deep
values; byte-level mutations of valid events; raw bytes and text; bracket soups up
to 20,000 deep), seeded with the hostile inputs the issue found. Bounded by default
(a few seconds in ``make test``); ``USEREMBED_FUZZ_EXAMPLES=N`` runs N examples per
test (``make fuzz``).
"""

from __future__ import annotations

import os
from typing import Any

import msgspec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.core.events import (
    MAX_ID_LENGTH,
    MAX_REASON_CHARS,
    USER_ID_PATTERN,
    Event,
    EventRejected,
    EventType,
    RejectionKind,
    decode_event,
    encode_event,
)
from service.core.json_depth import json_depth_problem
from tests.helpers import BASE_TS

NOW = BASE_TS
EXAMPLES = int(os.environ.get("USEREMBED_FUZZ_EXAMPLES", "300"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
VALID: dict[str, Any] = {
    "event_id": "e1",
    "user_id": "u1",
    "ts": BASE_TS,
    "type": "click",
    "item_id": "i9",
    "category": "c3",
    "value": 1.5,
}
VALID_BYTES = msgspec.json.encode(VALID)


def exceeds(data: bytes, max_depth: int) -> bool:
    return json_depth_problem(data, max_depth) is not None


def check(data: bytes | str) -> None:
    """The decoder's whole contract, on one input."""
    try:
        event = decode_event(data, NOW)
    except EventRejected as exc:
        assert isinstance(exc.reason, str) and exc.reason.strip()
        assert len(exc.reason) <= MAX_REASON_CHARS + 3
        assert exc.kind in set(RejectionKind)
        assert exc.kind is not RejectionKind.DECODER_ERROR, f"unanticipated: {exc.reason}"
        return
    assert isinstance(event, Event)
    assert USER_ID_PATTERN.fullmatch(event.user_id)
    for value in (event.event_id, event.item_id, event.category):
        assert not isinstance(value, str) or len(value) <= MAX_ID_LENGTH
    assert event.event_id and event.item_id != ""
    assert decode_event(encode_event(event), NOW) == event  # accepted = representable


# --- the corpus of hostile inputs from the issue (and what fuzzing found since) ---------------

DEEP = b'{"event_id": "deep", "user_id": "u1", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
CORPUS: list[bytes | str] = [
    DEEP,  # killed ingest with a RecursionError
    b"[" * 100_000,  # the HTTP bodies of the issue, unterminated
    b'{"a":' * 50_000,
    b'{"event_id": "huge", "padding": "' + b"x" * ((1 << 20) - 40) + b'"}',  # 1 MiB
    b"\xff\xfe\x00\x00",  # invalid UTF-8
    b'{"event_id": "\xc3\x28"}',
    b"\xef\xbb\xbf" + VALID_BYTES,  # a byte-order mark
    VALID_BYTES + b"\x00",
    '{"event_id": "\ud800", "user_id": "u1"}',  # a str with a lone surrogate
    b'{"event_id": "e\\ud800"}',  # an escaped lone surrogate
    b'"' + b'\\"' * 20_000,  # escaped quotes, unterminated: a quadratic regex's input
    msgspec.json.encode({**VALID, "ts": "yesterday"}),  # wrong types
    msgspec.json.encode({**VALID, "ts": True}),
    msgspec.json.encode({**VALID, "item_id": [1, 2]}),
    msgspec.json.encode({**VALID, "type": "t" * 100_000}),
    VALID_BYTES[:-1] + b', "value": 1e400}',
    VALID_BYTES[:-1] + b', "item_id": ' + b"9" * 4299 + b"}",
    VALID_BYTES[:-1] + b', "item_id": ' + b"9" * 5000 + b"}",
    VALID_BYTES[:-1] + b', "ts": ' + b"9" * 30 + b"}",
    VALID_BYTES[:-1] + b', "event_id": "' + b"e" * 300 + b'"}',
    b"",
    b"null",
    b"[]",
    b"{}",
]


def with_corpus(test: Any) -> Any:
    for seed in CORPUS:
        test = example(seed)(test)
    return test


# --- generators ---------------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=300)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
valid_fields = {
    "event_id": st.text(min_size=1, max_size=MAX_ID_LENGTH + 2),
    "user_id": st.from_regex(r"[A-Za-z0-9_.:@-]{1,130}", fullmatch=True) | st.text(max_size=5),
    "ts": st.integers(NOW - 10**12, NOW + 2 * 86_400_000) | st.integers(),
    "type": st.sampled_from([t.value for t in EventType]) | st.text(max_size=12),
    "item_id": st.text(max_size=MAX_ID_LENGTH + 2) | st.integers(),
    "category": st.none() | st.text(max_size=MAX_ID_LENGTH + 2) | st.integers(),
    "value": st.none() | st.floats(allow_nan=False),
}


@st.composite
def events_ish(draw: st.DrawFn) -> bytes:
    """An event-shaped object: each field valid, of a wrong type, or missing; extra fields."""
    obj: dict[str, Any] = {}
    for name, strategy in valid_fields.items():
        choice = draw(st.sampled_from(["valid", "valid", "valid", "wrong", "missing"]))
        if choice == "valid":
            obj[name] = draw(strategy)
        elif choice == "wrong":
            obj[name] = draw(json_values)
    obj.update(draw(st.dictionaries(st.text(max_size=8), json_values, max_size=3)))
    return msgspec.json.encode(obj)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid (or event-ish) message with bytes flipped, inserted, deleted or cut."""
    data = bytearray(draw(st.just(VALID_BYTES) | events_ish()))
    for _ in range(draw(st.integers(1, 6))):
        at = draw(st.integers(0, len(data)))
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut", "nest"]))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 8))]
        elif op == "cut":
            del data[at:]
        else:
            depth = draw(st.integers(1, 3000))
            data[at:at] = draw(st.sampled_from([b"[", b"{", b'{"a":', b'["'])) * depth
    return bytes(data)


@st.composite
def bracket_soup(draw: st.DrawFn) -> bytes:
    """Deep, possibly unbalanced nesting with strings and junk between the brackets."""
    depth = draw(st.integers(0, 20_000))
    opener = draw(st.sampled_from([b"[", b"{", b'{"k":', b"[1,", b'["[",']))
    middle = draw(st.sampled_from([b"", b"1", b'"x"', b'"\\"', b"{", b"]]]"]))
    closer = draw(st.sampled_from([b"]", b"}", b""]))
    close_depth = draw(st.integers(0, depth))
    return opener * depth + middle + closer * close_depth


texts = st.text(
    alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF, categories=None),
    max_size=200,
) | st.text(alphabet=st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), max_size=4)


# --- properties ---------------------------------------------------------------------------------


@FUZZ
@given(events_ish())
def test_event_shaped_json(data: bytes) -> None:
    check(data)


@FUZZ
@given(mutated())
def test_mutated_messages(data: bytes) -> None:
    check(data)


@FUZZ
@given(st.binary(max_size=2000))
@with_corpus
def test_raw_bytes_and_the_issues_corpus(data: bytes | str) -> None:
    check(data)


@FUZZ
@given(bracket_soup())
def test_deep_and_unbalanced_nesting(data: bytes) -> None:
    check(data)
    exceeds(data, 32)  # never raises


@FUZZ
@given(texts | json_values.map(lambda v: msgspec.json.encode(v).decode()))
def test_text_input(data: str) -> None:
    check(data)
