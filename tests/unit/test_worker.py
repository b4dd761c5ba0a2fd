from __future__ import annotations

import numpy as np
import pytest

from models.registry import ModelArtifact
from service.ingest import FeatureUpdater
from service.runtime import ModelRuntime, OnnxModelRuntime
from service.store import MemoryStore
from service.tensors import InputSchema, Tensors, assemble
from service.worker import EmbeddingWorker, WorkerConfig
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

    version, provider, output_dim = "broken", "CPUExecutionProvider", 8
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
