"""Several models side by side: one claim, one fetch, one assemble per schema feed
every model; each model keeps its own records, stabilization and failures; the set of
models follows the registry at run time."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from models.registry import model_root, retire_model, served_models
from models.standin import publish_standin
from service.core.model_names import DEFAULT_MODEL
from service.core.stabilization import stabilize
from service.core.tensors import InputSchema, assemble
from service.ingest.updater import FeatureUpdater
from service.settings import Settings
from service.store.memory import MemoryStore
from service.worker.embedding_worker import EmbeddingWorker, WorkerConfig
from service.worker.role import WorkerRole
from service.worker.serving_model import ServingModel, load_serving_model
from tests.helpers import BASE_TS, event, log_of

NOW = BASE_TS + 1000
USERS = [f"u{i}" for i in range(6)]


def clock() -> int:
    return NOW


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
def registry(tmp_path: Path) -> Path:
    """A default model (128-d) and a model 'clicks' of another dimension and history."""
    root = tmp_path / "registry"
    publish_standin(root, version="base-1", history_length=20)
    publish_standin(
        model_root(root, "clicks"), version="clicks-1", history_length=10, output_dim=32, seed=3
    )
    return root


async def _fed_store() -> MemoryStore:
    store = MemoryStore()
    updater = FeatureUpdater(store, history_length=20, clock=clock)
    await updater.apply(log_of([event(u, item_id=i) for i, u in enumerate(USERS)]))
    return store


def _models(root: Path) -> dict[str, ServingModel]:
    return {name: load_serving_model(model_root(root, name)) for name in served_models(root)}


async def test_one_batch_writes_every_models_record_from_one_claim(registry: Path) -> None:
    store = await _fed_store()
    models = _models(registry)
    assert list(models) == [DEFAULT_MODEL, "clicks"]
    worker = EmbeddingWorker(store, models, WorkerConfig(max_wait_ms=0), clock=clock)
    written = "userembed_worker_embeddings_total"
    infer = "userembed_worker_stage_seconds_count"
    before = {m: (metric(written, model=m), metric(infer, model=m, stage="infer")) for m in models}
    fetches = metric(infer, model="", stage="fetch")
    assert await worker.run_once() == 2 * len(USERS)
    for name in models:  # per model, and the shared stages once
        assert metric(written, model=name) - before[name][0] == len(USERS)
        assert metric(infer, model=name, stage="infer") - before[name][1] == 1
    assert metric(infer, model="", stage="fetch") - fetches == 1
    for name, model in models.items():
        info = {"model": name, "version": model.version, "space": model.space_version}
        labels = {**info, "provider": model.runtime.provider}
        labels["precision"] = model.runtime.precision
        assert metric("userembed_worker_model_info", **labels) == 1
    states = await store.get_features(USERS)
    for name, model in models.items():
        records = await store.get_embeddings(USERS, name)
        assert all(r is not None for r in records)
        expected = model.embed(assemble(states, NOW, model.runtime.schema))  # type: ignore[arg-type]
        got = np.stack([r.vector.astype(np.float32) for r in records])  # type: ignore[union-attr]
        np.testing.assert_allclose(got, expected, atol=2e-3)
        assert {r.model_version for r in records if r} == {model.version}
    assert models["clicks"].runtime.schema == InputSchema(history_length=10)
    assert (await store.dirty_stats()).leased == 0


class _Broken:
    """A model whose device fails."""

    def __init__(self, model: ServingModel) -> None:
        self.runtime = model.runtime
        self.version, self.space_version = model.version, model.space_version
        self.normalized, self.to_space = True, None

    def embed(self, tensors: object) -> np.ndarray:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")


async def test_a_model_that_fails_is_skipped_alone(registry: Path) -> None:
    store = await _fed_store()
    models = _models(registry)
    broken = {DEFAULT_MODEL: models[DEFAULT_MODEL], "clicks": _Broken(models["clicks"])}
    worker = EmbeddingWorker(store, broken, WorkerConfig(max_wait_ms=0), clock=clock)  # type: ignore[arg-type]
    skipped = "userembed_worker_skipped_total"
    before = [metric(skipped, model=m, reason="model_failed") for m in (DEFAULT_MODEL, "clicks")]
    assert await worker.run_once() == len(USERS)
    after = [metric(skipped, model=m, reason="model_failed") for m in (DEFAULT_MODEL, "clicks")]
    assert [a - b for a, b in zip(after, before, strict=True)] == [0, len(USERS)]
    assert all(r is not None for r in await store.get_embeddings(USERS))
    assert await store.get_embeddings(USERS, "clicks") == [None] * len(USERS)
    assert (await store.dirty_stats()).depth == 0  # the batch is done, not retried forever


async def test_a_batch_where_every_model_fails_goes_back_to_the_queue(registry: Path) -> None:
    store = await _fed_store()
    models = {name: _Broken(model) for name, model in _models(registry).items()}
    worker = EmbeddingWorker(store, models, WorkerConfig(max_wait_ms=0), clock=clock)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="illegal memory access"):
        await worker.run_once()
    assert (await store.dirty_stats()).depth == len(USERS)


async def test_models_are_stabilized_each_against_its_own_record(registry: Path) -> None:
    store = await _fed_store()
    models = _models(registry)
    config = WorkerConfig(max_wait_ms=0)
    worker = EmbeddingWorker(store, models, config, clock=clock)
    await worker.run_once()
    first = {name: await store.get_embeddings(USERS, name) for name in models}
    updater = FeatureUpdater(store, history_length=20, clock=clock)
    await updater.apply(log_of([event(u, item_id=99) for u in USERS], first_offset=10))
    later = EmbeddingWorker(store, models, config, clock=lambda: NOW + 1)
    await later.run_once()
    states = await store.get_features(USERS)
    for name, model in models.items():
        prior = np.stack([r.vector.astype(np.float32) for r in first[name] if r])
        fresh = model.embed(assemble(states, NOW + 1, model.runtime.schema))  # type: ignore[arg-type]
        expected = stabilize(
            fresh,
            prior,
            np.ones(len(USERS), dtype=np.int64),
            np.ones(len(USERS), dtype=bool),
            normalized=model.normalized,
            config=config.stabilization,
        )
        after = np.stack(
            [r.vector.astype(np.float32) for r in await store.get_embeddings(USERS, name) if r]
        )
        assert after.shape == (len(USERS), model.runtime.output_dim)
        np.testing.assert_allclose(after, expected, atol=2e-3)
        assert not np.allclose(after, fresh, atol=2e-3)  # a step, not the fresh vector


async def test_the_role_adds_and_retires_models_as_the_registry_changes(
    registry: Path,
) -> None:
    retire_model(registry, "clicks")
    settings = Settings(registry_path=registry, worker_model_poll_s=0.02, reembed_rate=1e6)
    store = await _fed_store()
    role = WorkerRole(settings, store)
    stop = asyncio.Event()
    task = asyncio.create_task(role.run(stop))
    try:
        for _ in range(500):
            if role.worker is not None and await store.get_embeddings(USERS) != [None] * 6:
                break
            await asyncio.sleep(0.02)
        assert role.worker is not None and list(role.worker.models) == [DEFAULT_MODEL]
        assert all(r is not None for r in await store.get_embeddings(USERS))
        # a new model: loaded, served, and its active users backfilled
        publish_standin(
            model_root(registry, "likes"), version="likes-1", history_length=20, output_dim=16
        )
        for _ in range(500):
            if None not in await store.get_embeddings(USERS, "likes"):
                break
            await asyncio.sleep(0.02)
        assert list(role.worker.models) == [DEFAULT_MODEL, "likes"]
        assert {r.dim for r in await store.get_embeddings(USERS, "likes") if r} == {16}
        # retired: no longer computed, the others go on
        retire_model(registry, "likes")
        for _ in range(500):
            if list(role.worker.models) == [DEFAULT_MODEL]:
                break
            await asyncio.sleep(0.02)
        assert list(role.worker.models) == [DEFAULT_MODEL]
        # the last model is never retired from under the worker
        retire_model(registry, DEFAULT_MODEL)
        await asyncio.sleep(0.2)
        assert list(role.worker.models) == [DEFAULT_MODEL]
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_a_corrupted_new_model_is_refused_while_the_others_serve(registry: Path) -> None:
    bad = model_root(registry, "broken")
    publish_standin(bad, version="broken-1", history_length=20)
    (bad / "broken-1" / "model.onnx").write_bytes(b"not onnx")
    settings = Settings(registry_path=registry, worker_model_poll_s=0.02)
    role = WorkerRole(settings, await _fed_store())
    swaps = "userembed_worker_model_swaps_total"
    refused = metric(swaps, model="broken", outcome="refused")
    stop = asyncio.Event()
    task = asyncio.create_task(role.run(stop))
    try:
        for _ in range(500):
            if role.ready.is_set():
                break
            await asyncio.sleep(0.02)
        assert role.worker is not None
        assert list(role.worker.models) == [DEFAULT_MODEL, "clicks"]
        assert metric(swaps, model="broken", outcome="refused") - refused == 1
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


async def test_one_model_is_hot_swapped_and_a_corrupted_version_refused_while_both_serve(
    registry: Path,
) -> None:
    settings = Settings(registry_path=registry, worker_model_poll_s=0.02, reembed_rate=1e6)
    store = await _fed_store()
    role = WorkerRole(settings, store)
    stop = asyncio.Event()
    task = asyncio.create_task(role.run(stop))
    reads: list[tuple[int, int]] = []  # (default records found, clicks records found)

    async def read_both() -> None:
        while not stop.is_set():
            found = await store.get_model_embeddings(USERS, [DEFAULT_MODEL, "clicks"])
            reads.append(
                (sum(r is not None for r in found[0]), sum(r is not None for r in found[1]))
            )
            await asyncio.sleep(0.005)

    async def versions() -> tuple[set[str], set[str]]:
        found = await store.get_model_embeddings(USERS, [DEFAULT_MODEL, "clicks"])
        return ({r.model_version for r in found[0] if r}, {r.model_version for r in found[1] if r})

    try:
        for _ in range(500):
            if await versions() == ({"base-1"}, {"clicks-1"}):
                break
            await asyncio.sleep(0.02)
        assert await versions() == ({"base-1"}, {"clicks-1"})
        reader = asyncio.create_task(read_both())
        # a new version of one model: swapped and re-embedded alone
        publish_standin(
            model_root(registry, "clicks"), version="clicks-2", history_length=10, output_dim=32
        )
        for _ in range(500):
            if await versions() == ({"base-1"}, {"clicks-2"}):
                break
            await asyncio.sleep(0.02)
        assert await versions() == ({"base-1"}, {"clicks-2"})
        # a corrupted version of the other: refused, both keep their models
        publish_standin(registry, version="base-2", history_length=20)
        (registry / "base-2" / "model.onnx").write_bytes(b"corrupted")
        await asyncio.sleep(0.3)
        assert role.worker is not None
        assert {n: m.version for n, m in role.worker.models.items()} == {
            DEFAULT_MODEL: "base-1",
            "clicks": "clicks-2",
        }
        assert await versions() == ({"base-1"}, {"clicks-2"})
        stop.set()
        await reader
        assert reads and all(found == (len(USERS), len(USERS)) for found in reads)
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
