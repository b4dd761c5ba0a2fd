from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from service.core.events import EventType
from service.core.features import FeatureState, apply_events, counters_at
from service.core.tensors import InputSchema, assemble, bucket_ids
from tests.helpers import BASE_TS, event, log_of

HOUR = 3_600_000
SCHEMA = InputSchema(history_length=4, item_buckets=101, category_buckets=11)


def state_with(n: int) -> FeatureState:
    events = [event(ts=BASE_TS + i * HOUR, item_id=i, category=i % 3) for i in range(n)]
    return apply_events(FeatureState.empty(), log_of(events), 10)[0]


def test_shapes_and_dtypes_follow_the_schema() -> None:
    tensors = assemble([state_with(2), state_with(0)], BASE_TS, SCHEMA)
    for name, (dtype, shape) in SCHEMA.inputs().items():
        assert tensors[name].dtype == np.dtype(dtype)
        assert tensors[name].shape == (2, *shape[1:])


def test_histories_are_left_padded_with_the_newest_event_last() -> None:
    tensors = assemble([state_with(2)], BASE_TS + 2 * HOUR, SCHEMA)
    assert tensors["mask"][0].tolist() == [0, 0, 1, 1]
    assert tensors["item_ids"][0, :2].tolist() == [0, 0]
    assert (tensors["item_ids"][0, 2:] > 0).all()
    assert tensors["event_types"][0, 2:].tolist() == [EventType.CLICK.code + 1] * 2
    np.testing.assert_allclose(tensors["ages"][0, 2:], np.log1p([2.0, 1.0]), rtol=1e-6)


def test_long_histories_keep_the_most_recent_l() -> None:
    state = state_with(7)
    tensors = assemble([state], BASE_TS + 7 * HOUR, SCHEMA)
    assert tensors["mask"][0].sum() == 4
    np.testing.assert_allclose(tensors["ages"][0], np.log1p([4.0, 3.0, 2.0, 1.0]), rtol=1e-6)


def test_ids_fall_in_their_vocabularies() -> None:
    tensors = assemble([state_with(10)], BASE_TS, InputSchema(history_length=10, item_buckets=7))
    assert tensors["item_ids"].min() >= 1 and tensors["item_ids"].max() <= 6


def test_counters_are_log1p_of_the_decayed_counts_at_now() -> None:
    state = state_with(3)
    now = BASE_TS + 5 * HOUR
    tensors = assemble([state], now, SCHEMA)
    np.testing.assert_allclose(
        tensors["counters"][0], np.log1p(counters_at(state, now)).ravel(), rtol=1e-6
    )


def test_empty_state_gives_all_padding() -> None:
    tensors = assemble([FeatureState.empty()], BASE_TS, SCHEMA)
    assert not tensors["mask"].any() and not tensors["counters"].any()


def test_schema_digest_is_stable_and_sensitive() -> None:
    assert SCHEMA.digest() == InputSchema(4, 101, 11).digest()
    assert SCHEMA.digest() != InputSchema(5, 101, 11).digest()
    assert InputSchema.from_dict(SCHEMA.to_dict()) == SCHEMA


def assemble_one_by_one(
    states: list[FeatureState], now_ms: int, schema: InputSchema
) -> dict[str, np.ndarray]:
    """The plain per-user definition that the vectorized ``assemble`` must equal."""
    out = {n: np.zeros((len(states), *s[1:]), d) for n, (d, s) in schema.inputs().items()}
    for row, state in enumerate(states):
        n = min(state.num_events, schema.history_length)
        if n:
            tail = slice(state.num_events - n, state.num_events)
            out["item_ids"][row, -n:] = bucket_ids(state.item_hashes[tail], schema.item_buckets)
            out["category_ids"][row, -n:] = bucket_ids(
                state.category_hashes[tail], schema.category_buckets
            )
            out["event_types"][row, -n:] = state.types[tail].astype(np.int64) + 1
            hours = np.maximum(now_ms - state.timestamps[tail], 0) / HOUR
            out["ages"][row, -n:] = np.log1p(hours)
            out["mask"][row, -n:] = 1.0
        out["counters"][row] = np.log1p(counters_at(state, now_ms)).reshape(-1)
    return out


@given(st.lists(st.integers(0, 9), max_size=12), st.integers(-5 * HOUR, 100 * HOUR))
def test_the_vectorized_assembly_equals_the_per_user_definition(
    lengths: list[int], offset: int
) -> None:
    states = [state_with(n) for n in lengths]
    now = BASE_TS + offset
    fast, slow = assemble(states, now, SCHEMA), assemble_one_by_one(states, now, SCHEMA)
    for name in SCHEMA.inputs():
        np.testing.assert_array_equal(fast[name], slow[name], err_msg=name)


def test_the_schema_and_its_digest_are_pinned() -> None:
    """The digest travels in every model manifest: a change of the canonical form makes
    every published model unservable, so it is pinned, not recomputed."""
    seq = ["batch", 4]
    assert SCHEMA.to_dict() == {
        "history_length": 4,
        "item_buckets": 101,
        "category_buckets": 11,
        "num_event_types": 8,
        "num_counters": 24,
        "inputs": {
            "item_ids": ("int64", seq),
            "category_ids": ("int64", seq),
            "event_types": ("int64", seq),
            "ages": ("float32", seq),
            "mask": ("float32", seq),
            "counters": ("float32", ["batch", 24]),
        },
    }
    assert SCHEMA.digest() == "0b7e0a1f2ad1ad6920d2874c4fffbb6cbfcee883261f3073006526b8145a0041"
    assert InputSchema().digest() == (
        "7dc9a3b210b7f9772e1783a0d999e23ac4240d2b27dea52abb0557b4e97f9616"
    )
    assert InputSchema.from_dict({**SCHEMA.to_dict(), "unknown": 1}) == SCHEMA


def test_bucket_ids_are_pinned_and_hash_zero_is_padding() -> None:
    hashes = np.array([0, 1, 99, 100, 101, 2**62 + 5], dtype=np.int64)
    assert bucket_ids(hashes, 101).tolist() == [0, 2, 100, 1, 2, 10]


def test_a_missing_category_is_padding_in_its_position() -> None:
    events = [event(ts=BASE_TS, item_id=7, category=None), event(ts=BASE_TS + 1, item_id=8)]
    state = apply_events(FeatureState.empty(), log_of(events), 10)[0]
    tensors = assemble([state], BASE_TS + 1, SCHEMA)
    assert tensors["category_ids"][0].tolist() == [
        0,
        0,
        0,
        int(bucket_ids(state.category_hashes, 11)[1]),
    ]
    assert tensors["category_ids"][0, 3] > 0
    assert tensors["item_ids"][0, 2:].tolist() == bucket_ids(state.item_hashes, 101).tolist()
