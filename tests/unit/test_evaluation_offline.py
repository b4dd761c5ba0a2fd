"""The bookkeeping of the offline sections: serve sequences, jitter, whole-user samples."""

from __future__ import annotations

import numpy as np

from models.impressions import ImpressionLog
from service.evaluation.offline import _stabilization_row, _whole_users


def _log(users: list[int], times: list[int]) -> ImpressionLog:
    n = len(users)
    zeros = np.zeros(n, dtype=np.int64)
    return ImpressionLog(
        np.asarray(users, dtype=np.int64),
        [f"u{i}" for i in range(max(users) + 1)],
        np.asarray(times, dtype=np.int64),
        zeros,
        zeros,
        np.zeros(n, dtype=np.float32),
    )


def _unit(rows: np.ndarray) -> np.ndarray:
    out: np.ndarray = (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)
    return out


def test_jitter_compares_consecutive_serves_of_the_same_user_only() -> None:
    # rows out of time order and interleaved across users on purpose
    log = _log([1, 0, 1, 0], [2_000, 1_000, 1_000, 3_000])
    fresh = _unit(np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]))
    seen: list[np.ndarray] = []

    def score(served: np.ndarray) -> tuple[float, float]:
        seen.append(served)
        return 0.5, 1.0

    off = _stabilization_row(None, log, fresh, score)
    # user 0: (1,0) -> (0,1); user 1: (1,0) at t=1000 -> (0,1) at t=2000: two right angles
    assert off.pairs == 2
    assert off.jitter_mean == 1.0
    np.testing.assert_array_equal(seen[0], fresh)  # served in the caller's row order
    on = _stabilization_row(60.0, log, fresh, score)
    assert on.pairs == 2
    assert 0.0 < on.jitter_mean < off.jitter_mean
    assert on.mean_cosine_to_fresh < off.mean_cosine_to_fresh == 1.0
    # the first serve of each user has no previous one: it is the fresh vector
    np.testing.assert_allclose(seen[1][[1, 2]], fresh[[1, 2]], atol=1e-6)


def test_whole_users_keeps_every_impression_of_the_users_it_keeps() -> None:
    log = _log([0, 1, 2, 0, 1, 2, 0, 3], [1, 2, 3, 4, 5, 6, 7, 8])
    kept = _whole_users(log, limit=4)
    users = np.unique(kept.users)
    assert 0 < len(kept) <= 4 or users.size == 1
    for u in users.tolist():
        assert (kept.users == u).sum() == (log.users == u).sum()
    assert np.all(np.diff(kept.times) > 0)
