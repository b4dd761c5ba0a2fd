"""The embedding worker: dirty users in micro-batches -> tensors -> model -> records.

One micro-batch is: pop up to B dirty users (waiting at most T ms to fill it), read
their feature states in one bulk read, assemble tensors with the function training
uses, run the model off the event loop, and write all records in one bulk write.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from service.clock import Clock, now_ms, sleep_unless_stopped
from service.embeddings import EmbeddingDtype, EmbeddingRecord
from service.features import FeatureState
from service.metrics import (
    WORKER_BATCH_SIZE,
    WORKER_EMBEDDINGS,
    WORKER_MODEL,
    WORKER_OLDEST_DIRTY_AGE,
    WORKER_QUEUE_DEPTH,
    WORKER_SKIPPED,
    WORKER_STAGE_SECONDS,
)
from service.runtime import ModelRuntime
from service.settings import Settings
from service.store import Store
from service.tensors import assemble

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class WorkerConfig:
    batch_size: int = 256
    max_wait_ms: int = 10
    idle_sleep_ms: int = 5
    dtype: EmbeddingDtype = "float16"

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerConfig:
        return cls(
            batch_size=settings.worker_batch_size,
            max_wait_ms=settings.worker_max_wait_ms,
            idle_sleep_ms=settings.worker_idle_sleep_ms,
            dtype=settings.embedding_dtype,
        )


@contextmanager
def _stage(name: str) -> Iterator[None]:
    started = time.perf_counter()
    yield
    WORKER_STAGE_SECONDS.labels(name).observe(time.perf_counter() - started)


class EmbeddingWorker:
    """Recomputes embeddings of dirty users; several workers may share one store."""

    def __init__(
        self,
        store: Store,
        runtime: ModelRuntime,
        config: WorkerConfig = WorkerConfig(),
        clock: Clock = now_ms,
    ) -> None:
        self._store = store
        self._runtime = runtime
        self._config = config
        self._clock = clock
        self.embedded_total = 0
        WORKER_MODEL.labels(runtime.version, runtime.provider).set(1)

    async def _collect(self) -> list[tuple[str, int]]:
        """Pop up to batch_size dirty users, waiting at most max_wait_ms to fill the batch."""
        size, deadline = self._config.batch_size, time.monotonic() + self._config.max_wait_ms / 1e3
        popped = await self._store.pop_dirty(size)
        while popped and len(popped) < size and time.monotonic() < deadline:
            await asyncio.sleep(min(0.002, max(0.0, deadline - time.monotonic())))
            popped += await self._store.pop_dirty(size - len(popped))
        return popped

    async def run_once(self) -> int:
        """Process one micro-batch; return how many embeddings were written.

        If processing fails after the pop, the users are put back with their original
        dirty times (best effort; lease-based recovery from a dead worker is separate).
        """
        popped = await self._collect()
        if not popped:
            return 0
        try:
            return await self._process([user_id for user_id, _ in popped])
        except BaseException:
            await asyncio.shield(self._store.mark_dirty(dict(popped)))
            raise

    async def _process(self, user_ids: list[str]) -> int:
        WORKER_BATCH_SIZE.observe(len(user_ids))
        with _stage("fetch"):
            states = await self._store.get_features(user_ids)
        present = [(u, s) for u, s in zip(user_ids, states, strict=True) if s is not None]
        if len(present) < len(user_ids):
            # Refreshes asked for by readers of users we have never seen an event for.
            WORKER_SKIPPED.labels("no_features").inc(len(user_ids) - len(present))
        if not present:
            return 0
        records = await self._embed(present)
        with _stage("write"):
            await self._store.put_embeddings(records)
        WORKER_EMBEDDINGS.inc(len(records))
        self.embedded_total += len(records)
        return len(records)

    async def _embed(self, present: list[tuple[str, FeatureState]]) -> dict[str, EmbeddingRecord]:
        now = self._clock()
        runtime = self._runtime
        with _stage("assemble"):
            tensors = assemble([s for _, s in present], now, runtime.schema)
        with _stage("infer"):
            vectors = await asyncio.to_thread(runtime.infer, tensors)
        vectors = vectors.astype(np.dtype(self._config.dtype))
        return {
            user_id: EmbeddingRecord(
                vector=vectors[row],
                model_version=runtime.version,
                space_version=runtime.version,
                computed_at_ms=now,
                feature_version=state.version,
            )
            for row, (user_id, state) in enumerate(present)
        }

    async def observe_queue(self) -> None:
        """Export queue depth and oldest dirty age (cheap: two commands, one round trip)."""
        stats = await self._store.dirty_stats()
        WORKER_QUEUE_DEPTH.set(stats.depth)
        oldest = 0.0 if stats.oldest_ms is None else (self._clock() - stats.oldest_ms) / 1e3
        WORKER_OLDEST_DIRTY_AGE.set(max(0.0, oldest))

    async def run(self, stop: asyncio.Event) -> None:
        """Loop until ``stop`` is set; a store outage is logged and retried, never fatal."""
        idle = self._config.idle_sleep_ms / 1e3
        last_observed = 0.0
        backoff = idle
        while not stop.is_set():
            try:
                written = await self.run_once()
                if time.monotonic() - last_observed > 1.0:
                    await self.observe_queue()
                    last_observed = time.monotonic()
                backoff = idle
            except Exception:
                log.exception("event=worker_batch_failed retry_in_s=%.3f", backoff)
                written = 0
                backoff = min(backoff * 2, 2.0)
            if not written:
                await sleep_unless_stopped(stop, backoff)
