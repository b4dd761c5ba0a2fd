"""The several-models benchmark runs end to end on a tiny configuration (numbers not
judged): every model's records are written, and the reads find them."""

from __future__ import annotations

import asyncio

import pytest

from service.bench.models import ModelsBenchConfig, model_names, run_models_bench
from service.bench.worker import synthetic_states
from service.store.redis import RedisStore


def test_models_bench_writes_every_models_records_and_prints_both_tables(
    clean_redis: str, capsys: pytest.CaptureFixture[str]
) -> None:
    config = ModelsBenchConfig(
        users=200, events_per_user=5, batch=64, reads=50, redis_url=clean_redis
    )
    worker, reads = run_models_bench(config)
    assert [r.models for r in worker] == [1, 2, 4]
    for row in worker:
        assert row.embeddings_per_s == pytest.approx(row.models * row.users_per_s)
    assert [r.name for r in reads] == ["raw GET, 1 record", "1 model", "3 models"]
    assert all(0 < r.p50_us <= r.p99_us for r in reads)

    users = list(synthetic_states(200, 5))

    async def records() -> list[int]:
        store = RedisStore(clean_redis)
        try:
            found = await store.get_model_embeddings(users, model_names(4))
        finally:
            await store.close()
        return [sum(r is not None for r in by_model) for by_model in found]

    assert asyncio.run(records()) == [len(users)] * 4
    out = capsys.readouterr().out
    assert "several models: sum-default-1 x N" in out and "3 models" in out
