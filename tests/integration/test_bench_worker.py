"""The worker benchmark runs end to end on a tiny configuration (numbers not judged)."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from service.bench.worker import (
    STAGES,
    WorkerBenchConfig,
    _start_pool,
    load_bench_model,
    run_worker_bench,
)
from service.worker.runtime import CUDA


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


def test_worker_processes_drain_together_and_the_numbers_land_in_json(
    clean_redis: str, tmp_path: Path
) -> None:
    """Two spawned worker processes give one more pipelined row; the JSON holds every row."""
    out = tmp_path / "worker.json"
    config = WorkerBenchConfig(
        users=200,
        events_per_user=3,
        batch_sizes=(64,),
        redis_url=clean_redis,
        intra_op_threads=1,
        precision="fp32",
        provider="cpu",
        processes=(1, 2),
        json_path=out,
    )
    rows = run_worker_bench(config)
    assert [(r.batch, r.processes, r.mode) for r in rows] == [
        (64, 1, "pipelined"),
        (64, 1, "sequential"),
        (64, 1, "model only"),
        (64, 2, "pipelined"),
    ]
    assert all(r.embeddings_per_s > 0 for r in rows)
    assert rows[-1].stage_ms["infer"] > 0  # the processes' own stage split, averaged
    document = json.loads(out.read_text())
    assert (document["provider"], document["precision"]) == ("CPUExecutionProvider", "fp32")
    assert [(r["processes"], r["mode"]) for r in document["rows"]] == [
        (r.processes, r.mode) for r in rows
    ]
    assert [r["embeddings_per_s"] for r in document["rows"]] == [r.embeddings_per_s for r in rows]


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_asking_for_cuda_without_it_fails_instead_of_measuring_the_cpu() -> None:
    with pytest.raises(RuntimeError, match="--provider cuda: this session got CPU"):
        load_bench_model(WorkerBenchConfig(batch_sizes=(8,), provider="cuda"))


@pytest.mark.skipif(CUDA in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_a_worker_process_that_fails_fails_the_round_with_its_error(clean_redis: str) -> None:
    config = WorkerBenchConfig(batch_sizes=(8,), provider="cuda", redis_url=clean_redis)
    pool = _start_pool(clean_redis, config, 1)
    try:
        with pytest.raises(RuntimeError, match=r"process 0: RuntimeError: .*--provider cuda"):
            pool.round(clean_redis, ["u1"], 8)
    finally:
        pool.close()
