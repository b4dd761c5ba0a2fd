"""The live part's results (sections 1 and 5) and the keep-up rule that judges them.

Every field is JSON-able through :func:`dataclasses.asdict` (numbers, strings, lists,
dicts, None; never NaN). The rule itself is described in :mod:`service.evaluation.live`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

MOCK_BROKER: Final = "librdkafka mock cluster"  # LiveResults.broker without a bootstrap
READ_TARGETS: Final = ("api-http", "api-grpc", "redis-get")  # HTTP, gRPC, the baseline
MIN_PRODUCED_SHARE: Final = 0.9
MAX_LAG_GROWTH_EVENTS_PER_S: Final = 50.0
MAX_LAG_GROWTH_SHARE: Final = 0.02
MAX_GROWTH_USERS_PER_S: Final = 50.0
MAX_GROWTH_SHARE: Final = 0.01
MAX_OLDEST_AGE_MS: Final = 1_000


@dataclass(frozen=True, slots=True)
class LatencySummary:
    """Milliseconds; ``count`` 0 means nothing was measured and every value is 0.0."""

    count: int
    p50_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    mean_ms: float

    @classmethod
    def of(cls, latencies_ms: Sequence[float]) -> LatencySummary:
        if not latencies_ms:
            return cls(0, 0.0, 0.0, 0.0, 0.0, 0.0)
        values = np.asarray(latencies_ms, dtype=np.float64)
        p50, p99, p999 = np.percentile(values, [50, 99, 99.9]).tolist()
        return cls(len(values), p50, p99, p999, float(values.max()), float(values.mean()))


@dataclass(frozen=True, slots=True)
class ReadRow:
    """One target read open-loop at ``rate`` req/s (see :mod:`service.evaluation.open_loop`)."""

    target: str  # api-http | api-grpc | redis-get
    rate: float
    achieved_rate: float  # answered requests per second
    errors: dict[str, int]  # kind (timeout, bad answer, an exception's class) -> count
    latency: LatencySummary

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())


def read_row(rows: Sequence[ReadRow], target: str) -> ReadRow | None:
    """The row of ``target`` among one load's reads, if it was measured."""
    return next((r for r in rows if r.target == target), None)


@dataclass(frozen=True, slots=True)
class RateResult:
    """One background event rate: freshness probes, throughputs, the dirty queue, reads."""

    offered_rate: float
    # Events/s are background traffic: the probes' own events are subtracted.
    produced_rate: float  # appended to the topic (its log-end offsets)
    ingested_rate: float  # userembed_ingest_events_total{outcome=applied}
    embedded_rate: float  # userembed_worker_embeddings_total, probe users' included (users/s)
    probe_event_rate: float  # the probes' own events/s, on top of the background
    probes: LatencySummary
    probe_timeouts: int
    queue_depth_start: int
    queue_depth_end: int
    queue_growth_per_s: float  # least-squares slope of the depth over the probe window
    oldest_dirty_age_end_ms: int
    oldest_dirty_age_median_ms: int  # over the probe window's samples
    kafka_lag_end: int  # messages appended but not committed by ingest
    kafka_lag_growth_per_s: float  # (lag at the window's end - at its start) / seconds
    queue_samples: list[tuple[float, int, int]]  # (s since the traffic began, depth, age ms)
    keeps_up: bool
    shortfalls: list[str]  # why it does not keep up; empty when it does
    drained_before: bool  # lag and dirty queue were empty when this rate began
    drain_before_s: float
    reads: list[ReadRow]


@dataclass(frozen=True, slots=True)
class LiveResults:
    config: dict[str, Any]  # dataclasses.asdict of the LiveConfig
    commit: str
    broker: str
    kafka_partitions: int  # of the topic as created (the mock cluster always makes 4)
    settings_overrides: dict[str, str]  # what the roles ran with besides the defaults
    model_version: str
    worker_provider: str
    idle_reads: list[ReadRow]
    rates: list[RateResult]
    saturation: str
    first_failing_rate: float | None
    seconds: float


@dataclass(frozen=True, slots=True)
class Measured:
    """The numbers the keep-up rule (:mod:`service.evaluation.live`) looks at."""

    offered: float
    produced: float
    lag_growth: float  # Kafka lag, events/s
    timeouts: int
    growth: float
    age_median_ms: int

    def shortfalls(self, probe_timeout_s: float) -> list[str]:
        found = []
        if self.produced < MIN_PRODUCED_SHARE * self.offered:
            found.append(f"the producer reached only {self.produced:,.0f} events/s")
        if self.lag_growth > max(MAX_LAG_GROWTH_EVENTS_PER_S, MAX_LAG_GROWTH_SHARE * self.offered):
            found.append(
                f"ingest fell behind: the Kafka lag grew by {self.lag_growth:,.0f} events/s"
            )
        if self.timeouts:
            found.append(f"{self.timeouts} probes were not served within {probe_timeout_s:g} s")
        if self.growth > max(MAX_GROWTH_USERS_PER_S, MAX_GROWTH_SHARE * self.offered):
            found.append(f"the dirty queue grew by {self.growth:,.0f} users/s")
        if self.age_median_ms > MAX_OLDEST_AGE_MS:
            found.append(f"the oldest dirty user waited {self.age_median_ms / 1000:.1f} s (median)")
        return found


def slope(points: Sequence[tuple[float, float]]) -> float:
    """Least-squares slope of y over t; 0.0 with fewer than two distinct times."""
    if len(points) < 2:
        return 0.0
    t = np.array([p[0] for p in points])
    y = np.array([p[1] for p in points])
    spread = float(((t - t.mean()) ** 2).sum())
    return float(((t - t.mean()) * (y - y.mean())).sum() / spread) if spread > 0 else 0.0


def saturation(rates: Sequence[RateResult]) -> tuple[str, float | None]:
    """One sentence on where the pipeline stops keeping up, and the first failing rate."""
    failing = next((r for r in rates if not r.keeps_up), None)
    if failing is None:
        top = max(r.offered_rate for r in rates)
        return f"keeps up at every measured rate (up to {top:,.0f} events/s)", None
    why = "; ".join(failing.shortfalls)
    kept = [r.offered_rate for r in rates if r.keeps_up and r.offered_rate < failing.offered_rate]
    if kept:
        sentence = f"keeps up through {max(kept):,.0f} events/s; at {failing.offered_rate:,.0f} "
        return sentence + f"events/s {why}", failing.offered_rate
    return f"does not keep up at {failing.offered_rate:,.0f} events/s: {why}", failing.offered_rate
