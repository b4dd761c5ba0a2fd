"""The live evaluation (sections 1 and 5) on the tiny preset: the real pipeline runs, every
number of the report is measured, and nothing is left running. No timing thresholds:
the numbers are the report's business."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from models.default import DEFAULT_VERSION
from service.evaluation.config import preset
from service.evaluation.live import READ_TARGETS, LatencySummary, ReadRow, run_live
from service.evaluation.live_results import Measured, slope

pytestmark = pytest.mark.slow


def children() -> set[int]:
    """PIDs whose parent is this process (zombies included: they were never reaped)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            found.add(int(stat.parent.name))
    return found


def check_latency(summary: LatencySummary) -> None:
    assert summary.count > 0
    assert 0 < summary.p50_ms <= summary.p99_ms <= summary.p999_ms <= summary.max_ms
    assert summary.mean_ms > 0


def check_reads(rows: list[ReadRow], rate: float) -> None:
    assert [r.target for r in rows] == list(READ_TARGETS)
    for row in rows:
        assert row.rate == rate and row.achieved_rate > 0
        check_latency(row.latency)
        if row.target != "redis-get":
            assert row.error_count == 0, row


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_tiny_live_run_measures_every_section_and_cleans_up() -> None:
    config = preset("tiny").live
    before = children()
    stages: list[tuple[str, float]] = []

    results = run_live(config, lambda stage, fraction: stages.append((stage, fraction)))

    assert children() <= before, "a role, producer or redis-server outlived the run"
    json.dumps(asdict(results), allow_nan=False)
    assert results.config == asdict(config)
    assert results.commit and results.seconds > 0
    assert (results.broker, results.kafka_partitions) == ("librdkafka mock cluster", 4)
    assert results.model_version == DEFAULT_VERSION
    assert results.worker_provider != "unknown"
    check_reads(results.idle_reads, config.read_rate)

    (rate,) = results.rates
    assert rate.offered_rate == config.rates[0]
    assert rate.produced_rate > 0 and rate.ingested_rate > 0 and rate.embedded_rate > 0
    check_latency(rate.probes)
    assert rate.probes.count + rate.probe_timeouts >= config.probe_users
    assert rate.queue_samples and all(depth >= 0 for _, depth, _ in rate.queue_samples)
    # The verdict follows, by the rule unit-tested in test_evaluation_live_results, from
    # the very numbers the report shows: the probe window's samples, slope and median.
    window = [s for s in rate.queue_samples if s[0] >= config.warmup_s] or rate.queue_samples
    assert rate.queue_growth_per_s == pytest.approx(slope([(t, float(d)) for t, d, _ in window]))
    assert rate.oldest_dirty_age_median_ms == int(np.median([age for _, _, age in window]))
    reported = Measured(
        rate.offered_rate,
        rate.produced_rate,
        rate.kafka_lag_growth_per_s,
        rate.probe_timeouts,
        rate.queue_growth_per_s,
        rate.oldest_dirty_age_median_ms,
    )
    assert rate.shortfalls == reported.shortfalls(config.probe_timeout_s)
    check_reads(rate.reads, config.read_rate)

    offered = f"{rate.offered_rate:,.0f} events/s"
    assert results.saturation == (
        f"does not keep up at {offered}: {'; '.join(rate.shortfalls)}"
        if rate.shortfalls
        else f"keeps up at every measured rate (up to {offered})"
    )
    assert results.first_failing_rate == (rate.offered_rate if rate.shortfalls else None)
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
