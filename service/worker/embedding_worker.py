"""The embedding worker: dirty users in micro-batches -> tensors -> models -> records.

A micro-batch: lease up to B dirty users (waiting at most T ms to fill it), read
their feature states and the served records of every model in one round trip,
assemble tensors once per input schema with the function training uses, infer each
served model off the event loop, stabilize each against its own served records
(docs/stabilization.md), write all records in one bulk write and release the
leases. Models are named (SUM's "a few upstream models"): one claim, one fetch and
one assemble feed all of them; a model that fails to infer is skipped alone, its
users' other models are still written. ``run`` overlaps the stages across batches: while batch k is
on the device, batch k+1 is being read and batch k-1 written. Two one-slot queues
between the stages bound memory to five batches whatever the queue depth.

A worker that dies keeps its leases until they expire; the next claim by any
worker puts those users back in the queue with their original dirty times.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from service.core.clock import Clock, now_ms, sleep_unless_stopped
from service.core.embeddings import EmbeddingDtype, EmbeddingRecord
from service.core.features import FeatureState
from service.core.model_names import DEFAULT_MODEL
from service.core.stabilization import StabilizationConfig, stabilize
from service.core.tensors import Tensors, assemble
from service.metrics import (
    WORKER_BATCH_SIZE,
    WORKER_EMBEDDING_STALENESS,
    WORKER_EMBEDDINGS,
    WORKER_LEASED,
    WORKER_MODEL,
    WORKER_OLDEST_DIRTY_AGE,
    WORKER_QUEUE_DEPTH,
    WORKER_SKIPPED,
    WORKER_STAGE_SECONDS,
)
from service.settings import Settings
from service.store.protocol import Store
from service.worker.runtime import ModelRuntime
from service.worker.serving_model import ServingModel

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    batch_size: int = 256
    max_wait_ms: int = 10
    idle_sleep_ms: int = 5
    dtype: EmbeddingDtype = "float16"
    lease_ms: int = 30_000
    active_index_size: int = 1_000_000
    stabilization: StabilizationConfig = field(default_factory=StabilizationConfig)

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerConfig:
        return cls(
            batch_size=settings.worker_batch_size,
            max_wait_ms=settings.worker_max_wait_ms,
            idle_sleep_ms=settings.worker_idle_sleep_ms,
            dtype=settings.embedding_dtype,
            lease_ms=settings.worker_lease_ms,
            active_index_size=settings.active_index_size,
            stabilization=StabilizationConfig(
                enabled=settings.stabilization_enabled,
                time_constant_s=settings.stabilization_time_constant_s,
                min_weight=settings.stabilization_min_weight,
                max_step=settings.stabilization_max_step,
            ),
        )


@contextmanager
def _stage(name: str, model: str = "") -> Iterator[None]:
    """Time one stage of a batch: of one model, or (``model=""``) shared by all."""
    started = time.perf_counter()
    yield
    WORKER_STAGE_SECONDS.labels(model, name).observe(time.perf_counter() - started)


@dataclass(slots=True)
class _Batch:
    """One micro-batch on its way through fetch -> compute -> write."""

    claimed: dict[str, int]  # user -> dirty_at_ms, all leased
    models: dict[str, ServingModel]  # the models served when the batch was claimed
    now_ms: int = 0
    users: list[str] = field(default_factory=list)  # those with features, in row order
    states: list[FeatureState] = field(default_factory=list)
    previous: dict[str, list[EmbeddingRecord | None]] = field(default_factory=dict)
    tensors: dict[str, Tensors] = field(default_factory=dict)  # input schema digest -> tensors
    records: dict[str, dict[str, EmbeddingRecord]] = field(default_factory=dict)  # model -> user


class EmbeddingWorker:
    """Recomputes embeddings of dirty users; several workers may share one store."""

    def __init__(
        self,
        store: Store,
        model: ServingModel | ModelRuntime | Mapping[str, ServingModel],
        config: WorkerConfig = WorkerConfig(),
        clock: Clock = now_ms,
    ) -> None:
        self._store = store
        if isinstance(model, ServingModel | Mapping):
            models = {DEFAULT_MODEL: model} if isinstance(model, ServingModel) else dict(model)
        else:
            models = {DEFAULT_MODEL: ServingModel.unaligned(model)}
        self._models: dict[str, ServingModel] = {}
        self._config = config
        self._clock = clock
        self.token = uuid.uuid4().hex
        self.embedded_total = 0
        self._last_observed = 0.0
        for name, serving in models.items():
            self.swap(serving, name)

    @property
    def models(self) -> dict[str, ServingModel]:
        """The served models by name (a copy)."""
        return dict(self._models)

    @property
    def model(self) -> ServingModel:
        """The default model (or, without one, the first served)."""
        return self._models.get(DEFAULT_MODEL) or next(iter(self._models.values()))

    def swap(self, model: ServingModel, name: str = DEFAULT_MODEL) -> None:
        """Serve ``model`` as ``name`` from the next batch on (a new name adds a model);
        batches in flight finish on the old one."""
        old = self._models.get(name)
        self._models = {**self._models, name: model}
        if old is not None:
            self._export_model_info(name, old, 0)
        self._export_model_info(name, model, 1)
        log.info(
            "event=%s model=%s from=%s to=%s space=%s provider=%s",
            "model_added" if old is None else "model_swapped",
            name,
            None if old is None else old.version,
            model.version,
            model.space_version,
            model.runtime.provider,
        )

    def retire(self, name: str) -> None:
        """Stop computing ``name`` from the next batch on (its records stay readable)."""
        models = dict(self._models)
        old = models.pop(name, None)
        if old is None:
            return
        if not models:
            raise ValueError(f"cannot retire {name!r}: it is the only model served")
        self._models = models
        self._export_model_info(name, old, 0)
        log.info("event=model_retired model=%s version=%s", name, old.version)

    @staticmethod
    def _export_model_info(name: str, model: ServingModel, value: int) -> None:
        labels = (
            name,
            model.version,
            model.space_version,
            model.runtime.provider,
            model.runtime.precision,
        )
        WORKER_MODEL.labels(*labels).set(value)

    # --- stages -------------------------------------------------------------

    async def _claim(self) -> dict[str, int]:
        """Lease up to batch_size dirty users, waiting at most max_wait_ms to fill the batch."""
        size, deadline = self._config.batch_size, time.monotonic() + self._config.max_wait_ms / 1e3
        claimed = dict(await self._claim_some(size))
        while claimed and len(claimed) < size and time.monotonic() < deadline:
            await asyncio.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
            claimed.update(await self._claim_some(size - len(claimed)))
        return claimed

    async def _claim_some(self, limit: int) -> list[tuple[str, int]]:
        return await self._store.claim_dirty(
            limit, token=self.token, now_ms=self._clock(), lease_ms=self._config.lease_ms
        )

    async def _fetch(self, claimed: dict[str, int]) -> _Batch:
        """Features and every model's served records of the batch (one bulk read),
        assembled once per input schema."""
        batch = _Batch(claimed=claimed, models=self._models)
        user_ids, names = list(claimed), list(batch.models)
        WORKER_BATCH_SIZE.observe(len(user_ids))
        with _stage("fetch"):
            states, previous = await self._store.get_features_and_embeddings(user_ids, names)
        rows = [row for row, state in enumerate(states) if state is not None]
        batch.users = [user_ids[row] for row in rows]
        batch.states = [state for state in states if state is not None]
        batch.previous = {
            name: [records[row] for row in rows]
            for name, records in zip(names, previous, strict=True)
        }
        if len(batch.users) < len(user_ids):
            # Refreshes asked for by readers of users we have never seen an event for.
            for name in names:
                WORKER_SKIPPED.labels(name, "no_features").inc(len(user_ids) - len(batch.users))
        if batch.users:
            batch.now_ms = self._clock()
            with _stage("assemble"):
                for model in batch.models.values():
                    schema = model.runtime.schema
                    if schema.digest() not in batch.tensors:
                        batch.tensors[schema.digest()] = assemble(
                            batch.states, batch.now_ms, schema
                        )
        return batch

    def _compute(self, batch: _Batch) -> None:
        """Infer and stabilize every model (runs in a thread: ONNX Runtime releases the
        GIL). A model that fails is skipped alone; if every model fails, the batch fails."""
        if not batch.users:
            return
        failures: list[BaseException] = []
        for name, model in batch.models.items():
            try:
                batch.records[name] = self._compute_model(batch, name, model, batch.previous[name])
            except Exception as exc:
                failures.append(exc)
                WORKER_SKIPPED.labels(name, "model_failed").inc(len(batch.users))
                log.exception("event=worker_model_failed model=%s version=%s", name, model.version)
        if len(failures) == len(batch.models):
            raise failures[0]

    def _compute_model(
        self,
        batch: _Batch,
        name: str,
        model: ServingModel,
        previous: list[EmbeddingRecord | None],
    ) -> dict[str, EmbeddingRecord]:
        now = batch.now_ms
        with _stage("infer", name):
            fresh = model.embed(batch.tensors[model.runtime.schema.digest()])
        with _stage("stabilize", name):
            served = self._stabilize(model, fresh, previous, now)
        vectors = served.astype(np.dtype(self._config.dtype))
        return {
            user_id: EmbeddingRecord(
                vector=vectors[row],
                model_version=model.version,
                space_version=model.space_version,
                computed_at_ms=now,
                feature_version=state.version,
            )
            for row, (user_id, state) in enumerate(zip(batch.users, batch.states, strict=True))
        }

    def _stabilize(
        self,
        model: ServingModel,
        fresh: np.ndarray,
        previous: list[EmbeddingRecord | None],
        now: int,
    ) -> np.ndarray:
        """Blend with served records of the same space and dimension; others start afresh."""
        rows, dim = fresh.shape
        prior = np.zeros((rows, dim), dtype=np.float32)
        age = np.zeros(rows, dtype=np.int64)
        has_prior = np.zeros(rows, dtype=bool)
        for row, record in enumerate(previous):
            same_space = record is not None and record.space_version == model.space_version
            if record is not None and same_space and record.dim == dim:
                prior[row] = record.vector
                age[row] = now - record.computed_at_ms
                has_prior[row] = True
        return stabilize(
            fresh,
            prior,
            age,
            has_prior,
            normalized=model.normalized,
            config=self._config.stabilization,
        )

    async def _write(self, batch: _Batch) -> int:
        with _stage("write"):
            await self._store.write_and_release(self.token, batch.records, batch.claimed)
        written_at = self._clock()
        written = {user_id for records in batch.records.values() for user_id in records}
        for user_id in written:
            WORKER_EMBEDDING_STALENESS.observe(max(0, written_at - batch.claimed[user_id]) / 1e3)
        count = 0
        for name, records in batch.records.items():
            WORKER_EMBEDDINGS.labels(name).inc(len(records))
            count += len(records)
        self.embedded_total += count
        return count

    async def _requeue(self, claimed: dict[str, int]) -> None:
        """Give a failed batch back with its dirty times (if this fails too, the lease
        expires and the next claim requeues it)."""
        try:
            await asyncio.shield(self._store.release_claim(self.token, list(claimed), claimed))
        except Exception as exc:
            log.warning("event=requeue_failed users=%d reason=%r", len(claimed), str(exc))

    # --- loops --------------------------------------------------------------

    async def run_once(self) -> int:
        """Process one micro-batch start to end; return how many embeddings were written.

        If processing fails after the claim, the users go back to the queue with
        their original dirty times.
        """
        claimed = await self._claim()
        if not claimed:
            return 0
        try:
            batch = await self._fetch(claimed)
            await asyncio.to_thread(self._compute, batch)
            return await self._write(batch)
        except BaseException:
            await self._requeue(claimed)
            raise

    async def observe_queue(self) -> None:
        """Export queue depth, leases and oldest dirty age; bound the activity index."""
        await self._store.trim_active(self._config.active_index_size)
        stats = await self._store.dirty_stats()
        WORKER_QUEUE_DEPTH.set(stats.depth)
        WORKER_LEASED.set(stats.leased)
        oldest = 0.0 if stats.oldest_ms is None else (self._clock() - stats.oldest_ms) / 1e3
        WORKER_OLDEST_DIRTY_AGE.set(max(0.0, oldest))

    async def run(self, stop: asyncio.Event) -> None:
        """Pipelined loop until ``stop`` is set; batches in flight are finished.

        A store outage is logged and retried with backoff, never fatal.
        """
        fetched: asyncio.Queue[_Batch | None] = asyncio.Queue(maxsize=1)
        computed: asyncio.Queue[_Batch | None] = asyncio.Queue(maxsize=1)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._fetch_loop(stop, fetched))
            group.create_task(self._compute_loop(fetched, computed))
            group.create_task(self._write_loop(computed))

    async def _fetch_loop(self, stop: asyncio.Event, out: asyncio.Queue[_Batch | None]) -> None:
        idle = self._config.idle_sleep_ms / 1e3
        backoff = idle
        while not stop.is_set():
            try:
                await self._observe_now_and_then()
                claimed = await self._claim()
            except Exception:
                log.exception("event=worker_claim_failed retry_in_s=%.3f", backoff)
                claimed, failed = {}, True
            else:  # the fetch coroutine is only created for a non-empty batch
                failed = bool(claimed) and not await self._guarded(
                    "fetch", claimed, self._fetch_to(out, claimed)
                )
            if failed:
                await sleep_unless_stopped(stop, backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = idle
            if not claimed:
                await sleep_unless_stopped(stop, idle)
        await out.put(None)  # end of stream

    async def _fetch_to(self, out: asyncio.Queue[_Batch | None], claimed: dict[str, int]) -> None:
        await out.put(await self._fetch(claimed))

    async def _compute_loop(
        self, inbox: asyncio.Queue[_Batch | None], out: asyncio.Queue[_Batch | None]
    ) -> None:
        while (batch := await inbox.get()) is not None:
            computed = asyncio.to_thread(self._compute, batch)
            if await self._guarded("infer", batch.claimed, computed):
                await out.put(batch)
        await out.put(None)  # end of stream

    async def _write_loop(self, inbox: asyncio.Queue[_Batch | None]) -> None:
        while (batch := await inbox.get()) is not None:
            await self._guarded("write", batch.claimed, self._write(batch))

    async def _guarded(self, stage: str, claimed: dict[str, int], step: Awaitable[object]) -> bool:
        """Await one stage of a batch; if it fails (or is cancelled) the batch goes back
        to the queue. Returns whether it succeeded."""
        try:
            await step
        except asyncio.CancelledError:
            await self._requeue(claimed)
            raise
        except Exception:
            log.exception("event=worker_%s_failed users=%d", stage, len(claimed))
            await self._requeue(claimed)
            return False
        return True

    async def _observe_now_and_then(self) -> None:
        if time.monotonic() - self._last_observed > 1.0:
            self._last_observed = time.monotonic()
            await self.observe_queue()
