"""The live evaluation (sections 1 and 5) on the tiny preset: the real pipeline runs, every
number of the report is measured, and nothing is left running. No timing thresholds:
the numbers are the report's business."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from models.default import DEFAULT_VERSION
from service.evaluation.config import preset
from service.evaluation.live import READ_TARGETS, LatencySummary, ReadRow, run_live

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
    assert results.broker == "librdkafka mock cluster" and results.kafka_partitions >= 1
    assert results.model_version == DEFAULT_VERSION
    assert results.worker_provider != "unknown"
    check_reads(results.idle_reads, config.read_rate)

    (rate,) = results.rates
    assert rate.offered_rate == config.rates[0]
    assert rate.produced_rate > 0 and rate.ingested_rate > 0 and rate.embedded_rate > 0
    check_latency(rate.probes)
    assert rate.probes.count + rate.probe_timeouts >= config.probe_users
    assert rate.queue_samples and all(depth >= 0 for _, depth, _ in rate.queue_samples)
    assert rate.keeps_up == (not rate.shortfalls)
    check_reads(rate.reads, config.read_rate)

    assert results.saturation
    assert results.first_failing_rate == (None if rate.keeps_up else rate.offered_rate)
    fractions = [f for _, f in stages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
