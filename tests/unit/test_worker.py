from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest

from models.registry import ModelArtifact, install
from models.standin import publish_standin
from service.core.embeddings import EmbeddingRecord
from service.core.stabilization import StabilizationConfig
from service.core.tensors import InputSchema, Tensors, assemble
from service.ingest.updater import FeatureUpdater
from service.store.memory import MemoryStore
from service.worker.embedding_worker import EmbeddingWorker, WorkerConfig
from service.worker.runtime import ModelRuntime, OnnxModelRuntime
from service.worker.serving_model import ServingModel, load_serving_model
from tests.helpers import BASE_TS, event, log_of

NOW = BASE_TS + 1000


def clock() -> int:
    return NOW


@pytest.fixture
def runtime(standin: ModelArtifact) -> OnnxModelRuntime:
    return OnnxModelRuntime.from_artifact(standin)


async def test_dirty_users_get_embeddings_from_their_latest_features(
    runtime: OnnxModelRuntime,
) -> None:
    store = MemoryStore()
    updater = FeatureUpdater(store, history_length=20, clock=clock)
    await updater.apply(log_of([event("u1", item_id=1), event("u2", item_id=2)]))
    await updater.apply(log_of([event("u1", item_id=3, ts=BASE_TS + 5)], first_offset=2))
    worker = EmbeddingWorker(store, runtime, WorkerConfig(max_wait_ms=0), clock=clock)

    assert await worker.run_once() == 2
    (u1, u2) = await store.get_embeddings(["u1", "u2"])
    (f1,) = await store.get_features(["u1"])
    assert u1 is not None and u2 is not None and f1 is not None
    assert u1.feature_version == f1.version == 2
    assert (u1.model_version, u1.space_version, u1.computed_at_ms) == (
        "standin-1",
        "standin-1",
        NOW,
    )
    assert u1.vector.dtype == np.float16
    expected = runtime.infer(assemble([f1], NOW, runtime.schema))[0]
    np.testing.assert_allclose(u1.vector.astype(np.float32), expected, atol=1e-3)
    assert (await store.dirty_stats()).depth == 0
    assert await worker.run_once() == 0


async def test_micro_batches_are_bounded_and_oldest_first(runtime: OnnxModelRuntime) -> None:
    store = MemoryStore()
    updater = FeatureUpdater(store, history_length=20)
    await updater.apply(log_of([event(f"u{i}") for i in range(10)]))
    await store.pop_dirty(100)
    await store.mark_dirty({f"u{i}": 1000 - i for i in range(10)})  # u9 is the oldest
    worker = EmbeddingWorker(store, runtime, WorkerConfig(batch_size=4, max_wait_ms=0))
    assert await worker.run_once() == 4
    done = await store.get_embeddings([f"u{i}" for i in range(10)])
    assert [i for i, r in enumerate(done) if r is not None] == [6, 7, 8, 9]


async def test_users_without_features_are_skipped(runtime: OnnxModelRuntime) -> None:
    store = MemoryStore()
    await store.mark_dirty({"ghost": 1})
    worker = EmbeddingWorker(store, runtime, WorkerConfig(max_wait_ms=0))
    assert await worker.run_once() == 0
    assert await store.get_embeddings(["ghost"]) == [None]


class FailingRuntime:
    """A runtime whose device fails: the batch must go back to the queue."""

    version, provider, precision, output_dim = "broken", "CPUExecutionProvider", "fp32", 8
    schema = InputSchema(history_length=20)

    def infer(self, inputs: Tensors) -> np.ndarray:
        raise RuntimeError("device lost")


async def test_a_failed_batch_returns_to_the_queue_with_its_dirty_times() -> None:
    store = MemoryStore()
    await FeatureUpdater(store, history_length=20).apply(log_of([event("u1")]))
    (popped,) = await store.pop_dirty(1)
    await store.mark_dirty({"u1": popped[1]})
    runtime: ModelRuntime = FailingRuntime()
    worker = EmbeddingWorker(store, runtime, WorkerConfig(max_wait_ms=0))
    with pytest.raises(RuntimeError, match="device lost"):
        await worker.run_once()
    assert await store.pop_dirty(5) == [("u1", popped[1])]


def no_smoothing() -> WorkerConfig:
    return WorkerConfig(max_wait_ms=0, stabilization=StabilizationConfig(enabled=False))


async def embedded_users(store: MemoryStore, n: int, prefix: str = "u") -> list[str]:
    users = [f"{prefix}{i}" for i in range(n)]
    updater = FeatureUpdater(store, history_length=20, clock=clock)
    await updater.apply(log_of([event(u, item_id=i) for i, u in enumerate(users)]))
    return users


async def test_the_pipelined_loop_drains_the_queue_and_releases_every_lease(
    runtime: OnnxModelRuntime,
) -> None:
    store = MemoryStore()
    users = await embedded_users(store, 50)
    worker = EmbeddingWorker(store, runtime, WorkerConfig(batch_size=8, max_wait_ms=0))
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    while worker.embedded_total < 50:
        await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert worker.embedded_total == 50  # each user once
    assert all(r is not None for r in await store.get_embeddings(users))
    stats = await store.dirty_stats()
    assert (stats.depth, stats.leased) == (0, 0)


async def test_recomputation_is_stabilized_against_the_served_record(
    runtime: OnnxModelRuntime,
) -> None:
    store = MemoryStore()
    (user,) = await embedded_users(store, 1)
    config = StabilizationConfig(time_constant_s=60, min_weight=0.25, max_step=3.0)
    served = np.zeros(runtime.output_dim, np.float32)
    served[0] = 1.0  # what rankers saw a moment ago
    await store.put_embeddings({user: EmbeddingRecord(served, "standin-1", "standin-1", NOW, 1)})
    worker = EmbeddingWorker(
        store, runtime, WorkerConfig(max_wait_ms=0, dtype="float32", stabilization=config), clock
    )
    assert await worker.run_once() == 1
    (record,) = await store.get_embeddings([user])
    (state,) = await store.get_features([user])
    assert record is not None and state is not None
    fresh = runtime.infer(assemble([state], NOW, runtime.schema))[0]
    theta = np.arccos(np.clip(fresh @ served, -1, 1))
    moved = np.arccos(np.clip(record.vector @ served, -1, 1))
    assert moved == pytest.approx(0.25 * theta, abs=1e-3)  # age 0: min_weight of the way
    assert np.linalg.norm(record.vector) == pytest.approx(1.0, abs=1e-5)


async def test_a_record_in_another_space_is_not_blended(runtime: OnnxModelRuntime) -> None:
    store = MemoryStore()
    (user,) = await embedded_users(store, 1)
    other = np.full(runtime.output_dim, 1 / np.sqrt(runtime.output_dim), np.float32)
    await store.put_embeddings({user: EmbeddingRecord(other, "old", "old", NOW, 1)})
    worker = EmbeddingWorker(store, runtime, WorkerConfig(max_wait_ms=0, dtype="float32"), clock)
    await worker.run_once()
    (record,), (state,) = await store.get_embeddings([user]), await store.get_features([user])
    assert record is not None and state is not None
    fresh = runtime.infer(assemble([state], NOW, runtime.schema))[0]
    np.testing.assert_allclose(record.vector, fresh, atol=1e-6)


async def test_an_aligned_model_serves_in_its_parents_space(
    standin: ModelArtifact, standin_registry: Path, tmp_path: Path
) -> None:
    store = MemoryStore()
    users = await embedded_users(store, 30)
    states = [s for s in await store.get_features(users) if s is not None]
    root = tmp_path / "registry"
    install(root, standin)
    publish_standin(
        root,
        version="standin-2",
        history_length=20,
        seed=5,
        parent_version="standin-1",
        alignment_states=states,
    )
    model = load_serving_model(root)
    assert (model.version, model.space_version) == ("standin-2", "standin-1")
    assert model.to_space is not None
    worker = EmbeddingWorker(store, model, WorkerConfig(max_wait_ms=0, dtype="float32"), clock)
    await worker.run_once()
    records = await store.get_embeddings(users)
    assert all(
        r and (r.model_version, r.space_version) == ("standin-2", "standin-1") for r in records
    )
    raw = model.runtime.infer(assemble(states, NOW, model.runtime.schema))
    served = np.stack([r.vector for r in records if r is not None])
    np.testing.assert_allclose(served, raw @ model.to_space, atol=1e-5)


async def test_a_swap_takes_effect_from_the_next_batch(
    runtime: OnnxModelRuntime, standin: ModelArtifact, tmp_path: Path
) -> None:
    store = MemoryStore()
    users = await embedded_users(store, 4)
    worker = EmbeddingWorker(store, runtime, WorkerConfig(batch_size=2, max_wait_ms=0))
    await worker.run_once()
    second = publish_standin(tmp_path, version="standin-9", history_length=20, seed=9)
    worker.swap(ServingModel.unaligned(OnnxModelRuntime.from_artifact(second)))
    await worker.run_once()
    versions = [r.model_version for r in await store.get_embeddings(users) if r is not None]
    assert sorted(versions) == ["standin-1", "standin-1", "standin-9", "standin-9"]
