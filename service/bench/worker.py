"""Worker benchmark: embeddings/s per worker against a real Redis, by batch size.

For each batch size, three numbers from the same process and the same users:
``pipelined`` (the production loop: fetch, infer and write of consecutive batches
overlap), ``sequential`` (one batch start to end at a time, the baseline), and
``model only`` (the model on pre-assembled tensors: the ceiling if Redis and
assembly were free). The stage split is milliseconds per batch from the worker's
own stage histograms. All users have a served record first, so stabilization
runs as in production. With ``processes`` above one, that many worker processes
(each its own model, as in production) drain the same dirty set: one more
``pipelined`` row per batch size, the aggregate rate. Numbers are printed (and
written as JSON on request), never asserted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import multiprocessing.synchronize
import queue
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

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
from service.worker.runtime import CUDA, OnnxModelRuntime, Precision, usable_cores
from service.worker.serving_model import ServingModel, warm_up

STAGES = ("fetch", "assemble", "infer", "stabilize", "write")
Provider = Literal["auto", "cuda", "cpu"]


@dataclass(frozen=True, slots=True)
class WorkerBenchConfig:
    users: int = 20_000
    events_per_user: int = 30
    batch_sizes: Sequence[int] = (64, 256, 1024)
    redis_url: str | None = None
    intra_op_threads: int = 0
    precision: Precision = "auto"
    provider: Provider = "auto"  # auto = CUDA when this onnxruntime has it, else the CPU
    processes: Sequence[int] = (1,)  # worker processes; 1 is measured in this process
    json_path: Path | None = None


@dataclass(frozen=True, slots=True)
class WorkerBenchRow:
    batch: int
    mode: str
    embeddings_per_s: float
    stage_ms: dict[str, float]  # mean milliseconds per batch
    processes: int = 1


def load_bench_model(config: WorkerBenchConfig, threads: int | None = None) -> ServingModel:
    """The committed default model on the provider asked for, warmed up at every batch size.

    ``provider="cuda"`` fails, rather than measuring the CPU under a CUDA label, when
    ONNX Runtime could not give this session the CUDA provider.
    """
    from models.default import DEFAULT_REGISTRY, DEFAULT_VERSION
    from models.registry import load_artifact, served_space

    artifact = load_artifact(DEFAULT_REGISTRY, DEFAULT_VERSION)
    runtime = OnnxModelRuntime.from_artifact(
        artifact,
        prefer_gpu=config.provider != "cpu",
        intra_op_threads=config.intra_op_threads if threads is None else threads,
        precision=config.precision,
    )
    if config.provider == "cuda" and runtime.provider != CUDA:
        raise RuntimeError(
            f"bench worker --provider cuda: this session got {runtime.provider} "
            "(onnxruntime-gpu not installed, or its CUDA/cuDNN libraries not on "
            "LD_LIBRARY_PATH; see docs/gpu.md)"
        )
    space, to_space = served_space(DEFAULT_REGISTRY, artifact)
    model = ServingModel(runtime, space, to_space, artifact.manifest.normalized)
    warm_up(model, sorted({1, *config.batch_sizes}))
    return model


def _stage_totals() -> dict[str, tuple[float, float]]:
    """(sum seconds, count) of each stage histogram so far, over every model."""
    totals = dict.fromkeys(STAGES, (0.0, 0.0))
    for family in REGISTRY.collect():
        if family.name != "userembed_worker_stage_seconds":
            continue
        for sample in family.samples:
            stage = sample.labels.get("stage", "")
            total, count = totals.get(stage, (0.0, 0.0))
            if sample.name.endswith("_sum"):
                totals[stage] = (total + sample.value, count)
            elif sample.name.endswith("_count"):
                totals[stage] = (total, count + sample.value)
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


async def load_users(store: RedisStore, states: dict[str, FeatureState]) -> None:
    items = list(states.items())
    for start in range(0, len(items), 2000):
        await store.put_features(dict(items[start : start + 2000]))


async def mark_all(store: RedisStore, users: list[str]) -> None:
    now = now_ms()
    for start in range(0, len(users), 5000):
        await store.mark_dirty(dict.fromkeys(users[start : start + 5000], now))


async def drain_written(worker: EmbeddingWorker, expected: int, pipelined: bool) -> float:
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


async def _prepare(redis_url: str, model: ServingModel, states: dict[str, FeatureState]) -> None:
    """Load every user's features and give each a served record (stabilization runs)."""
    store = RedisStore(redis_url, timeout_ms=10_000)
    try:
        await load_users(store, states)
        warm = EmbeddingWorker(store, model, WorkerConfig(batch_size=256, max_wait_ms=0))
        await mark_all(store, list(states))
        await drain_written(warm, len(states), pipelined=True)
    finally:
        await store.close()


async def _measure(
    redis_url: str, model: ServingModel, config: WorkerBenchConfig, states: dict[str, FeatureState]
) -> list[WorkerBenchRow]:
    users = list(states)
    store = RedisStore(redis_url, timeout_ms=10_000)
    rows: list[WorkerBenchRow] = []
    try:
        for batch in config.batch_sizes:
            worker_config = WorkerConfig(batch_size=batch, max_wait_ms=0, idle_sleep_ms=1)
            for mode, pipelined in (("pipelined", True), ("sequential", False)):
                worker = EmbeddingWorker(store, model, worker_config)
                await mark_all(store, users)
                before = _stage_totals()
                elapsed = await drain_written(worker, len(users), pipelined)
                rows.append(WorkerBenchRow(batch, mode, len(users) / elapsed, _stage_ms(before)))
            rate = _model_only(model, list(states.values()), batch)
            rows.append(WorkerBenchRow(batch, "model only", rate, {}))
    finally:
        await store.close()
    return rows


async def _mark_users(redis_url: str, users: list[str]) -> None:
    store = RedisStore(redis_url, timeout_ms=10_000)
    try:
        await mark_all(store, users)
    finally:
        await store.close()


@dataclass(frozen=True, slots=True)
class _Channels:
    """What the parent and its worker processes share (handed over at spawn)."""

    commands: Any  # multiprocessing queues (their generic types are not importable)
    replies: Any
    counts: Any  # one shared int per process: embeddings written this round
    go: multiprocessing.synchronize.Event
    stop: multiprocessing.synchronize.Event


@dataclass(frozen=True, slots=True)
class _Pool:
    """Worker processes that drain the dirty set together, one round per batch size."""

    channels: _Channels
    processes: list[multiprocessing.process.BaseProcess]

    def round(self, redis_url: str, users: list[str], batch: int) -> WorkerBenchRow:
        channels = self.channels
        for _ in self.processes:
            channels.commands.put(batch)
        self._await_replies()  # every process has its worker for this batch size
        asyncio.run(_mark_users(redis_url, users))
        started = time.perf_counter()
        channels.go.set()
        while sum(channels.counts) < len(users):
            if not all(process.is_alive() for process in self.processes):
                with contextlib.suppress(queue.Empty):  # its error, when it could send one
                    self._await_replies(timeout_s=5)
                raise RuntimeError("a bench worker process exited before the round ended")
            time.sleep(0.002)
        elapsed = time.perf_counter() - started
        channels.stop.set()
        splits = self._await_replies()
        channels.go.clear()
        channels.stop.clear()
        stage_ms = {s: sum(split[s] for split in splits) / len(splits) for s in STAGES}
        return WorkerBenchRow(batch, "pipelined", len(users) / elapsed, stage_ms, len(splits))

    def _await_replies(self, timeout_s: float = 600) -> list[dict[str, float]]:
        replies = [self.channels.replies.get(timeout=timeout_s) for _ in self.processes]
        failed = [r for r in replies if isinstance(r, str)]
        if failed:
            raise RuntimeError(f"a bench worker process failed: {failed[0]}")
        return replies

    def close(self) -> None:
        for _ in self.processes:
            self.channels.commands.put(None)
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()


def _start_pool(redis_url: str, config: WorkerBenchConfig, processes: int) -> _Pool:
    # spawn, not fork: a forked child would share the parent's ONNX Runtime / CUDA state
    context = multiprocessing.get_context("spawn")
    threads = config.intra_op_threads
    if not threads and config.provider == "cpu":
        threads = max(1, usable_cores() // processes)  # the processes share the cores
    channels = _Channels(
        commands=context.Queue(),
        replies=context.Queue(),
        counts=context.Array("q", processes),
        go=context.Event(),
        stop=context.Event(),
    )
    pool = _Pool(channels, [])
    for index in range(processes):
        process = context.Process(
            target=_child_main,
            args=(index, redis_url, config, threads, channels),
            name=f"bench-worker-{index}",
            daemon=True,
        )
        process.start()
        pool.processes.append(process)
    return pool


def _child_main(
    index: int, redis_url: str, config: WorkerBenchConfig, threads: int, channels: _Channels
) -> None:
    """One worker process: per command (a batch size) a fresh worker drains until stop."""
    try:
        model = load_bench_model(config, threads)
        while (batch := channels.commands.get()) is not None:
            channels.counts[index] = 0
            split = asyncio.run(_child_round(index, redis_url, model, batch, channels))
            channels.replies.put(split)
    except Exception as exc:  # reported to the parent, which raises it
        channels.replies.put(f"process {index}: {type(exc).__name__}: {exc}")


async def _child_round(
    index: int, redis_url: str, model: ServingModel, batch: int, channels: _Channels
) -> dict[str, float]:
    store = RedisStore(redis_url, timeout_ms=10_000)
    worker_config = WorkerConfig(batch_size=batch, max_wait_ms=0, idle_sleep_ms=1)
    worker = EmbeddingWorker(store, model, worker_config)
    channels.replies.put({})  # ready
    try:
        while not channels.go.is_set():
            await asyncio.sleep(0.001)
        before = _stage_totals()
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        while not channels.stop.is_set():
            channels.counts[index] = worker.embedded_total
            await asyncio.sleep(0.002)
        stop.set()
        await task
        return _stage_ms(before)
    finally:
        await store.close()


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
    print(f"{'batch':>6} {'procs':>5} {'mode':<11} {'emb/s':>9}{stages}   (ms per batch)")
    for row in rows:
        split = "".join(f"{row.stage_ms[s]:>10.2f}" for s in STAGES if s in row.stage_ms)
        print(
            f"{row.batch:>6} {row.processes:>5} {row.mode:<11} {row.embeddings_per_s:>9,.0f}{split}"
        )


def _write_json(
    path: Path, model: ServingModel, config: WorkerBenchConfig, rows: list[WorkerBenchRow]
) -> None:
    document = {
        "bench": "worker",
        "model": model.version,
        "provider": model.runtime.provider,
        "precision": model.runtime.precision,
        "users": config.users,
        "cores": usable_cores(),
        "rows": [asdict(row) for row in rows],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1) + "\n")


def run_worker_bench(config: WorkerBenchConfig) -> list[WorkerBenchRow]:
    model = load_bench_model(config)
    states = synthetic_states(config.users, config.events_per_user)
    users = list(states)
    rows: list[WorkerBenchRow] = []
    with _redis(config) as redis_url:
        redis.Redis.from_url(redis_url).flushdb()
        asyncio.run(_prepare(redis_url, model, states))
        if 1 in config.processes:
            rows += asyncio.run(_measure(redis_url, model, config, states))
        for processes in (p for p in config.processes if p > 1):
            pool = _start_pool(redis_url, config, processes)
            try:
                rows += [pool.round(redis_url, users, batch) for batch in config.batch_sizes]
            finally:
                pool.close()
    rows.sort(key=lambda r: (r.batch, r.processes))
    print_rows(
        rows,
        f"worker benchmark: model {model.version} on {model.runtime.provider} "
        f"({model.runtime.precision}), {config.users:,} users, real Redis",
    )
    if config.json_path is not None:
        _write_json(config.json_path, model, config, rows)
    return rows
