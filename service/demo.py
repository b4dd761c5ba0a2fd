"""``userembed demo``: the whole pipeline in one process on the embedded default.

synthetic traffic -> in-process event source -> feature updater -> store
-> embedding worker -> read API on HTTP. Same classes as the production roles;
only the event source and (by default) the store are the embedded implementations.
Two models are served side by side: the committed SUM model as ``default`` and, as
``compact``, a 32-d stand-in (untrained: it shows a second model of another
dimension computed from the same fetch, not a second objective).
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import TextIO

from models.default import ensure_default_model
from models.registry import ModelArtifact, current_version, load_artifact, model_root
from models.standin import publish_standin
from models.world import World, WorldConfig
from service.api.app import create_app
from service.api.cold_start import RegistryColdStart
from service.api.server import EmbeddedServer, http_config, install_stop_handlers
from service.core.clock import now_ms, sleep_unless_stopped
from service.ingest.synthetic import EventGenerator
from service.ingest.updater import FeatureUpdater, InProcessEventSource, run_ingest
from service.settings import Settings
from service.store.connect import open_checked_store
from service.store.protocol import Store
from service.worker.embedding_worker import EmbeddingWorker, WorkerConfig
from service.worker.runtime import OnnxModelRuntime
from service.worker.serving_model import ServingModel

log = logging.getLogger(__name__)


async def _generate(
    source: InProcessEventSource, traffic: EventGenerator, rate: float, stop: asyncio.Event
) -> None:
    """Publish events at ``rate`` per second, in 20 ms ticks, without drifting."""
    tick, owed, last = 0.02, 0.0, time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(tick)
        now = time.monotonic()
        owed += rate * (now - last)
        last = now
        count = int(owed)
        if count:
            owed -= count
            await source.send(traffic.events(count, now_ms()))


async def _report(
    store: Store,
    updater: FeatureUpdater,
    worker: EmbeddingWorker,
    stop: asyncio.Event,
    out: TextIO,
    interval_s: float = 1.0,
) -> None:
    """A live status line: events/s, embeddings/s, queue depth, oldest dirty age."""
    interactive = out.isatty()
    prev_events, prev_embedded, prev_t = 0, 0, time.monotonic()
    while not stop.is_set():
        await sleep_unless_stopped(stop, interval_s)
        now = time.monotonic()
        stats = await store.dirty_stats()
        events, embedded = updater.applied_total, worker.embedded_total
        elapsed = max(now - prev_t, 1e-9)
        oldest = 0.0 if stats.oldest_ms is None else (now_ms() - stats.oldest_ms) / 1000
        line = (
            f"events/s={(events - prev_events) / elapsed:8.0f}  "
            f"embeddings/s={(embedded - prev_embedded) / elapsed:8.0f}  "
            f"queue={stats.depth:7d}  oldest_dirty={oldest:6.2f}s  "
            f"events={events}  embeddings={embedded}"
        )
        out.write(("\r" + line) if interactive else line + "\n")
        out.flush()
        prev_events, prev_embedded, prev_t = events, embedded, now
    if interactive:
        out.write("\n")


COMPACT = "compact"


def _ensure_compact_model(settings: Settings) -> ModelArtifact:
    """The demo's second model: a 32-d stand-in, published once into the registry."""
    root = model_root(settings.registry_path, COMPACT)
    if current_version(root) is None:
        return publish_standin(
            root, version="compact-1", history_length=settings.history_length, output_dim=32
        )
    return load_artifact(root)


async def run_demo(settings: Settings, *, duration_s: float | None = None) -> None:
    """Run until Ctrl-C / SIGTERM (or ``duration_s``), then stop every part cleanly."""
    artifact = ensure_default_model(settings.registry_path, settings.history_length)
    runtime = OnnxModelRuntime.from_artifact(artifact)
    compact = OnnxModelRuntime.from_artifact(_ensure_compact_model(settings))
    store = await open_checked_store(settings)
    source = InProcessEventSource()
    updater = FeatureUpdater(store, settings.history_length)
    models = {"default": ServingModel.unaligned(runtime), COMPACT: ServingModel.unaligned(compact)}
    worker = EmbeddingWorker(store, models, WorkerConfig.from_settings(settings))
    # seed 0: the world the default model was trained on (same items and categories)
    traffic = World(WorldConfig(users=settings.demo_users, seed=0))
    app = create_app(store, settings, RegistryColdStart(settings.registry_path), event_sink=source)
    server = EmbeddedServer(http_config(app, settings.api_host, settings.api_port))

    stop = asyncio.Event()

    def request_stop() -> None:
        stop.set()
        server.should_exit = True

    install_stop_handlers(request_stop)
    tasks = [
        asyncio.create_task(_generate(source, traffic, settings.demo_event_rate, stop)),
        asyncio.create_task(run_ingest(source, updater, stop)),
        asyncio.create_task(worker.run(stop)),
    ]
    serving = asyncio.create_task(server.serve())
    while not server.started and not serving.done():
        await asyncio.sleep(0.05)
    if serving.done():
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise SystemExit(f"could not start the API on {settings.api_host}:{settings.api_port}")

    base = f"http://{settings.api_host}:{settings.api_port}"
    print(
        f"userembed demo: models default ({runtime.version}, {runtime.output_dim}-d) and "
        f"{COMPACT} ({compact.version}, {compact.output_dim}-d) on {runtime.provider}, store "
        f"{settings.redis_url}, {settings.demo_users} users, "
        f"{settings.demo_event_rate:.0f} events/s. Ctrl-C stops.\n"
        f"  curl -s {base}/v1/users/u42/embedding\n"
        f"  curl -s '{base}/v1/users/u42/embedding?model={COMPACT}'\n"
        f"  curl -s {base}/v1/models\n"
        f"  curl -s -X POST {base}/v1/embeddings:batchGet "
        f'-H \'content-type: application/json\' -d \'{{"user_ids": ["u1", "u2"]}}\'\n'
        f"  curl -s {base}/metrics",
        flush=True,
    )
    tasks.append(asyncio.create_task(_report(store, updater, worker, stop, sys.stdout)))
    if duration_s is not None:
        asyncio.get_running_loop().call_later(duration_s, request_stop)
    await serving
    request_stop()
    await asyncio.gather(*tasks)
    await store.close()
    print("userembed demo: stopped cleanly", flush=True)
