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
