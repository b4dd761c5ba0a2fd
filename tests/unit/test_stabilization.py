"""Properties of staleness-aware stabilization (docs/stabilization.md)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from service.core.stabilization import StabilizationConfig, fresh_weight, stabilize

DIM = 8
finite = st.floats(-10, 10, allow_nan=False, width=32)
vectors = arrays(np.float32, (3, DIM), elements=finite).filter(
    lambda a: bool((np.linalg.norm(a, axis=1) > 1e-2).all())
)
ages = arrays(np.int64, 3, elements=st.integers(0, 10**9))
configs = st.builds(
    StabilizationConfig,
    time_constant_s=st.floats(0.1, 3600),
    min_weight=st.floats(0, 1),
    max_step=st.floats(0.01, 3.0),
)


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def angle(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    cos = np.einsum("nd,nd->n", unit(a).astype(np.float64), unit(b).astype(np.float64))
    return np.arccos(np.clip(cos, -1, 1))


@given(ages, configs)
def test_weights_are_within_bounds_and_monotone_in_staleness(
    age: np.ndarray, config: StabilizationConfig
) -> None:
    weight = fresh_weight(age, config)
    assert ((weight >= 0) & (weight <= 1)).all()
    assert (weight >= np.float32(config.min_weight) - 1e-6).all()
    order = np.argsort(age)
    assert (np.diff(weight[order]) >= -1e-7).all()
    assert fresh_weight(np.array([0]), config)[0] == pytest.approx(config.min_weight, abs=1e-6)


@given(vectors, ages, configs, st.booleans())
def test_identical_inputs_give_the_input_back(
    fresh: np.ndarray, age: np.ndarray, config: StabilizationConfig, normalized: bool
) -> None:
    rows = unit(fresh).astype(np.float32) if normalized else fresh
    out = stabilize(rows, rows, age, np.ones(3, bool), normalized=normalized, config=config)
    np.testing.assert_allclose(out, rows, atol=1e-4)


@given(vectors, vectors, ages, configs)
def test_no_previous_serves_the_fresh_embedding(
    fresh: np.ndarray, previous: np.ndarray, age: np.ndarray, config: StabilizationConfig
) -> None:
    for normalized in (True, False):
        out = stabilize(
            fresh, previous, age, np.zeros(3, bool), normalized=normalized, config=config
        )
        np.testing.assert_array_equal(out, fresh)


@given(vectors, vectors, ages, configs)
def test_the_step_cap_is_respected(
    fresh: np.ndarray, previous: np.ndarray, age: np.ndarray, config: StabilizationConfig
) -> None:
    has = np.ones(3, bool)
    on_sphere = stabilize(fresh, previous, age, has, normalized=True, config=config)
    np.testing.assert_allclose(np.linalg.norm(on_sphere, axis=1), 1.0, atol=1e-5)
    assert (angle(on_sphere, previous) <= config.max_step + 1e-3).all()
    on_line = stabilize(fresh, previous, age, has, normalized=False, config=config)
    step = np.linalg.norm(on_line.astype(np.float64) - previous, axis=1)
    assert (step <= config.max_step * (1 + 1e-5) + 1e-4).all()


@given(vectors, vectors, configs, st.integers(0, 10**8), st.integers(0, 10**8))
def test_a_staler_previous_lets_the_fresh_one_dominate_more(
    fresh: np.ndarray,
    previous: np.ndarray,
    config: StabilizationConfig,
    young: int,
    extra: int,
) -> None:
    has = np.ones(3, bool)
    fresh_u, previous_u = unit(fresh).astype(np.float32), unit(previous).astype(np.float32)
    near = stabilize(fresh_u, previous_u, np.full(3, young), has, normalized=True, config=config)
    far = stabilize(
        fresh_u, previous_u, np.full(3, young + extra), has, normalized=True, config=config
    )
    assert (angle(far, fresh_u) <= angle(near, fresh_u) + 1e-3).all()
    near_l = stabilize(fresh, previous, np.full(3, young), has, normalized=False, config=config)
    far_l = stabilize(
        fresh, previous, np.full(3, young + extra), has, normalized=False, config=config
    )
    distance = np.linalg.norm
    assert (
        distance(far_l - fresh, axis=1) <= distance(near_l - fresh, axis=1) * (1 + 1e-5) + 1e-4
    ).all()


def test_an_old_previous_is_replaced_and_a_recent_one_smoothed() -> None:
    config = StabilizationConfig(time_constant_s=60, min_weight=0.2, max_step=3.0)
    previous = np.array([[1.0, 0.0]], np.float32)
    fresh = np.array([[0.0, 1.0]], np.float32)
    has = np.ones(1, bool)
    week = stabilize(
        fresh, previous, np.array([7 * 86_400_000]), has, normalized=True, config=config
    )
    np.testing.assert_allclose(week, fresh, atol=1e-5)
    now = stabilize(fresh, previous, np.array([0]), has, normalized=True, config=config)
    assert angle(now, previous)[0] == pytest.approx(0.2 * np.pi / 2, abs=1e-5)


def test_a_disabled_stabilizer_serves_the_fresh_embedding() -> None:
    previous, fresh = np.ones((1, 4), np.float32), np.arange(4, dtype=np.float32)[None]
    config = StabilizationConfig(enabled=False)
    out = stabilize(
        fresh, previous, np.array([0]), np.ones(1, bool), normalized=False, config=config
    )
    np.testing.assert_array_equal(out, fresh)


def test_invalid_configs_are_refused() -> None:
    with pytest.raises(ValueError, match="time constant"):
        StabilizationConfig(time_constant_s=0)
    with pytest.raises(ValueError, match="min_weight"):
        StabilizationConfig(min_weight=1.5)


# -- exact values: a property test passes for many wrong formulas ------------------------

CONFIG = StabilizationConfig(time_constant_s=60, min_weight=0.25, max_step=10.0)
MINUTE_MS = 60_000


def test_the_fresh_weight_follows_its_formula_exactly() -> None:
    age = np.array([0, MINUTE_MS, 2 * MINUTE_MS, -5 * MINUTE_MS, 10**12])
    expected = [
        0.25,
        0.25 + 0.75 * (1 - np.exp(-1.0)),
        0.25 + 0.75 * (1 - np.exp(-2.0)),
        0.25,  # a previous one from the future counts as just computed
        1.0,
    ]
    weight = fresh_weight(age, CONFIG)
    assert weight.dtype == np.float32
    np.testing.assert_allclose(weight, expected, rtol=1e-7)
    ones = fresh_weight(np.array([0, 10**6]), StabilizationConfig(min_weight=1.0))
    assert ones.tolist() == [1.0, 1.0]


def test_a_line_step_moves_by_the_fresh_weight() -> None:
    previous = np.array([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
    fresh = np.array([[4.0, 0.0, 0.0], [1.0, 3.0, 1.0]], np.float32)
    age = np.array([0, MINUTE_MS])
    out = stabilize(fresh, previous, age, np.ones(2, bool), normalized=False, config=CONFIG)
    w = 0.25 + 0.75 * (1 - np.exp(-1.0))
    np.testing.assert_allclose(out, [[1.0, 0.0, 0.0], [1.0, 1.0 + 2 * w, 1.0]], rtol=1e-6)
    assert out.dtype == np.float32


def test_a_line_step_is_capped_in_length_along_its_direction() -> None:
    config = StabilizationConfig(time_constant_s=60, min_weight=1.0, max_step=0.5)
    previous = np.array([[1.0, 1.0], [0.0, 0.0]], np.float32)
    fresh = np.array([[4.0, 5.0], [0.3, 0.4]], np.float32)  # steps of 5 and of 0.5
    out = stabilize(
        fresh, previous, np.zeros(2, np.int64), np.ones(2, bool), normalized=False, config=config
    )
    np.testing.assert_allclose(out, [[1.3, 1.4], [0.3, 0.4]], rtol=1e-6)


def test_a_sphere_step_turns_by_the_weighted_angle() -> None:
    config = StabilizationConfig(time_constant_s=60, min_weight=0.2, max_step=3.0)
    previous = np.array([[2.0, 0.0]], np.float32)  # not unit: normalized first
    fresh = np.array([[0.0, 0.5]], np.float32)
    out = stabilize(
        fresh, previous, np.array([0]), np.ones(1, bool), normalized=True, config=config
    )
    turn = 0.2 * np.pi / 2
    np.testing.assert_allclose(out, [[np.cos(turn), np.sin(turn)]], rtol=1e-6)


def test_a_sphere_step_is_capped_in_angle() -> None:
    config = StabilizationConfig(time_constant_s=60, min_weight=1.0, max_step=0.3)
    previous = np.array([[1.0, 0.0, 0.0]], np.float32)
    fresh = np.array([[0.0, 0.0, 1.0]], np.float32)
    out = stabilize(
        fresh, previous, np.array([0]), np.ones(1, bool), normalized=True, config=config
    )
    np.testing.assert_allclose(out, [[np.cos(0.3), 0.0, np.sin(0.3)]], rtol=1e-6, atol=1e-7)


def test_parallel_inputs_on_the_sphere_stay_put_or_take_the_fresh_one() -> None:
    config = StabilizationConfig(time_constant_s=60, min_weight=0.5, max_step=3.0)
    previous = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 3.0]], np.float32)
    fresh = np.array([[-1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], np.float32)
    out = stabilize(
        fresh, previous, np.zeros(3, np.int64), np.ones(3, bool), normalized=True, config=config
    )
    # opposite: no defined direction, the previous one stays; same direction: unit(fresh)
    assert out.tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]


@pytest.mark.parametrize("normalized", [True, False])
def test_only_rows_with_a_previous_embedding_are_stabilized(normalized: bool) -> None:
    """A new user batched with embedded ones gets exactly its fresh embedding (the
    worker fills a missing previous with zeros)."""
    config = StabilizationConfig(time_constant_s=60, min_weight=0.5, max_step=3.0)
    fresh = np.array([[0.6, 0.8], [0.0, 1.0], [1.0, 0.0]], np.float32)
    previous = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 0.0]], np.float32)
    has = np.array([False, True, False])
    out = stabilize(
        fresh, previous, np.zeros(3, np.int64), has, normalized=normalized, config=config
    )
    assert out[0].tolist() == fresh[0].tolist()
    assert out[2].tolist() == fresh[2].tolist()
    if normalized:
        np.testing.assert_allclose(out[1], [np.cos(np.pi / 4), np.sin(np.pi / 4)], rtol=1e-6)
    else:
        np.testing.assert_allclose(out[1], [0.5, 0.5], rtol=1e-6)


def test_stabilize_returns_float32_even_for_float64_input() -> None:
    fresh = np.array([[1.0, 2.0]], np.float64)
    out = stabilize(fresh, fresh, np.array([0]), np.zeros(1, bool), normalized=False, config=CONFIG)
    assert out.dtype == np.float32 and out.tolist() == [[1.0, 2.0]]
    mixed = stabilize(
        fresh, fresh * 0, np.array([0]), np.ones(1, bool), normalized=False, config=CONFIG
    )
    assert mixed.dtype == np.float32


def test_config_bounds_are_inclusive_where_documented() -> None:
    StabilizationConfig(min_weight=0.0)
    StabilizationConfig(min_weight=1.0)
    with pytest.raises(ValueError, match=r"^stabilization min_weight must be within \[0, 1\]$"):
        StabilizationConfig(min_weight=-0.01)
    with pytest.raises(ValueError, match=r"^stabilization time constant must be > 0 seconds$"):
        StabilizationConfig(time_constant_s=-1)
    with pytest.raises(ValueError, match=r"^stabilization max_step must be > 0$"):
        StabilizationConfig(max_step=0)
    assert StabilizationConfig() == StabilizationConfig(True, 60.0, 0.25, 0.6)


def test_a_turn_too_small_to_have_a_direction_takes_the_fresh_vector() -> None:
    """Below ~1e-6 rad the tangent is undefined: the result is unit(fresh) (normalized in
    float64, as every row is), bit for bit, even where the cosine rounds above 1."""
    config = StabilizationConfig(time_constant_s=60, min_weight=0.5, max_step=3.0)
    tiny = (np.array([[1.0, 0.0]], np.float32), np.array([[1.0, 5e-7]], np.float32))
    previous = np.random.default_rng(1).standard_normal((1, 16)).astype(np.float32)
    nudged = previous.copy()
    nudged[0, 0] = np.nextafter(nudged[0, 0], np.float32(np.inf))  # cos = 1 + 3e-8 here
    for before, fresh in (tiny, (previous, nudged)):
        out = stabilize(
            fresh, before, np.array([0]), np.ones(1, bool), normalized=True, config=config
        )
        as_float64 = unit(fresh.astype(np.float64)).astype(np.float32)
        assert out.tolist() == as_float64.tolist()
        assert out.tolist() != unit(before.astype(np.float64)).astype(np.float32).tolist()


@pytest.mark.parametrize("normalized", [True, False])
def test_inputs_are_taken_as_float32_whatever_their_dtype(normalized: bool) -> None:
    """The worker's rows are float32 (and stored float16): float64 input must give the
    very same bits as its float32 rounding, not a more precise answer."""
    rng = np.random.default_rng(3)
    fresh, previous = rng.standard_normal((2, 64, 8))
    age = rng.integers(0, 10**6, 64)
    has = np.ones(64, bool)
    config = StabilizationConfig(time_constant_s=60, min_weight=0.3, max_step=0.4)
    wide = stabilize(fresh, previous, age, has, normalized=normalized, config=config)
    narrow = stabilize(
        fresh.astype(np.float32),
        previous.astype(np.float32),
        age,
        has,
        normalized=normalized,
        config=config,
    )
    assert wide.dtype == np.float32
    assert wide.tolist() == narrow.tolist()
