"""The worker role: load the registry's models, warm up, report ready, embed, and
follow the registry.

Every model the registry serves (:func:`models.registry.served_models`) is computed
by one worker from one fetch per dirty user. Until the registry has a servable model
the role waits (not ready) instead of exiting, so a worker started before the first
model is published comes up on its own. The set of models follows the registry at run
time: a new model is loaded and backfilled (its active users queued at the re-embed
rate), a retired one stops being computed, a new version of one is hot-swapped and
re-embedded, and a model that fails to load is refused alone while the others serve.
With ``registry_url`` (an object store) the registry is mirrored into ``registry_path``
(:mod:`models.registry_sync`) and followed there.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from pathlib import Path

from models.registry import model_root, served_models
from models.registry_sync import mirror_from_settings
from service.core.clock import sleep_unless_stopped
from service.metrics import WORKER_READY
from service.settings import Settings
from service.store.protocol import Store
from service.worker.embedding_worker import EmbeddingWorker, WorkerConfig
from service.worker.model_watch import ModelWatcher, reembed_active
from service.worker.serving_model import ServingModel, load_serving_model

log = logging.getLogger(__name__)


class WorkerRole:
    """Composition of model loading, the worker, the registry watchers and re-embedding."""

    def __init__(self, settings: Settings, store: Store) -> None:
        self._settings = settings
        self._store = store
        self.ready = threading.Event()
        self.worker: EmbeddingWorker | None = None
        self._watchers: dict[str, ModelWatcher] = {}

    def _root(self, model: str) -> Path:
        return model_root(self._settings.registry_path, model)

    def _load(self, model: str, version: str | None = None) -> ServingModel:
        settings = self._settings
        return load_serving_model(
            self._root(model),
            version,
            precision=settings.worker_precision,
            intra_op_threads=settings.worker_intra_op_threads,
            warm_up_batches=sorted({1, settings.worker_batch_size}),
        )

    def _watcher(self, model: str) -> ModelWatcher:
        """The model's registry watcher (a new one loads its CURRENT on the first check;
        a refused version is refused once, until its manifest changes)."""
        if model not in self._watchers:
            self._watchers[model] = ModelWatcher(
                self._root(model), None, lambda version: self._load(model, version), model=model
            )
        return self._watchers[model]

    async def _check(self, names: list[str]) -> dict[str, ServingModel]:
        """The models among ``names`` whose CURRENT is new and loads (each alone)."""
        loaded = {}
        for name in names:
            model = await self._watcher(name).check()
            if model is not None:
                loaded[name] = model
        return loaded

    async def _first_models(self, stop: asyncio.Event) -> dict[str, ServingModel]:
        while not stop.is_set():
            names = served_models(self._settings.registry_path)
            models = await self._check(names)
            if models:
                return models
            root = self._settings.registry_path
            log.warning(
                "event=no_servable_model retry_in_s=%.1f reason=%r",
                self._settings.worker_model_poll_s,
                f"model registry {root} is empty: publish a model first"
                if not names
                else "every model was refused (see event=model_refused)",
            )
            await sleep_unless_stopped(stop, self._settings.worker_model_poll_s)
        return {}

    async def run(self, stop: asyncio.Event) -> None:
        mirror = mirror_from_settings(self._settings)
        if mirror is None:
            await self._run(stop)
            return
        async with asyncio.TaskGroup() as group:  # registry_url: mirrored into registry_path
            group.create_task(mirror.follow(stop, self._settings.worker_model_poll_s))
            group.create_task(self._run(stop))

    async def _run(self, stop: asyncio.Event) -> None:
        models = await self._first_models(stop)
        if not models:
            return
        worker = EmbeddingWorker(self._store, models, WorkerConfig.from_settings(self._settings))
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
        while not await sleep_unless_stopped(stop, self._settings.worker_model_poll_s):
            await self.follow_once(worker, group, stop)

    async def follow_once(
        self, worker: EmbeddingWorker, group: asyncio.TaskGroup, stop: asyncio.Event
    ) -> None:
        """One look at the registry: retire gone models, add new ones (backfilled) and
        swap new versions (re-embedded)."""
        try:
            names = served_models(self._settings.registry_path)
        except OSError as exc:
            log.warning("event=registry_unreadable reason=%r", str(exc))
            return
        for name in [n for n in worker.models if n not in names]:
            if len(worker.models) == 1:
                log.error("event=retire_refused model=%s reason='the only model served'", name)
                continue
            worker.retire(name)
        for gone in set(self._watchers) - set(names) - set(worker.models):
            del self._watchers[gone]
        for name, model in (await self._check(names)).items():
            worker.swap(model, name)  # a new name adds the model
            group.create_task(self._reembed(name, model.version, stop))

    async def _reembed(self, model: str, version: str, stop: asyncio.Event) -> None:
        try:
            await reembed_active(
                self._store,
                version,
                rate_per_s=self._settings.reembed_rate,
                max_users=self._settings.active_index_size,
                stop=stop,
                model=model,
            )
        except Exception:
            log.exception("event=reembed_failed model=%s version=%s", model, version)
