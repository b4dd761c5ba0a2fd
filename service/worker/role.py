"""The worker role: load CURRENT, warm up, report ready, embed, and follow the registry.

Until the registry has a servable model the role waits (not ready) instead of
exiting, so a worker started before the first model is published comes up on its
own. Each swap queues the active users for re-embedding in the background.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from functools import partial

from models.registry import RegistryError
from service.core.clock import sleep_unless_stopped
from service.metrics import WORKER_READY
from service.settings import Settings
from service.store.protocol import Store
from service.worker.embedding_worker import EmbeddingWorker, WorkerConfig
from service.worker.model_watch import ModelWatcher, reembed_active
from service.worker.serving_model import ServingModel, load_serving_model

log = logging.getLogger(__name__)


class WorkerRole:
    """Composition of model loading, the worker, the registry watcher and re-embedding."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self._settings = settings
        self._store = store
        self.ready = threading.Event()
        self.worker: EmbeddingWorker | None = None
        self._load = partial(
            load_serving_model,
            settings.registry_path,
            precision=settings.worker_precision,
            intra_op_threads=settings.worker_intra_op_threads,
            warm_up_batches=sorted({1, settings.worker_batch_size}),
        )

    async def _first_model(self, stop: asyncio.Event) -> ServingModel | None:
        while not stop.is_set():
            try:
                return await asyncio.to_thread(self._load, None)
            except RegistryError as exc:
                log.warning(
                    "event=no_servable_model retry_in_s=%.1f reason=%r",
                    self._settings.worker_model_poll_s,
                    str(exc),
                )
            await sleep_unless_stopped(stop, self._settings.worker_model_poll_s)
        return None

    async def run(self, stop: asyncio.Event) -> None:
        model = await self._first_model(stop)
        if model is None:
            return
        worker = EmbeddingWorker(self._store, model, WorkerConfig.from_settings(self._settings))
        self.worker = worker
        self.ready.set()
        WORKER_READY.set(1)
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(worker.run(stop))
                group.create_task(self._follow_registry(worker, group, stop))
        finally:
            self.ready.clear()
            WORKER_READY.set(0)

    async def _follow_registry(
        self, worker: EmbeddingWorker, group: asyncio.TaskGroup, stop: asyncio.Event
    ) -> None:
        watcher = ModelWatcher(self._settings.registry_path, worker.model.version, self._load)
        while not await sleep_unless_stopped(stop, self._settings.worker_model_poll_s):
            model = await watcher.check()
            if model is not None:
                worker.swap(model)
                group.create_task(self._reembed(model.version, stop))

    async def _reembed(self, version: str, stop: asyncio.Event) -> None:
        try:
            await reembed_active(
                self._store,
                version,
                rate_per_s=self._settings.reembed_rate,
                max_users=self._settings.active_index_size,
                stop=stop,
            )
        except Exception:
            log.exception("event=reembed_failed version=%s", version)
