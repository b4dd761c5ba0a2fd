"""Worker benchmark: embeddings/s per worker against a real Redis, by batch size.

For each batch size, three numbers from the same process and the same users:
``pipelined`` (the production loop: fetch, infer and write of consecutive batches
overlap), ``sequential`` (one batch start to end at a time, the baseline), and
``model only`` (the model on pre-assembled tensors: the ceiling if Redis and
assembly were free). The stage split is milliseconds per batch from the worker's
own stage histograms. All users have a served record first, so stabilization
runs as in production. Numbers are printed, never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import redis
from prometheus_client import REGISTRY

from service.core.clock import now_ms
from service.core.events import SourcedEvent
from service.core.features import FeatureState, apply_events
from service.core.tensors import assemble
from service.ingest.synthetic import SyntheticTraffic
from service.store.redis import RedisStore
from service.store.redis_server import private_redis
from service.worker.embedding_worker import EmbeddingWorker, WorkerConfig
from service.worker.runtime import Precision
from service.worker.serving_model import ServingModel, load_serving_model

STAGES = ("fetch", "assemble", "infer", "stabilize", "write")


@dataclass(frozen=True, slots=True)
class WorkerBenchConfig:
    users: int = 20_000
    events_per_user: int = 30
    batch_sizes: Sequence[int] = (64, 256, 1024)
    redis_url: str | None = None
    intra_op_threads: int = 0
    precision: Precision = "auto"


@dataclass(frozen=True, slots=True)
class WorkerBenchRow:
    batch: int
    mode: str
    embeddings_per_s: float
    stage_ms: dict[str, float]  # mean milliseconds per batch


def _stage_totals() -> dict[str, tuple[float, float]]:
    """(sum seconds, count) of each stage histogram so far."""
    totals = {}
    for stage in STAGES:
        labels = {"stage": stage}
        total = REGISTRY.get_sample_value("userembed_worker_stage_seconds_sum", labels) or 0.0
        count = REGISTRY.get_sample_value("userembed_worker_stage_seconds_count", labels) or 0.0
        totals[stage] = (total, count)
    return totals


def _stage_ms(before: dict[str, tuple[float, float]]) -> dict[str, float]:
    after = _stage_totals()
    split = {}
    for stage in STAGES:
        total = after[stage][0] - before[stage][0]
        count = after[stage][1] - before[stage][1]
        split[stage] = 1e3 * total / count if count else 0.0
    return split


def synthetic_states(users: int, events_per_user: int) -> dict[str, FeatureState]:
    """Feature states of ``users`` synthetic users, built with the ingest code path."""
    events = SyntheticTraffic(users, seed=5).events(users * events_per_user, now_ms())
    by_user: dict[str, list[SourcedEvent]] = defaultdict(list)
    for offset, event in enumerate(events):
        by_user[event.user_id].append(SourcedEvent(event, 0, offset))
    return {
        user_id: apply_events(FeatureState.empty(), log, 50)[0] for user_id, log in by_user.items()
    }


async def _load_users(store: RedisStore, states: dict[str, FeatureState]) -> None:
    items = list(states.items())
    for start in range(0, len(items), 2000):
        await store.put_features(dict(items[start : start + 2000]))


async def _mark_all(store: RedisStore, users: list[str]) -> None:
    now = now_ms()
    for start in range(0, len(users), 5000):
        await store.mark_dirty(dict.fromkeys(users[start : start + 5000], now))


async def _drain(worker: EmbeddingWorker, expected: int, pipelined: bool) -> float:
    """Seconds until ``expected`` more embeddings are written."""
    target = worker.embedded_total + expected
    started = time.perf_counter()
    if pipelined:
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        while worker.embedded_total < target:
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        stop.set()
        await task
        return elapsed
    while worker.embedded_total < target:
        await worker.run_once()
    return time.perf_counter() - started


def _model_only(model: ServingModel, states: list[FeatureState], batch: int) -> float:
    tensors = assemble(states[:batch], now_ms(), model.runtime.schema)
    model.embed(tensors)
    rounds = max(3, 20_000 // batch)
    started = time.perf_counter()
    for _ in range(rounds):
        model.embed(tensors)
    return rounds * batch / (time.perf_counter() - started)


async def _measure(
    redis_url: str, model: ServingModel, config: WorkerBenchConfig
) -> list[WorkerBenchRow]:
    states = synthetic_states(config.users, config.events_per_user)
    users = list(states)
    store = RedisStore(redis_url, timeout_ms=10_000)
    rows: list[WorkerBenchRow] = []
    try:
        await _load_users(store, states)
        warm = EmbeddingWorker(store, model, WorkerConfig(batch_size=256, max_wait_ms=0))
        await _mark_all(store, users)
        await _drain(warm, len(users), pipelined=True)  # every user now has a served record
        for batch in config.batch_sizes:
            worker_config = WorkerConfig(batch_size=batch, max_wait_ms=0, idle_sleep_ms=1)
            for mode, pipelined in (("pipelined", True), ("sequential", False)):
                worker = EmbeddingWorker(store, model, worker_config)
                await _mark_all(store, users)
                before = _stage_totals()
                elapsed = await _drain(worker, len(users), pipelined)
                rows.append(WorkerBenchRow(batch, mode, len(users) / elapsed, _stage_ms(before)))
            rate = _model_only(model, list(states.values()), batch)
            rows.append(WorkerBenchRow(batch, "model only", rate, {}))
    finally:
        await store.close()
    return rows


@contextlib.contextmanager
def _redis(config: WorkerBenchConfig) -> Iterator[str]:
    if config.redis_url:
        yield config.redis_url
        return
    with private_redis() as url:
        yield url


def print_rows(rows: Sequence[WorkerBenchRow], header: str) -> None:
    print(header)
    stages = "".join(f"{s:>10}" for s in STAGES)
    print(f"{'batch':>6} {'mode':<11} {'emb/s':>9}{stages}   (ms per batch)")
    for row in rows:
        split = "".join(f"{row.stage_ms[s]:>10.2f}" for s in STAGES if s in row.stage_ms)
        print(f"{row.batch:>6} {row.mode:<11} {row.embeddings_per_s:>9,.0f}{split}")


def run_worker_bench(config: WorkerBenchConfig) -> list[WorkerBenchRow]:
    from models.default import DEFAULT_REGISTRY, DEFAULT_VERSION

    model = load_serving_model(
        DEFAULT_REGISTRY,
        DEFAULT_VERSION,
        intra_op_threads=config.intra_op_threads,
        precision=config.precision,
        warm_up_batches=sorted({1, *config.batch_sizes}),
    )
    with _redis(config) as redis_url:
        redis.Redis.from_url(redis_url).flushdb()
        rows = asyncio.run(_measure(redis_url, model, config))
    print_rows(
        rows,
        f"worker benchmark: model {model.version} on {model.runtime.provider} "
        f"({model.runtime.precision}), {config.users:,} users, real Redis",
    )
    return rows
