"""The worker benchmark runs end to end on a tiny configuration (numbers not judged)."""

from __future__ import annotations

import pytest

from service.bench.worker import STAGES, WorkerBenchConfig, run_worker_bench


def test_worker_bench_prints_every_mode_with_a_stage_split(
    clean_redis: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = WorkerBenchConfig(
        users=300, events_per_user=5, batch_sizes=(32, 128), redis_url=clean_redis
    )
    rows = run_worker_bench(config)
    assert [(r.batch, r.mode) for r in rows] == [
        (batch, mode) for batch in (32, 128) for mode in ("pipelined", "sequential", "model only")
    ]
    assert all(r.embeddings_per_s > 0 for r in rows)
    for row in rows:
        if row.mode != "model only":
            assert set(row.stage_ms) == set(STAGES) and row.stage_ms["infer"] > 0
    out = capsys.readouterr().out
    assert "worker benchmark: model sum-default-1" in out and "pipelined" in out
