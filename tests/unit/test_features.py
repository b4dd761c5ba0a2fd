from __future__ import annotations

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.core.events import EventType
from service.core.features import (
    HALF_LIVES_MS,
    FeatureDecodeError,
    FeatureState,
    apply_events,
    counters_at,
    decode_features,
    encode_features,
    hash_id,
)
from tests.helpers import BASE_TS, event, log_of, sourced

HOUR = 3_600_000
L = 5


def test_applying_to_an_empty_state_records_history_and_position() -> None:
    events = [event(ts=BASE_TS + i, item_id=f"i{i}") for i in range(3)]
    state, applied = apply_events(FeatureState.empty(), log_of(events, 10), L)
    assert applied == 3
    assert state.version == 1
    assert (state.partition, state.offset) == (0, 12)
    assert state.last_event_ms == BASE_TS + 2
    assert state.item_hashes.tolist() == [hash_id(f"i{i}") for i in range(3)]
    assert state.types.tolist() == [EventType.CLICK.code] * 3


def test_history_is_truncated_to_the_most_recent_l_events() -> None:
    events = [event(ts=BASE_TS + i, item_id=i) for i in range(8)]
    state, _ = apply_events(FeatureState.empty(), log_of(events), L)
    assert state.num_events == L
    assert state.item_hashes.tolist() == [hash_id(i) for i in range(3, 8)]
    assert state.timestamps.tolist() == [BASE_TS + i for i in range(3, 8)]


def test_late_events_are_placed_by_timestamp_and_ties_keep_log_order() -> None:
    first, _ = apply_events(
        FeatureState.empty(), log_of([event(ts=BASE_TS + 10, item_id="late-seen")]), L
    )
    events = [event(ts=BASE_TS + 5, item_id="a"), event(ts=BASE_TS + 10, item_id="b")]
    state, _ = apply_events(first, log_of(events, first_offset=1), L)
    assert state.item_hashes.tolist() == [hash_id("a"), hash_id("late-seen"), hash_id("b")]
    assert state.last_event_ms == BASE_TS + 10


def test_reapplying_the_same_offsets_changes_nothing() -> None:
    batch = log_of([event(ts=BASE_TS + i) for i in range(4)])
    once, applied_once = apply_events(FeatureState.empty(), batch, L)
    twice, applied_twice = apply_events(once, batch, L)
    assert (applied_once, applied_twice) == (4, 0)
    assert twice is once


def test_a_partial_redelivery_applies_only_the_unseen_tail() -> None:
    batch = log_of([event(ts=BASE_TS + i, item_id=i) for i in range(4)])
    state, _ = apply_events(FeatureState.empty(), batch[:2], L)
    state, applied = apply_events(state, batch, L)
    assert applied == 2
    assert state.num_events == 4
    assert state.version == 2
    assert state.offset == 3


def test_duplicates_inside_one_batch_are_skipped() -> None:
    e = event()
    state, applied = apply_events(FeatureState.empty(), [sourced(e, 7), sourced(e, 7)], L)
    assert applied == 1 and state.num_events == 1


def test_a_new_partition_restarts_the_high_water_mark() -> None:
    state, _ = apply_events(FeatureState.empty(), [sourced(event(), 100, partition=0)], L)
    state, applied = apply_events(state, [sourced(event(), 3, partition=1)], L)
    assert applied == 1
    assert (state.partition, state.offset) == (1, 3)


def test_counters_decay_by_half_per_half_life() -> None:
    state, _ = apply_events(FeatureState.empty(), log_of([event(type=EventType.LIKE)]), L)
    like = EventType.LIKE.code
    assert state.counters[like].tolist() == [1.0, 1.0, 1.0]
    later = counters_at(state, BASE_TS + HALF_LIVES_MS[0])
    assert later[like, 0] == pytest.approx(0.5)
    assert later[like, 1] == pytest.approx(2 ** (-HALF_LIVES_MS[0] / HALF_LIVES_MS[1]))
    assert counters_at(state, BASE_TS - HOUR)[like].tolist() == [1.0, 1.0, 1.0]
    assert state.counters.sum() == 3.0  # no other type was touched


@settings(max_examples=60)
@given(
    st.lists(
        st.tuples(st.integers(0, 14 * 24 * HOUR), st.sampled_from(list(EventType))),
        min_size=1,
        max_size=30,
    ),
    st.integers(1, 29),
)
def test_counters_equal_the_closed_form_whatever_the_batching(
    timeline: list[tuple[int, EventType]], split: int
) -> None:
    events = [event(ts=BASE_TS + dt, type=t) for dt, t in timeline]
    log = log_of(events)
    in_one, _ = apply_events(FeatureState.empty(), log, 50)
    first, _ = apply_events(FeatureState.empty(), log[:split], 50)
    in_two, _ = apply_events(first, log[split:], 50)
    reference = max(e.ts for e in events)
    expected = np.zeros_like(in_one.counters, dtype=np.float64)
    for e in events:
        expected[e.type.code] += np.exp2(-(reference - e.ts) / np.asarray(HALF_LIVES_MS))
    np.testing.assert_allclose(in_one.counters, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(in_two.counters, expected, rtol=1e-5, atol=1e-6)
    assert in_two.item_hashes.tolist() == in_one.item_hashes.tolist()
    assert in_two.timestamps.tolist() == in_one.timestamps.tolist()


def test_ids_hash_stably_and_ints_equal_their_strings() -> None:
    assert hash_id(42) == hash_id("42")
    assert hash_id("i1") != hash_id("i2")
    assert hash_id(None) == 0
    assert 0 < hash_id("x") < 2**63


def states() -> st.SearchStrategy[FeatureState]:
    batches = st.lists(
        st.tuples(
            st.integers(0, 10**9),
            st.sampled_from(list(EventType)),
            st.text(min_size=1, max_size=8),
            st.one_of(st.none(), st.integers(0, 10**6)),
        ),
        max_size=40,
    )

    def build(rows: list[tuple[int, EventType, str, int | None]]) -> FeatureState:
        events = [event(ts=BASE_TS + dt, type=t, item_id=i, category=c) for dt, t, i, c in rows]
        return apply_events(FeatureState.empty(), log_of(events, 1000), 25)[0]

    return batches.map(build)


@given(states())
def test_binary_round_trip(state: FeatureState) -> None:
    decoded = decode_features(encode_features(state))
    for field in ("item_hashes", "category_hashes", "types", "timestamps", "counters"):
        np.testing.assert_array_equal(getattr(decoded, field), getattr(state, field))
        assert getattr(decoded, field).dtype == getattr(state, field).dtype
    assert (decoded.last_event_ms, decoded.version) == (state.last_event_ms, state.version)
    assert (decoded.partition, decoded.offset) == (state.partition, state.offset)


def test_record_is_compact() -> None:
    events = [event(ts=BASE_TS + i) for i in range(50)]
    state, _ = apply_events(FeatureState.empty(), log_of(events), 50)
    assert len(encode_features(state)) <= 40 + 25 * 50 + 4 * state.counters.size


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:10], "feature record too short (10 bytes)"),
        (lambda b: b"XX" + b[2:], "not a feature record (magic b'XX')"),
        (
            lambda b: b[:2] + bytes([9]) + b[3:],
            "unsupported feature layout v9 (this build reads v1)",
        ),
        (lambda b: b + b"\x00", "feature record is 158 bytes, expected 157"),
    ],
)
def test_unreadable_records_are_refused_with_a_reason(mutate, message) -> None:  # type: ignore[no-untyped-def]
    encoded = encode_features(apply_events(FeatureState.empty(), log_of([event()]), L)[0])
    with pytest.raises(FeatureDecodeError, match=f"^{re.escape(message)}$"):
        decode_features(mutate(encoded))


def test_categories_are_hashed_and_none_is_zero() -> None:
    events = [event(ts=BASE_TS, category="c1"), event(ts=BASE_TS + 1, category=None)]
    state, _ = apply_events(FeatureState.empty(), log_of(events), L)
    assert state.category_hashes.tolist() == [hash_id("c1"), 0]


def test_many_ties_keep_log_order() -> None:
    """A stable merge: with numpy's default (unstable) sort, ties of this size reorder."""
    stamps = np.random.default_rng(0).integers(0, 3, 200)
    events = [event(ts=BASE_TS + int(t), item_id=i) for i, t in enumerate(stamps)]
    state, _ = apply_events(FeatureState.empty(), log_of(events), 200)
    expected = sorted(range(200), key=lambda i: (stamps[i], i))
    assert state.item_hashes.tolist() == [hash_id(i) for i in expected]


def test_decoded_fields_are_read_only_views_of_the_record() -> None:
    record = encode_features(apply_events(FeatureState.empty(), log_of([event()]), L)[0])
    decoded = decode_features(record)
    raw = np.frombuffer(record, dtype=np.uint8)
    for field in ("item_hashes", "category_hashes", "timestamps", "types", "counters"):
        array = getattr(decoded, field)
        assert not array.flags.writeable, field
        assert np.shares_memory(array, raw), field


def test_a_header_without_its_body_is_refused_for_its_size() -> None:
    encoded = encode_features(apply_events(FeatureState.empty(), log_of([event()]), L)[0])
    with pytest.raises(FeatureDecodeError, match="feature record is 36 bytes, expected 157"):
        decode_features(encoded[:36])
