"""Registry watching, refusal of bad artifacts, re-embedding after a swap, and readiness."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import numpy as np
from prometheus_client import REGISTRY

from models.registry import ModelArtifact, install, model_root
from models.standin import publish_standin
from service.api.ops_server import serve_ops
from service.core.embeddings import EmbeddingRecord
from service.core.features import FeatureState
from service.settings import Settings
from service.store.memory import MemoryStore
from service.store.redis_server import free_port
from service.worker.model_watch import ModelLoader, ModelWatcher, reembed_active
from service.worker.role import WorkerRole
from service.worker.serving_model import ServingModel, load_serving_model
from tests.helpers import BASE_TS


def swaps(outcome: str, model: str = "default") -> float:
    labels = {"model": model, "outcome": outcome}
    return REGISTRY.get_sample_value("userembed_worker_model_swaps_total", labels) or 0.0


def reembed_enqueued(model: str) -> float:
    labels = {"model": model}
    return REGISTRY.get_sample_value("userembed_worker_reembed_enqueued_total", labels) or 0.0


def counting_loader(root: Path) -> tuple[list[str], ModelLoader]:
    calls: list[str] = []

    def load(version: str) -> ServingModel:
        calls.append(version)
        return load_serving_model(root, version)

    return calls, load


async def test_a_corrupted_version_is_refused_once_and_a_good_one_swapped_in(
    standin: ModelArtifact, tmp_path: Path
) -> None:
    root = tmp_path / "registry"
    install(root, standin)
    calls, load = counting_loader(root)
    watcher = ModelWatcher(root, "standin-1", load)
    assert await watcher.check() is None and calls == []  # nothing new

    publish_standin(root, version="standin-2", history_length=20, seed=2)
    model_file = root / "standin-2" / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[:-10] + b"corrupted!")
    before = swaps("refused")
    assert await watcher.check() is None
    assert swaps("refused") == before + 1
    assert await watcher.check() is None and calls == ["standin-2"]  # not retried

    publish_standin(root, version="standin-3", history_length=20, seed=3)
    swapped = swaps("swapped")
    model = await watcher.check()
    assert model is not None and model.version == "standin-3"
    assert swaps("swapped") == swapped + 1
    assert await watcher.check() is None


async def test_a_schema_mismatch_is_refused(standin: ModelArtifact, tmp_path: Path) -> None:
    root = tmp_path / "registry"
    install(root, standin)
    other = publish_standin(root, version="standin-l30", history_length=30, make_current=False)
    manifest = other.directory / "manifest.json"
    manifest.write_bytes(
        manifest.read_bytes().replace(b'"history_length": 30', b'"history_length": 31', 1)
    )
    (root / "CURRENT").write_text("standin-l30")  # by hand: set_current would refuse it
    _, load = counting_loader(root)
    assert await ModelWatcher(root, "standin-1", load).check() is None


async def test_reembedding_queues_active_users_most_recent_first_once() -> None:
    store = MemoryStore()
    for i in range(5):  # u4 is the most recently active
        await store.put_features({f"u{i}": FeatureState.empty()}, dirty_at_ms=BASE_TS + i)
    await store.pop_dirty(100)
    done = EmbeddingRecord(np.zeros(4, np.float32), "v2", "v2", BASE_TS, 1)
    await store.put_embeddings({"u3": done})  # already embedded by the new model
    stop = asyncio.Event()
    before = reembed_enqueued("default")
    queued = await reembed_active(
        store, "v2", rate_per_s=1e6, max_users=100, stop=stop, page=2, clock=lambda: 7
    )
    assert queued == 4 and reembed_enqueued("default") == before + 4
    assert await store.pop_dirty(10) == [("u0", 7), ("u1", 7), ("u2", 7), ("u4", 7)]
    assert await reembed_active(store, "v2", rate_per_s=1e6, max_users=100, stop=stop) == 0


async def test_the_worker_role_waits_for_a_model_then_reports_ready(
    standin: ModelArtifact, tmp_path: Path
) -> None:
    root = tmp_path / "registry"
    settings = Settings(registry_path=root, worker_model_poll_s=0.05)
    role = WorkerRole(settings, MemoryStore())
    port = free_port()
    server = serve_ops("127.0.0.1", port, role.ready.is_set)
    stop = asyncio.Event()
    task = asyncio.create_task(role.run(stop))
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            await asyncio.sleep(0.2)
            assert (await client.get("/readyz")).status_code == 503
            assert (await client.get("/healthz")).status_code == 200
            install(root, standin)
            for _ in range(200):
                if role.ready.is_set():
                    break
                await asyncio.sleep(0.02)
            assert (await client.get("/readyz")).status_code == 200
            metrics = (await client.get("/metrics")).text
            assert (
                "userembed_worker_model_info{" in metrics
                and "userembed_worker_ready 1.0" in metrics
            )
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        server.shutdown()


async def test_a_named_models_watcher_counts_under_its_name(
    standin: ModelArtifact, tmp_path: Path
) -> None:
    root = model_root(tmp_path / "registry", "clicks")
    install(root, standin)
    _, load = counting_loader(root)
    watcher = ModelWatcher(root, "standin-1", load)
    assert watcher.model == "clicks"
    assert ModelWatcher(tmp_path / "registry", "standin-1", load).model == "default"
    assert ModelWatcher(root, "standin-1", load, model="likes").model == "likes"
    publish_standin(root, version="standin-2", history_length=20, seed=2)
    (root / "standin-2" / "model.onnx").write_bytes(b"not onnx")
    before = (swaps("refused", "clicks"), swaps("refused"))
    assert await watcher.check() is None
    assert (swaps("refused", "clicks"), swaps("refused")) == (before[0] + 1, before[1])
