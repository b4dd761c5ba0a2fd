"""Staleness-aware stabilization of served embeddings (docs/stabilization.md).

The served embedding moves from the previously served one towards the freshly
inferred one by a weight that grows with the age of the previous one, a
continuous-time exponential moving average, so the result does not depend on
how often a user happens to be recomputed, and never by more than a capped step.
Normalized models move along the unit sphere (the step is an angle); others move
along the straight line (the step is an L2 distance).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float32]
_EPS = 1e-6


@dataclass(frozen=True, slots=True)
class StabilizationConfig:
    """``time_constant_s``: age at which the fresh embedding gets ~63% of the remaining
    weight. ``min_weight``: the fresh share even for a just-computed previous one.
    ``max_step``: radians on the unit sphere (normalized models), else L2 distance."""

    enabled: bool = True
    time_constant_s: float = 60.0
    min_weight: float = 0.25
    max_step: float = 0.6

    def __post_init__(self) -> None:
        if self.time_constant_s <= 0:
            raise ValueError("stabilization time constant must be > 0 seconds")
        if not 0.0 <= self.min_weight <= 1.0:
            raise ValueError("stabilization min_weight must be within [0, 1]")
        if self.max_step <= 0:
            raise ValueError("stabilization max_step must be > 0")


def fresh_weight(age_ms: npt.NDArray[np.int64], config: StabilizationConfig) -> FloatArray:
    """Weight of the fresh embedding, in [min_weight, 1], non-decreasing in the age
    of the previous one: w = m + (1 - m) * (1 - exp(-age / tau))."""
    age_s = np.maximum(np.asarray(age_ms, dtype=np.float64), 0.0) / 1e3
    grown = -np.expm1(-age_s / config.time_constant_s)
    weight = config.min_weight + (1.0 - config.min_weight) * grown
    return np.clip(weight, 0.0, 1.0).astype(np.float32)


def stabilize(
    fresh: FloatArray,
    previous: FloatArray,
    age_ms: npt.NDArray[np.int64],
    has_previous: npt.NDArray[np.bool_],
    *,
    normalized: bool,
    config: StabilizationConfig,
) -> FloatArray:
    """Rows [n, d] to serve: ``fresh`` where there is no previous (or disabled), else
    a capped step from ``previous`` towards ``fresh``."""
    fresh = np.asarray(fresh, dtype=np.float32)
    if not config.enabled or not has_previous.any():
        return fresh
    previous = np.asarray(previous, dtype=np.float32)
    weight = fresh_weight(age_ms, config)
    step = _sphere_step if normalized else _line_step
    moved = step(fresh, previous, weight, config.max_step)
    return np.where(has_previous[:, None], moved, fresh).astype(np.float32)


def _line_step(
    fresh: FloatArray, previous: FloatArray, weight: FloatArray, cap: float
) -> FloatArray:
    delta = weight[:, None] * (fresh - previous)
    length = np.linalg.norm(delta, axis=1, keepdims=True)
    scale = np.minimum(1.0, cap / np.maximum(length, _EPS))
    moved: FloatArray = (previous + delta * scale).astype(np.float32)
    return moved


def _unit(rows: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    norms = np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), _EPS)
    unit: npt.NDArray[np.float64] = rows / norms
    return unit


def _sphere_step(
    fresh: FloatArray, previous: FloatArray, weight: FloatArray, cap: float
) -> FloatArray:
    """Rotate unit(previous) towards unit(fresh) by min(w * angle, cap) radians, in
    float64: rows normalized in float32 are units only to ~1e-7, which the tangent of
    nearly parallel rows magnifies into a result off the sphere by ~1e-5."""
    p, x = _unit(previous.astype(np.float64)), _unit(fresh.astype(np.float64))
    cos = np.clip(np.einsum("nd,nd->n", p, x), -1.0, 1.0)
    angle = np.arccos(cos)
    turn = np.minimum(weight * angle, cap)
    tangent = x - cos[:, None] * p
    tangent_norm = np.linalg.norm(tangent, axis=1)
    defined = tangent_norm > _EPS
    direction = tangent / np.maximum(tangent_norm, _EPS)[:, None]
    rotated = np.cos(turn)[:, None] * p + np.sin(turn)[:, None] * direction
    # Parallel inputs: nothing to rotate (identical) or no defined direction (opposite).
    same = angle < np.pi / 2
    degenerate = np.where(same[:, None], x, p)
    return np.where(defined[:, None], rotated, degenerate).astype(np.float32)
