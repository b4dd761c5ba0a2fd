"""Fuzzing the HTTP body parsers: the batchGet body (:func:`parse_batch_get`, then the
reader's id check) and the event intake body (:func:`validate_events`), with the JSON
nesting pre-scan they share (:func:`json_depth`).

Inputs are structured (JSON-ish documents near the real shapes, serialized several
ways), raw bytes, and the hostile bodies that once got 500s (deep nesting, unterminated
strings, runs of escaped quotes, integral floats, huge integers, invalid UTF-8) as
explicit examples. The property: a parser returns a parsed request or raises its
documented 4xx error, nothing else. Events it accepts also survive the trip to Kafka:
what ingest decodes from their encoding is the same event.

A bounded number of examples by default, reproducible (``derandomize``); set
``USEREMBED_FUZZ_EXAMPLES=100000`` for a longer, random run.
"""

from __future__ import annotations

import json
import os
from typing import Any

import orjson
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from service.api.http_events import ApiError, validate_events
from service.api.http_reads import HTTP_STATUS, BatchGet, parse_batch_get
from service.api.reads import ReadError, check_user_id
from service.core.events import MAX_FUTURE_SKEW_MS, decode_event, encode_event
from service.core.json_depth import json_depth, json_depth_problem

_EXAMPLES = os.environ.get("USEREMBED_FUZZ_EXAMPLES")
FUZZ = settings(
    max_examples=int(_EXAMPLES) if _EXAMPLES else 300,
    derandomize=not _EXAMPLES,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_DEPTH = 32
MAX_EVENTS = 5
NOW = 1_760_000_000_000

# the refusals each parser documents (all 4xx)
BATCH_CODES = {"invalid_request", "invalid_encoding", "invalid_model_version", "invalid_user_id"}
EVENT_CODES = {"invalid_request", "batch_too_large", "invalid_events"}

HOSTILE: list[bytes] = [
    b"[" * 100_000 + b"]" * 100_000,
    b"{" * 100_000,
    b'{"user_ids": ["u1"], "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
    b'[{"event_id": "e", "x": ' + b'{"a":' * 50_000,
    b'"' + b'\\"' * 50_000,
    b'["' + b"[" * 1000,
    b'{"user_ids": ["a\\\\"], "encoding": "json"}',
    b'[{"event_id": "e1", "user_id": "u1", "ts": 1.76e12, "type": "view", "item_id": 3.0}]',
    b'[{"event_id": "e1", "user_id": "u1", "ts": 1760000000000, "type": "view", '
    b'"item_id": 123456789012345678901234567890}]',
    b'[{"event_id": "e1", "user_id": "u1", "ts": 1e400, "type": "view", "item_id": 1}]',
    b'[{"event_id": "e1", "user_id": "u1", "ts": NaN, "type": "view", "item_id": 1}]',
    b'{"user_ids": ["\xff\xfe"]}',
    b"\xef\xbb\xbf[]",
    b"",
    b" ",
    b"null",
    b'{"user_ids": null}',
    b'{"user_ids": ["u1"], "encoding": ""}',
    b'{"user_ids": ["u1"], "model_version": "../../etc"}',
    b'{"user_ids": ["' + b"a" * 200 + b'"]}',
]

# --- generators -------------------------------------------------------------------

_text = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cs"]) | st.sampled_from('[]{}"\\:,\x00\n'),
    max_size=40,
)
_ids = st.from_regex(r"[A-Za-z0-9_.:@-]{1,20}", fullmatch=True) | _text
_numbers = (
    st.integers(-(2**70), 2**70)
    | st.integers(NOW - 10**9, NOW + 2 * MAX_FUTURE_SKEW_MS)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers(0, 2**53).map(float)
)
_scalars = st.none() | st.booleans() | _numbers | _text
_json = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4),
    max_leaves=20,
)
_batch = st.fixed_dictionaries(
    {"user_ids": st.lists(_ids, max_size=8) | _json},
    optional={
        "encoding": st.sampled_from(["json", "base64_float16", "base64_float32", "", "f64"])
        | _json,
        "model_version": st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,10}", fullmatch=True) | _json,
        "extra": _json,
    },
)
_valid_event = st.fixed_dictionaries(
    {
        "event_id": st.from_regex(r"[a-z0-9-]{1,36}", fullmatch=True),
        "user_id": st.from_regex(r"[A-Za-z0-9_.:@-]{1,20}", fullmatch=True),
        "ts": st.integers(NOW - 10**9, NOW + MAX_FUTURE_SKEW_MS) | st.just(float(NOW)),
        "type": st.sampled_from(["view", "click", "purchase"]),
        "item_id": st.from_regex(r"[a-z0-9]{1,10}", fullmatch=True) | st.integers(-(2**70), 2**70),
    },
    optional={
        "category": _ids | st.integers() | st.none(),
        "value": st.floats(allow_nan=False, allow_infinity=False) | st.none(),
        "extra": _json,
    },
)
_event = _valid_event | st.fixed_dictionaries(
    {},
    optional={
        "event_id": _ids | _json,
        "user_id": _ids | _json,
        "ts": _numbers | _json,
        "type": st.sampled_from(["view", "click", "purchase", "nope"]) | _json,
        "item_id": _ids | _numbers | _json,
        "category": _ids | _numbers | st.none(),
        "value": _numbers | st.none() | _text,
        "extra": _json,
    },
)


def _nested(value: Any, depth: int) -> Any:
    for _ in range(depth):
        value = [value]
    return value


def _serialized(doc: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    """A document as JSON bytes (compact, indented or ASCII-escaped); one in three is then
    nested deeper, cut short or followed by garbage."""

    def dump(value: Any, style: int, mutation: str, size: int, tail: bytes) -> bytes:
        if mutation == "nest":
            value = _nested(value, size % 250)
        try:
            body = (
                orjson.dumps(value)
                if style == 0
                else json.dumps(value, indent=2 if style == 1 else None).encode()
            )
        except (TypeError, ValueError, orjson.JSONEncodeError):
            body = json.dumps(value).encode()
        if mutation == "cut":
            body = body[: size % (len(body) + 1)]
        elif mutation == "tail":
            body += tail
        return body

    return st.builds(
        dump,
        doc,
        st.integers(0, 2),
        st.sampled_from(["none"] * 6 + ["nest", "cut", "tail"]),
        st.sampled_from([1, MAX_DEPTH - 3, MAX_DEPTH, 200]) | st.integers(0, 300),
        st.sampled_from([b"]", b"}", b'"', b"\\", b"\xff", b" x", b"[" * 40]),
    )


_raw = st.binary(max_size=300) | st.lists(
    st.sampled_from([b"[", b"]", b"{", b"}", b'"', b"\\", b":", b",", b"1", b"a", b" "]),
    max_size=300,
).map(b"".join)
batch_bodies = st.one_of(_serialized(_batch), _serialized(_batch), _serialized(_json), _raw)
event_bodies = st.one_of(
    _serialized(st.lists(_event, max_size=7)),
    _serialized(st.lists(_valid_event, min_size=1, max_size=MAX_EVENTS)),
    _serialized(_json),
    _raw,
)


def _examples(test: Any) -> Any:
    for body in HOSTILE:
        test = example(body)(test)
    return test


# --- properties -------------------------------------------------------------------


@FUZZ
@given(batch_bodies)
@_examples
def test_batch_get_body_is_parsed_or_refused_with_a_documented_400(body: bytes) -> None:
    try:
        request = parse_batch_get(body, MAX_DEPTH)
        assert isinstance(request, BatchGet)
        for user_id in request.user_ids:
            check_user_id(user_id)
    except ReadError as exc:
        assert exc.code in BATCH_CODES, (exc.code, exc.message)
        assert HTTP_STATUS[exc.code] == 400
        assert exc.message
        return
    assert isinstance(request.user_ids, list)
    assert all(isinstance(u, str) for u in request.user_ids)


@FUZZ
@given(event_bodies)
@_examples
def test_event_body_is_parsed_or_refused_with_a_documented_400(body: bytes) -> None:
    try:
        events = validate_events(body, NOW, MAX_EVENTS, MAX_DEPTH)
    except ApiError as exc:
        assert (exc.status, exc.code in EVENT_CODES) == (400, True), (exc.code, exc.message)
        assert exc.message
        if exc.code == "invalid_events":
            assert exc.details and all(d["reason"] for d in exc.details)
        return
    assert 1 <= len(events) <= MAX_EVENTS
    for event in events:  # what the API accepts, ingest accepts as the same event
        assert decode_event(encode_event(event), NOW) == event


def _parser_depth_bound(body: bytes) -> int:
    """The deepest nesting a recursive JSON parser can reach in ``body``: a string-aware
    scan that stops where the parser must (a backslash outside a string)."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte == 0x5C:
            break
        elif byte in b"[{":
            depth += 1
            deepest = max(deepest, depth)
        elif byte in b"]}":
            depth -= 1
    return deepest


@FUZZ
@given(_serialized(_json) | _raw)
@_examples
def test_the_depth_scan_never_underestimates_a_parser(body: bytes) -> None:
    assert json_depth(body) >= _parser_depth_bound(body)
    problem = json_depth_problem(body, MAX_DEPTH)
    assert (problem is not None) == (json_depth(body) > MAX_DEPTH)


@FUZZ
@given(_json)
def test_the_depth_scan_is_exact_on_json(value: Any) -> None:
    for body in (json.dumps(value).encode(), json.dumps(value, indent=1).encode()):
        assert json_depth(body) == _parser_depth_bound(body)
