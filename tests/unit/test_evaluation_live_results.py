"""The keep-up rule of the live evaluation, the saturation sentence and probe retirement."""

from __future__ import annotations

from dataclasses import replace

import pytest

from service.evaluation.live_results import LatencySummary, Measured, RateResult, saturation, slope
from service.evaluation.probes import _retired

KEEPING_UP = Measured(
    offered=10_000.0, produced=10_000.0, lag_growth=0.0, timeouts=0, growth=0.0, age_median_ms=0
)


def _measured(**changes: float) -> Measured:
    return replace(KEEPING_UP, **changes)


def test_a_rate_that_meets_every_condition_has_no_shortfall() -> None:
    assert _measured().shortfalls(10.0) == []
    # the tolerances: 2% of the offered rate of Kafka lag, 1% of it of queue growth
    assert _measured(lag_growth=200.0, growth=100.0, age_median_ms=1_000).shortfalls(10.0) == []


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"produced": 8_000.0}, "the producer reached only 8,000 events/s"),
        ({"lag_growth": 1_800.0}, "the Kafka lag grew by 1,800 events/s"),
        ({"timeouts": 3}, "3 probes were not served within 10 s"),
        ({"growth": 150.0}, "the dirty queue grew by 150 users/s"),
        ({"age_median_ms": 2_500}, "the oldest dirty user waited 2.5 s"),
    ],
)
def test_each_failed_condition_is_named(changes: dict[str, float], reason: str) -> None:
    (found,) = _measured(**changes).shortfalls(10.0)
    assert reason in found


def test_low_rates_get_an_absolute_tolerance() -> None:
    # at 1,000 events/s, 2% would be 20 events/s: below the noise of batch commits
    assert _measured(offered=1_000.0, produced=1_000.0, lag_growth=49.0).shortfalls(10.0) == []
    assert _measured(offered=1_000.0, produced=1_000.0, lag_growth=51.0).shortfalls(10.0) != []


def test_slope_is_least_squares_and_zero_without_spread() -> None:
    assert slope([(0.0, 1.0), (1.0, 3.0), (2.0, 5.0)]) == pytest.approx(2.0)
    assert slope([(1.0, 4.0)]) == 0.0
    assert slope([(1.0, 4.0), (1.0, 9.0)]) == 0.0


def _rate(offered: float, shortfalls: list[str]) -> RateResult:
    empty = LatencySummary.of([])
    return RateResult(
        offered, offered, offered, offered, 0.0, empty, 0, 0, 0, 0.0, 0, 0, 0, 0.0, [],
        keeps_up=not shortfalls, shortfalls=shortfalls, drained_before=True,
        drain_before_s=0.0, reads=[],
    )  # fmt: skip


def test_saturation_names_the_last_rate_kept_and_the_first_failing_one() -> None:
    rates = [_rate(1_000, []), _rate(5_000, []), _rate(20_000, ["x"]), _rate(40_000, ["y"])]
    sentence, first = saturation(rates)
    assert first == 20_000
    assert sentence == "keeps up through 5,000 events/s; at 20,000 events/s x"
    assert saturation(rates[:2]) == ("keeps up at every measured rate (up to 5,000 events/s)", None)
    assert saturation(rates[2:])[0] == "does not keep up at 20,000 events/s: x"


def test_a_timed_out_probe_slot_moves_to_a_user_never_written_before() -> None:
    assert _retired("probe-3") == "probe-3.r1"
    assert _retired("probe-3.r1") == "probe-3.r2"
    assert _retired(_retired(_retired("probe-12"))) == "probe-12.r3"
