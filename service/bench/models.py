"""Several models benchmark: what a second and a fourth model cost the worker and a read.

Worker: the committed default model served under 1, 2 and 4 names (one input
schema, so one claim, one fetch and one assemble feed them all) drains the same
dirty users through the pipelined loop against a real Redis; printed as users/s and
embeddings/s, next to ``1 model x N``, the cost N independent single-model workers
would pay. Read: one user's records of 1 and of 3 models in one round trip (the
store's ``get_model_embeddings``), next to a raw redis-py GET of one record, p50/p99
over the same users. Numbers are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass

import numpy as np
import redis
import redis.asyncio

from service.bench.worker import (
    WorkerBenchConfig,
    drain_written,
    load_bench_model,
    load_users,
    mark_all,
    synthetic_states,
)
from service.core.model_names import DEFAULT_MODEL
from service.store.redis import RedisStore
from service.store.redis_server import private_redis
from service.worker.embedding_worker import EmbeddingWorker, WorkerConfig
from service.worker.serving_model import ServingModel


@dataclass(frozen=True, slots=True)
class ModelsBenchConfig:
    users: int = 10_000
    events_per_user: int = 30
    batch: int = 256
    model_counts: Sequence[int] = (1, 2, 4)
    reads: int = 5_000
    redis_url: str | None = None


@dataclass(frozen=True, slots=True)
class WorkerModelsRow:
    models: int
    users_per_s: float
    embeddings_per_s: float


@dataclass(frozen=True, slots=True)
class ReadRow:
    name: str
    p50_us: float
    p99_us: float


def model_names(count: int) -> list[str]:
    return [DEFAULT_MODEL, *(f"m{i}" for i in range(1, count))]


async def _worker_rows(
    url: str, model: ServingModel, config: ModelsBenchConfig, users: list[str]
) -> list[WorkerModelsRow]:
    store = RedisStore(url, timeout_ms=10_000)
    rows = []
    try:
        worker_config = WorkerConfig(batch_size=config.batch, max_wait_ms=0, idle_sleep_ms=1)
        for count in config.model_counts:
            models = dict.fromkeys(model_names(count), model)
            worker = EmbeddingWorker(store, models, worker_config)
            await mark_all(store, users)  # warm: every model gets a record first
            await drain_written(worker, len(users) * count, pipelined=True)
            await mark_all(store, users)
            elapsed = await drain_written(worker, len(users) * count, pipelined=True)
            rows.append(WorkerModelsRow(count, len(users) / elapsed, count * len(users) / elapsed))
    finally:
        await store.close()
    return rows


def _percentiles(samples: list[float]) -> tuple[float, float]:
    values = np.asarray(samples) * 1e6
    return float(np.percentile(values, 50)), float(np.percentile(values, 99))


async def _read_rows(url: str, config: ModelsBenchConfig, users: list[str]) -> list[ReadRow]:
    store = RedisStore(url, timeout_ms=10_000)
    raw = redis.asyncio.Redis.from_url(url)
    picks = random.Random(0).choices(users, k=config.reads)
    keys = [store.layout.embedding_key(u) for u in picks]
    timings: dict[str, list[float]] = {"raw GET, 1 record": [], "1 model": [], "3 models": []}
    three = model_names(3)
    try:
        for user, key in zip(picks, keys, strict=True):
            calls: dict[str, Awaitable[object]] = {
                "raw GET, 1 record": raw.get(key),
                "1 model": store.get_model_embeddings([user], [DEFAULT_MODEL]),
                "3 models": store.get_model_embeddings([user], three),
            }
            for name, call in calls.items():
                started = time.perf_counter()
                await call
                timings[name].append(time.perf_counter() - started)
    finally:
        await raw.aclose()
        await store.close()
    return [ReadRow(name, *_percentiles(samples)) for name, samples in timings.items()]


def _print(worker: list[WorkerModelsRow], reads: list[ReadRow], model: ServingModel) -> None:
    one = next((r for r in worker if r.models == 1), None)
    print(
        f"several models: {model.version} x N on {model.runtime.provider}, one worker "
        "process, real Redis"
    )
    print(f"{'models':>6} {'users/s':>9} {'emb/s':>9} {'emb/s per model':>16} {'vs 1 x N':>9}")
    for row in worker:
        versus = "" if one is None else f"{row.users_per_s / (one.users_per_s / row.models):8.2f}x"
        print(
            f"{row.models:>6} {row.users_per_s:>9,.0f} {row.embeddings_per_s:>9,.0f} "
            f"{row.embeddings_per_s / row.models:>16,.0f} {versus:>9}"
        )
    print("(vs 1 x N: users/s against N single-model workers taking turns on one process)")
    print(f"\none user's records, one round trip each: {'p50 us':>8} {'p99 us':>8}")
    for read in reads:
        print(f"  {read.name:<37} {read.p50_us:>8.0f} {read.p99_us:>8.0f}")


def run_models_bench(config: ModelsBenchConfig) -> tuple[list[WorkerModelsRow], list[ReadRow]]:
    model = load_bench_model(WorkerBenchConfig(batch_sizes=(config.batch,), provider="cpu"))
    states = synthetic_states(config.users, config.events_per_user)
    users = list(states)

    async def run(url: str) -> tuple[list[WorkerModelsRow], list[ReadRow]]:
        store = RedisStore(url, timeout_ms=10_000)
        try:
            await load_users(store, states)
        finally:
            await store.close()
        return await _worker_rows(url, model, config, users), await _read_rows(url, config, users)

    if config.redis_url:
        redis.Redis.from_url(config.redis_url).flushdb()
        worker, reads = asyncio.run(run(config.redis_url))
    else:
        with private_redis() as url:
            worker, reads = asyncio.run(run(url))
    _print(worker, reads, model)
    return worker, reads
