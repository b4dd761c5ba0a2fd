"""Hot model swap: watch the registry, verify and warm up a new version, then re-embed.

A new CURRENT is loaded off the event loop (sha256, schema hash, graph inputs,
alignment), warmed up, and handed to ``on_swap``, which swaps it between batches.
A version that fails verification is refused once, with a log line and a metric,
and the current model keeps serving; it is retried only if its manifest changes.
After a swap one worker (a job claimed in the store) queues the most recently
active users for re-embedding at a bounded rate.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from models.registry import MANIFEST_FILE, MODELS_DIR, current_version
from service.core.clock import Clock, now_ms, sleep_unless_stopped
from service.core.model_names import DEFAULT_MODEL
from service.metrics import WORKER_MODEL_SWAPS, WORKER_REEMBED_ENQUEUED
from service.store.protocol import Store
from service.worker.serving_model import ServingModel

log = logging.getLogger(__name__)

ModelLoader = Callable[[str], ServingModel]


class ModelWatcher:
    """Polls ``root``'s CURRENT; returns a loaded model when it names a new version.

    ``model`` names the model in metrics and logs; by default it is read from where
    ``root`` lies in the registry (``<registry>/_models/<name>``, else the default model).
    With no ``serving_version`` (a model not served yet) its first CURRENT is loaded,
    counted as ``added``.
    """

    def __init__(
        self,
        root: Path,
        serving_version: str | None,
        load: ModelLoader,
        *,
        model: str | None = None,
    ) -> None:
        self._root = root
        self._serving = serving_version
        self._load = load
        self._refused: tuple[str, int] | None = None  # (version, manifest mtime)
        self.model = model or model_of(root)

    def _manifest_mtime(self, version: str) -> int:
        try:
            return (self._root / version / MANIFEST_FILE).stat().st_mtime_ns
        except OSError:
            return 0

    async def check(self) -> ServingModel | None:
        """A verified, warmed-up model for a new CURRENT, or None (unchanged or refused)."""
        try:
            version = current_version(self._root)
        except OSError as exc:
            log.warning("event=registry_unreadable path=%s reason=%r", self._root, str(exc))
            return None
        if version is None or version == self._serving:
            return None
        mark = (version, self._manifest_mtime(version))
        if mark == self._refused:
            return None
        try:
            model = await asyncio.to_thread(self._load, version)
        except Exception as exc:  # any unloadable artifact is refused, never fatal
            self._refused = mark
            WORKER_MODEL_SWAPS.labels(self.model, "refused").inc()
            log.error(
                "event=model_refused model=%s version=%s serving=%s reason=%r",
                self.model,
                version,
                self._serving,
                str(exc),
            )
            return None
        outcome = "added" if self._serving is None else "swapped"
        self._serving = version
        WORKER_MODEL_SWAPS.labels(self.model, outcome).inc()
        return model


def model_of(root: Path) -> str:
    """The model whose registry ``root`` is (:func:`models.registry.model_root`'s inverse)."""
    return root.name if root.parent.name == MODELS_DIR else DEFAULT_MODEL


async def reembed_active(
    store: Store,
    model_version: str,
    *,
    rate_per_s: float,
    max_users: int,
    stop: asyncio.Event,
    page: int = 100,
    clock: Clock = now_ms,
    model: str = DEFAULT_MODEL,
) -> int:
    """Queue active users whose ``model`` record is not yet by ``model_version`` (all of
    them for a model just added: its backfill), most recent first, at most
    ``rate_per_s``; only the worker that claims the job does it. Returns how many
    users were queued."""
    job = (
        f"reembed:{model_version}" if model == DEFAULT_MODEL else f"reembed:{model}:{model_version}"
    )
    if not await store.claim_job(job, ttl_ms=24 * 3_600_000):
        log.info(
            "event=reembed_skipped model=%s version=%s reason='another worker does it'",
            model,
            model_version,
        )
        return 0
    queued = start = cursor = 0
    log.info(
        "event=reembed_started model=%s version=%s rate=%.0f/s", model, model_version, rate_per_s
    )
    while not stop.is_set() and start < max_users:
        users, cursor = await store.active_users(cursor, min(page, max_users - start))
        if not users:
            if cursor == 0:
                break
            continue
        records = await store.get_embeddings(users, model)
        now = clock()
        todo = {
            user_id: now
            for user_id, record in zip(users, records, strict=True)
            if record is None or record.model_version != model_version
        }
        await store.mark_dirty(todo)
        WORKER_REEMBED_ENQUEUED.labels(model).inc(len(todo))
        queued += len(todo)
        start += len(users)
        if start % (50 * page) == 0:
            log.info(
                "event=reembed_progress model=%s version=%s scanned=%d queued=%d",
                model,
                model_version,
                start,
                queued,
            )
        await sleep_unless_stopped(stop, len(users) / rate_per_s)
        if cursor == 0:
            break
    log.info(
        "event=reembed_done model=%s version=%s scanned=%d queued=%d",
        model,
        model_version,
        start,
        queued,
    )
    return queued
