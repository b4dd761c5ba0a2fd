"""Sections 1 and 5 of the evaluation: freshness under load and read latency, measured
on the running pipeline (broker, redis-server, ``userembed ingest``, ``worker``, ``serve``
and ``produce`` as real processes on this machine).

Order: start the pipeline; one event per background user (every ``u{i}`` then has an
embedding); one probe per probe user (the pipeline works end to end); reads while idle;
then per rate, in ascending order: drain (Kafka lag and dirty queue empty, up to
``drain_timeout_s``), background traffic from ``userembed produce``, ``warmup_s``,
``measure_s`` of freshness probes (:mod:`service.evaluation.probes`), then open-loop
reads of every target (:mod:`service.evaluation.open_loop`) with the traffic still on.
Rates are deltas over the probe window of the topic's log-end offsets (produced) and
the roles' own counters (ingested, embedded); events/s exclude the probes' own events,
which are reported beside them (each probe user probes again 0-50 ms after its last
probe was served, so they add about ``probe_users / (latency + 25 ms)`` events/s).
Every role runs with default settings except, on librdkafka's mock cluster, ingest's
``fetch.wait.max.ms`` (see :func:`~service.evaluation.pipeline.mock_broker_overrides`);
``LiveResults.settings_overrides`` lists what differed.

**Keeping up.** A rate keeps up when all of these hold over its probe window:

1. the producer reached >= 90% of the offered rate (else the load was not offered);
2. ingest kept pace: the Kafka lag grew by <= max(50, 2% of the offered rate) events/s
   (the lag is sampled at both ends of the window);
3. no probe timed out;
4. the dirty queue did not grow: least-squares slope <= max(50, 1% of the offered
   rate) users/s;
5. the oldest dirty user's age, median of the 0.5 s samples, is <= 1 s. Needed besides
   4 because the queue holds each user once: overloaded, it fills up to the active
   users and then stops growing, while the wait of the users in it does not shrink.

``first_failing_rate`` is the lowest rate that does not keep up; each rate's
``shortfalls`` says which conditions failed. An empty measurement (no probe answered)
is a :class:`LatencySummary` with count 0 and every value 0.0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import math
import signal
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import redis.asyncio as aioredis
import uvloop

from models.default import DEFAULT_REGISTRY, DEFAULT_VERSION
from models.registry import install, load_artifact
from service.bench.provenance import commit_id
from service.core.clock import now_ms
from service.core.events import Event, EventType, encode_event
from service.evaluation.config import LiveConfig
from service.evaluation.live_results import (
    MOCK_BROKER,
    READ_TARGETS,
    LatencySummary,
    LiveResults,
    Measured,
    RateResult,
    ReadRow,
    saturation,
    slope,
)
from service.evaluation.open_loop import measure_target
from service.evaluation.pipeline import (
    Offsets,
    Pipeline,
    Role,
    Wiring,
    delete_topic,
    ensure_topic,
    mock_broker_overrides,
    run_pipeline,
    scrape,
    total,
)
from service.evaluation.probes import Prober
from service.ingest.kafka import KafkaEventSink
from service.ingest.mock_broker import mock_kafka_cluster
from service.store.keys import DEFAULT_SHARDS, KeyLayout
from service.store.redis import RedisStore
from service.store.redis_server import private_redis

__all__ = ["READ_TARGETS", "LatencySummary", "LiveResults", "RateResult", "ReadRow", "run_live"]
Progress = Callable[[str, float], None]
SAMPLE_EVERY_S: Final = 0.5
PRODUCER_MAX_RATE: Final = 15_000.0  # events/s per `userembed produce` process


@dataclass(frozen=True, slots=True)
class _Counters:
    """What the probe window is measured between."""

    t: float
    log_end: int
    applied: float
    embedded: float
    lag: int
    depth: int
    oldest_age_ms: int


class _Stages:
    """Drives ``progress`` with the share of the planned time spent before each stage."""

    START_S: Final = 15.0
    WARM_UP_S: Final = 5.0
    DRAIN_S: Final = 3.0

    def __init__(self, config: LiveConfig, progress: Progress | None) -> None:
        self._progress = progress
        self.reads_s = len(READ_TARGETS) * (config.read_s + 0.5)
        per_rate = self.DRAIN_S + config.warmup_s + config.measure_s + self.reads_s
        self._total = self.START_S + self.WARM_UP_S + self.reads_s + len(config.rates) * per_rate
        self._done = 0.0

    def __call__(self, name: str, planned_s: float) -> None:
        if self._progress is not None:
            self._progress(name, min(1.0, self._done / self._total))
        self._done += planned_s

    def finish(self) -> None:
        if self._progress is not None:
            self._progress("live part done", 1.0)


def run_live(config: LiveConfig, progress: Progress | None = None) -> LiveResults:
    """Run sections 1 and 5 on this machine; ``progress(stage, fraction)`` as stages begin."""
    _check(config)
    started, commit = time.perf_counter(), commit_id()
    stage = _Stages(config, progress)
    stage("start the pipeline", stage.START_S)
    with contextlib.ExitStack() as stack:
        bootstrap = config.kafka_bootstrap or stack.enter_context(mock_kafka_cluster())
        redis_url = config.redis_url or stack.enter_context(private_redis())
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="userembed-eval-")))
        artifact = install(workdir / "registry", load_artifact(DEFAULT_REGISTRY, DEFAULT_VERSION))
        external = config.kafka_bootstrap is not None
        overrides = {} if external else mock_broker_overrides()
        wiring = Wiring(redis_url, bootstrap, workdir / "registry", overrides=overrides)
        partitions = ensure_topic(wiring.settings(), config.kafka_partitions, create=external)
        if external:
            stack.callback(delete_topic, wiring.settings())
        pipeline = stack.enter_context(run_pipeline(wiring, workdir))
        try:
            idle, rates = uvloop.run(_measure(config, pipeline, partitions, workdir, stage))
        except (RuntimeError, OSError, TimeoutError) as exc:
            raise RuntimeError(f"live evaluation failed: {exc}\n{pipeline.diagnosis()}") from exc
        finally:
            gc.collect()  # the evaluator's Kafka clients go before the mock broker does
        provider = _worker_provider(wiring.worker_ops_port)
    sentence, first_failing = saturation(rates)
    stage.finish()
    return LiveResults(
        config=dataclasses.asdict(config),
        commit=commit,
        broker=MOCK_BROKER if config.kafka_bootstrap is None else config.kafka_bootstrap,
        kafka_partitions=partitions,
        settings_overrides=overrides,
        model_version=artifact.version,
        worker_provider=provider,
        idle_reads=idle,
        rates=rates,
        saturation=sentence,
        first_failing_rate=first_failing,
        seconds=time.perf_counter() - started,
    )


def _check(config: LiveConfig) -> None:
    positive = {
        "users": config.users,
        "measure_s": config.measure_s,
        "probe_users": config.probe_users,
        "probe_poll_ms": config.probe_poll_ms,
        "probe_timeout_s": config.probe_timeout_s,
        "read_rate": config.read_rate,
        "read_s": config.read_s,
        "kafka_partitions": config.kafka_partitions,
    }
    wrong = [f"{k}={v}" for k, v in positive.items() if not v > 0]
    if not config.rates or min(config.rates) <= 0:
        wrong.append(f"rates={list(config.rates)}")
    if config.warmup_s < 0 or config.drain_timeout_s < 0:
        wrong.append(f"warmup_s={config.warmup_s}, drain_timeout_s={config.drain_timeout_s}")
    if wrong:
        raise ValueError(f"invalid live configuration (need positive values): {', '.join(wrong)}")


async def _measure(
    config: LiveConfig, pipeline: Pipeline, partitions: int, log_dir: Path, stage: _Stages
) -> tuple[list[ReadRow], list[RateResult]]:
    wiring = pipeline.wiring
    settings = wiring.settings()
    store = RedisStore(wiring.redis_url, timeout_ms=5000)
    sink = KafkaEventSink(settings, delivery_timeout_s=30.0)
    offsets = Offsets(settings, partitions)
    probe_users = [f"probe-{i}" for i in range(config.probe_users)]
    prober = Prober(
        sink,
        wiring.http_port,
        probe_users,
        poll_s=config.probe_poll_ms / 1000,
        timeout_s=config.probe_timeout_s,
    )
    rng = np.random.default_rng(0)
    try:
        stage("warm up: one event per background user", stage.WARM_UP_S)
        await _populate(sink, wiring.redis_url, config.users, pipeline, config.drain_timeout_s)
        await prober.start()
        first = await prober.run(0.0, first_only=True)
        if first.timeouts:
            raise RuntimeError(
                f"{first.timeouts} of {len(probe_users)} probe users were not served an "
                f"embedding of their first event within {config.probe_timeout_s} s"
            )
        await _drain(store, offsets, pipeline, config.drain_timeout_s)
        stage("reads while idle", stage.reads_s)
        idle = await _reads(config, wiring, rng)
        rates: list[RateResult] = []
        for index, rate in enumerate(sorted(config.rates)):
            stage(f"{rate:,.0f} ev/s: drain", stage.DRAIN_S)
            drained, drain_s = await _drain(store, offsets, pipeline, config.drain_timeout_s)
            phase = _Phase(config, pipeline, store, offsets, prober, stage, rng)
            rates.append(await phase.run(rate, index, log_dir, drained, drain_s))
        return idle, rates
    finally:
        await prober.close()
        await store.close()
        offsets.close()
        await sink.close()


async def _populate(
    sink: KafkaEventSink, redis_url: str, users: int, pipeline: Pipeline, timeout_s: float
) -> None:
    """One event per background user through Kafka; wait until every one has an embedding."""
    at = now_ms()
    for i in range(users):
        user = f"u{i}"
        sink.produce_nowait(
            user, encode_event(Event(uuid.uuid4().hex, user, at, EventType.VIEW, i))
        )
    unsent = await asyncio.to_thread(sink.flush, 30.0)
    if unsent:
        raise RuntimeError(f"{unsent} warm-up events were not acknowledged by the broker")
    layout = KeyLayout(DEFAULT_SHARDS)  # the pipeline's own settings
    keys = [layout.embedding_key(f"u{i}") for i in range(users)]
    client = aioredis.Redis.from_url(redis_url)
    deadline = time.monotonic() + max(timeout_s, 30.0)
    try:
        while True:
            chunks = [keys[lo : lo + 1000] for lo in range(0, users, 1000)]
            embedded = sum([await client.exists(*chunk) for chunk in chunks])
            if embedded >= users:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {embedded} of {users} warm-up users were embedded")
            pipeline.check_alive()
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()


async def _drain(
    store: RedisStore, offsets: Offsets, pipeline: Pipeline, timeout_s: float
) -> tuple[bool, float]:
    """Wait until ingest has committed everything and the dirty queue is empty."""
    started = time.monotonic()
    while True:
        stats = await store.dirty_stats()
        lag = await asyncio.to_thread(offsets.lag)
        elapsed = time.monotonic() - started
        if stats.depth == 0 and stats.leased == 0 and lag == 0:
            return True, elapsed
        if elapsed >= timeout_s:
            return False, elapsed
        pipeline.check_alive()
        await asyncio.sleep(0.2)


async def _reads(config: LiveConfig, wiring: Wiring, rng: np.random.Generator) -> list[ReadRow]:
    """Each target in turn, open-loop at ``read_rate`` for ``read_s``, uniform users."""
    count = max(1, round(config.read_rate * config.read_s))
    rows = []
    for target in READ_TARGETS:
        users = [f"u{i}" for i in rng.integers(0, config.users, count).tolist()]
        run = await measure_target(
            target,
            users,
            config.read_rate,
            http_port=wiring.http_port,
            grpc_port=wiring.grpc_port,
            redis_url=wiring.redis_url,
            timeout_s=config.read_timeout_s,
        )
        achieved = len(run.latencies_ms) / run.elapsed_s if run.elapsed_s > 0 else 0.0
        summary = LatencySummary.of(run.latencies_ms)
        rows.append(ReadRow(target, config.read_rate, achieved, run.errors, summary))
    return rows


@dataclass(slots=True)
class _Phase:
    """One background rate: traffic, warm-up, probe window, reads."""

    config: LiveConfig
    pipeline: Pipeline
    store: RedisStore
    offsets: Offsets
    prober: Prober
    stage: _Stages
    rng: np.random.Generator

    async def run(
        self, rate: float, index: int, log_dir: Path, drained: bool, drain_s: float
    ) -> RateResult:
        c = self.config
        # long enough for straggling probes and every read window; stopped when done
        duration = c.warmup_s + c.measure_s + c.probe_timeout_s + 2 * self.stage.reads_s + 10
        env = self.pipeline.wiring.environment()
        # one Python producer tops out near 20k events/s here: split higher rates
        count = max(1, math.ceil(rate / PRODUCER_MAX_RATE))
        producers: list[Role] = []
        try:
            for k in range(count):
                args = ["produce", "--rate", f"{rate / count:g}", "--users", str(c.users)]
                args += ["--duration", f"{duration:.1f}", "--seed", str(7 + 100 * index + k)]
                producers.append(Role(f"produce-{rate:.0f}-{k}", args, env, log_dir))
            began = time.monotonic()
            samples: list[tuple[float, int, int]] = []
            sampler = asyncio.create_task(self._sample(began, samples, producers))
            self.stage(f"{rate:,.0f} ev/s: warm-up", c.warmup_s)
            await asyncio.sleep(c.warmup_s)
            self.stage(f"{rate:,.0f} ev/s: freshness probes", c.measure_s)
            before = await self._counters()
            window = asyncio.create_task(self._counters_after(c.measure_s))
            probes = await self.prober.run(c.measure_s)
            after = await window
            await sampler
            self.stage(f"{rate:,.0f} ev/s: reads", self.stage.reads_s)
            reads = await _reads(c, self.pipeline.wiring, self.rng)
            for producer in producers:
                producer.check_alive()  # the traffic lasted through the reads
        finally:
            for producer in producers:
                producer.stop(signal.SIGINT)
        seconds = after.t - before.t
        produced = max(0, after.log_end - before.log_end - probes.produced) / seconds
        # nearly every probe event is applied inside the window: a probe waits for it
        ingested = max(0.0, after.applied - before.applied - probes.produced) / seconds
        window_samples = [s for s in samples if s[0] >= c.warmup_s] or samples
        growth = slope([(t, float(depth)) for t, depth, _ in window_samples])
        age_median = int(np.median([age for _, _, age in window_samples])) if window_samples else 0
        summary = LatencySummary.of(probes.latencies_ms)
        lag_growth = (after.lag - before.lag) / seconds
        measured = Measured(rate, produced, lag_growth, probes.timeouts, growth, age_median)
        shortfalls = measured.shortfalls(c.probe_timeout_s)
        return RateResult(
            offered_rate=rate,
            produced_rate=produced,
            ingested_rate=ingested,
            embedded_rate=(after.embedded - before.embedded) / seconds,
            probe_event_rate=probes.produced / seconds,
            probes=summary,
            probe_timeouts=probes.timeouts,
            queue_depth_start=before.depth,
            queue_depth_end=after.depth,
            queue_growth_per_s=growth,
            oldest_dirty_age_end_ms=after.oldest_age_ms,
            oldest_dirty_age_median_ms=age_median,
            kafka_lag_end=after.lag,
            kafka_lag_growth_per_s=lag_growth,
            queue_samples=samples,
            keeps_up=not shortfalls,
            shortfalls=shortfalls,
            drained_before=drained,
            drain_before_s=drain_s,
            reads=reads,
        )

    async def _sample(
        self, began: float, samples: list[tuple[float, int, int]], producers: list[Role]
    ) -> None:
        """Dirty-queue depth and oldest age every 0.5 s over warm-up and probe window;
        also notices a role or the producer dying."""
        end = began + self.config.warmup_s + self.config.measure_s
        while (now := time.monotonic()) <= end:
            stats = await self.store.dirty_stats()
            age = max(0, now_ms() - stats.oldest_ms) if stats.oldest_ms is not None else 0
            samples.append((round(now - began, 3), stats.depth, age))
            self.pipeline.check_alive()
            for producer in producers:
                producer.check_alive()
            await asyncio.sleep(SAMPLE_EVERY_S)

    async def _counters_after(self, delay_s: float) -> _Counters:
        await asyncio.sleep(delay_s)
        return await self._counters()

    async def _counters(self) -> _Counters:
        stats = await self.store.dirty_stats()
        age = max(0, now_ms() - stats.oldest_ms) if stats.oldest_ms is not None else 0
        wiring, offsets = self.pipeline.wiring, self.offsets

        def read() -> _Counters:
            t = time.monotonic()
            ingest, worker = scrape(wiring.ingest_ops_port), scrape(wiring.worker_ops_port)
            return _Counters(
                t=t,
                log_end=offsets.log_end(),
                applied=total(ingest, "userembed_ingest_events_total", outcome="applied"),
                embedded=total(worker, "userembed_worker_embeddings_total"),
                lag=offsets.lag(),
                depth=stats.depth,
                oldest_age_ms=age,
            )

        return await asyncio.to_thread(read)


def _worker_provider(port: int) -> str:
    """The worker's ONNX Runtime provider and precision, from userembed_worker_model_info."""
    with contextlib.suppress(OSError, RuntimeError):
        for labels, value in scrape(port).get("userembed_worker_model_info", []):
            if value == 1 and "provider" in labels:
                return f"{labels['provider']} ({labels.get('precision', 'unknown precision')})"
    return "unknown"
