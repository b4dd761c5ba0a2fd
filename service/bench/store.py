"""Store benchmark: per-operation costs of RedisStore on a local Redis Cluster next to a
single redis-server, same data and client code, one run. Here: the data, the sections and
the run; store_probes counts what they cost, store_report prints it."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt
import redis.asyncio as aioredis
import uvloop

from service.bench.provenance import commit_id, machine
from service.bench.store_probes import (
    Topology,
    cluster_topology,
    counting_requests,
    measure,
    single_topology,
)
from service.bench.store_report import print_header, print_result
from service.bench.store_rows import MemoryRow, OpRow, StoreBenchConfig, StoreBenchResult
from service.core.clock import now_ms
from service.core.embeddings import EmbeddingDtype, EmbeddingRecord, encode_embedding
from service.core.events import SourcedEvent
from service.core.features import FeatureState, apply_events, encode_features
from service.core.model_names import DEFAULT_MODEL
from service.ingest.synthetic import SyntheticTraffic
from service.ingest.updater import FeatureUpdater
from service.store.keys import KeyLayout
from service.store.redis import RedisStore
from service.store.redis_server import private_redis, private_redis_cluster

__all__ = ["MemoryRow", "OpRow", "StoreBenchConfig", "StoreBenchResult", "run_store_bench"]

DIM: Final = 128
TOKEN: Final = "bench-store"
LEASE_MS: Final = 600_000  # nothing expires during a run
TEMPLATES: Final = 32  # distinct feature states the users' states are drawn from
VECTORS: Final = 256  # distinct embedding vectors the records are drawn from
MEMORY_SAMPLE: Final = 200  # keys per kind read with MEMORY USAGE


# --- data --------------------------------------------------------------------


def _templates(history: int, count: int = TEMPLATES) -> list[FeatureState]:
    """Full feature states (``history`` events each) built by the ingest code path,
    at partition 0 offsets below the benchmark's own."""
    now = now_ms()
    states = []
    for k in range(count):
        events = SyntheticTraffic(1, seed=1000 + k).events(history, now - 86_400_000)
        log = [SourcedEvent(e, 0, i) for i, e in enumerate(events)]
        states.append(apply_events(FeatureState.empty(), log, history)[0])
    return states


def _vectors(dtype: EmbeddingDtype) -> npt.NDArray[np.floating]:
    vectors = np.random.default_rng(3).standard_normal((VECTORS, DIM))
    unit: npt.NDArray[np.floating] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return unit.astype(dtype)


def _records(
    users: Sequence[str], vectors: npt.NDArray[np.floating], versions: Sequence[int] | None = None
) -> dict[str, EmbeddingRecord]:
    at = now_ms()
    return {
        u: EmbeddingRecord(
            vectors[i % len(vectors)], "bench", "bench", at, versions[i] if versions else 1
        )
        for i, u in enumerate(users)
    }


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def _load_features(
    store: RedisStore,
    users: Sequence[str],
    templates: Sequence[FeatureState],
    dirty_at_ms: int | None = None,
) -> None:
    for start in range(0, len(users), 1000):
        chunk = users[start : start + 1000]
        states = {u: templates[(start + i) % len(templates)] for i, u in enumerate(chunk)}
        await store.put_features(states, dirty_at_ms=dirty_at_ms)


async def _load_embeddings(
    store: RedisStore, users: Sequence[str], vectors: npt.NDArray[np.floating]
) -> None:
    for chunk in _chunks(users, 2000):
        await store.put_embeddings(_records(chunk, vectors))


async def _mark_spread(store: RedisStore, users: Sequence[str], seed: int) -> None:
    """Every user dirty at its own time, in a random order, so that the shards' heads
    interleave as under continuous traffic."""
    order = np.random.default_rng(seed).permutation(len(users)).tolist()
    base = now_ms() - len(users) - 1
    for start in range(0, len(users), 5000):
        part = order[start : start + 5000]
        await store.mark_dirty({users[i]: base + rank for rank, i in enumerate(part, start)})


def _clear_queues(topology: Topology, layout: KeyLayout) -> None:
    with topology.inspector() as client:
        for shard in range(layout.shards):
            for key in [*layout.queue_keys(shard), layout.active_key(shard)]:
                client.delete(key)


async def _opened(url: str, shards: int) -> RedisStore:
    store = RedisStore(url, timeout_ms=30_000, shards=shards)
    await store.open()
    return store


# --- sections ----------------------------------------------------------------


async def _pipeline_sections(
    topology: Topology, config: StoreBenchConfig, users: list[str], pool: Sequence[Any]
) -> list[OpRow]:
    """Ingest, worker and reads on one topology, on the same users and draws."""
    topology.flush()
    store = await _opened(topology.url, config.shards)
    rows: list[OpRow] = []
    try:
        await _load_features(store, users, _templates(50))
        # 1. ingest: batches of the event pool, cycled, at ever higher offsets
        updater = FeatureUpdater(store, history_length=50)
        batch = min(config.ingest_batch, len(pool))
        offsets = itertools.count(1_000_000_000)
        starts = itertools.cycle(range(0, len(pool) - batch + 1, batch))

        async def ingest() -> int:
            start = next(starts)
            events = [SourcedEvent(e, 0, next(offsets)) for e in pool[start : start + batch]]
            await updater.apply(events)
            return len(events)

        rows.append(
            await measure(topology, "ingest", f"apply b{batch}", "event", ingest, config.seconds)
        )

        # 2. worker store ops, oldest first from every user dirty at its own time
        _clear_queues(topology, store.layout)
        await _mark_spread(store, users, seed=1)
        vectors = _vectors("float16")

        async def work() -> int:
            claimed = await store.claim_dirty(
                config.worker_batch, token=TOKEN, now_ms=now_ms(), lease_ms=LEASE_MS
            )
            if not claimed:
                return 0
            ids = [u for u, _ in claimed]
            states, _ = await store.get_features_and_embeddings(ids)
            records = _records(ids, vectors, [s.version if s else 0 for s in states])
            await store.write_and_release(TOKEN, {DEFAULT_MODEL: records}, dict(claimed))
            return len(ids)

        name = f"claim+read+write b{config.worker_batch}"
        rows.append(
            await measure(
                topology,
                "worker",
                name,
                "embedding",
                work,
                config.seconds,
                warm_up=1,
                refill=lambda: _mark_spread(store, users, seed=1),
            )
        )

        # 3. reads: every user has a record
        await _load_embeddings(store, users, vectors)
        rows += await _read_rows(topology, store, config, users)
    finally:
        await store.close()
    return rows


def _draws(users: list[str], batch: int) -> Iterator[list[str]]:
    rng = np.random.default_rng(7 + batch)
    picks = rng.integers(0, len(users), (1024, batch)).tolist()
    return itertools.cycle([[users[i] for i in row] for row in picks])


async def _read_rows(
    topology: Topology, store: RedisStore, config: StoreBenchConfig, users: list[str]
) -> list[OpRow]:
    rows = []
    raw = aioredis.Redis.from_url(topology.url) if topology.name == "single" else None
    layout = store.layout
    try:
        for batch in (1, config.read_batch):
            for concurrency in (1, config.concurrency):
                draws = _draws(users, batch)
                key_draws = _draws(users, batch)  # the same users in the same order
                unit = "read" if batch == 1 else "batch"

                async def read(draws: Iterator[list[str]] = draws) -> int:
                    found = await store.get_embeddings(next(draws))
                    if any(r is None for r in found):
                        raise RuntimeError("a benchmark user has no embedding record")
                    return 1

                name = f"get {batch}"
                rows.append(
                    await measure(topology, "read", name, unit, read, config.seconds, concurrency)
                )
                if raw is None:
                    continue

                async def raw_read(
                    client: aioredis.Redis = raw, key_draws: Iterator[list[str]] = key_draws
                ) -> int:
                    keys = [layout.embedding_key(u) for u in next(key_draws)]
                    if len(keys) == 1:
                        await client.get(keys[0])
                    else:
                        await client.mget(keys)
                    return 1

                baseline = await measure(
                    topology, "read", name, unit, raw_read, config.seconds, concurrency
                )
                rows.append(_renamed(baseline, "raw-single"))
    finally:
        if raw is not None:
            await raw.aclose()
    return rows


def _renamed(row: OpRow, topology: str) -> OpRow:
    values = asdict(row)
    values["topology"] = topology
    return OpRow(**values)


async def _claim_rows(topology: Topology, config: StoreBenchConfig) -> list[OpRow]:
    """Users claimed per second with ``config.shards`` shards and with one."""
    users = [f"c{i}" for i in range(config.claim_users)]
    rows = []
    for shards in dict.fromkeys((config.shards, 1)):
        topology.flush()
        store = await _opened(topology.url, shards)
        try:
            await _mark_spread(store, users, seed=2)

            async def claim(store: RedisStore = store) -> int:
                found = await store.claim_dirty(
                    config.worker_batch, token=TOKEN, now_ms=now_ms(), lease_ms=LEASE_MS
                )
                return len(found)

            async def refill(store: RedisStore = store) -> None:
                await _mark_spread(store, users, seed=2)

            rows.append(
                await measure(
                    topology,
                    "claim",
                    f"claim {config.worker_batch} S={shards}",
                    "user",
                    claim,
                    config.seconds,
                    config.claim_concurrency,
                    warm_up=1,
                    refill=refill,
                )
            )
        finally:
            await store.close()
    return rows


async def _memory_row(
    topology: Topology,
    config: StoreBenchConfig,
    history: int,
    dtype: EmbeddingDtype,
    memkeys: list[str] | None = None,
) -> MemoryRow:
    """Load ``config.users`` users (feature state, dirty and active entries, embedding
    record) into an empty store and measure; ``memkeys`` gets the --memkeys summary."""
    users = [f"u{i}" for i in range(config.users)]
    templates = _templates(history)
    vectors = _vectors(dtype)
    topology.flush()
    primaries0, replicas0 = topology.memory(topology.primaries), topology.memory(topology.replicas)
    store = await _opened(topology.url, config.shards)
    try:
        await _load_features(store, users, templates, dirty_at_ms=now_ms())
        await _load_embeddings(store, users, vectors)
    finally:
        await store.close()  # its connections' buffers are not data
    topology.wait_replicas()
    await asyncio.sleep(0.2)
    primaries1, replicas1 = topology.memory(topology.primaries), topology.memory(topology.replicas)
    if memkeys is not None:
        memkeys.extend(_memkeys(topology))
    layout = KeyLayout(config.shards)
    sample = users[:: max(1, len(users) // MEMORY_SAMPLE)]
    with topology.inspector() as client:

        def usage(key: str) -> int:
            return int(client.memory_usage(key, samples=0) or 0)

        def per_entry(keys: Sequence[str], count: Callable[[str], int]) -> float:
            members = sum(count(k) for k in keys)
            return sum(usage(k) for k in keys) / members if members else 0.0

        shards = range(config.shards)
        feature = float(np.mean([usage(layout.feature_key(u)) for u in sample]))
        embedding = float(np.mean([usage(layout.embedding_key(u)) for u in sample]))
        dirty = per_entry([layout.dirty_key(s) for s in shards], client.zcard)
        active = per_entry([layout.active_key(s) for s in shards], client.zcard)
        store = await _opened(topology.url, config.shards)
        try:
            claimed = 0
            while claimed < min(len(users), 2048):
                found = await store.claim_dirty(
                    config.worker_batch, token=TOKEN, now_ms=now_ms(), lease_ms=LEASE_MS
                )
                if not found:
                    break
                claimed += len(found)
        finally:
            await store.close()
        leased = [layout.leased_key(s) for s in shards]
        info = [layout.lease_info_key(s) for s in shards]
        lease = (sum(usage(k) for k in leased) + sum(usage(k) for k in info)) / max(claimed, 1)
    payload = float(np.mean([len(encode_features(t)) for t in templates]))
    record = next(iter(_records(["u0"], vectors).values()))
    return MemoryRow(
        topology=topology.name,
        history=history,
        dtype=dtype,
        users=len(users),
        bytes_per_user=(primaries1 - primaries0) / len(users),
        replica_bytes_per_user=(replicas1 - replicas0) / len(users),
        feature_bytes=feature,
        embedding_bytes=embedding,
        dirty_entry_bytes=dirty,
        active_entry_bytes=active,
        lease_entry_bytes=lease,
        feature_payload=payload,
        embedding_payload=float(len(encode_embedding(record))),
    )


def _memkeys(topology: Topology) -> list[str]:
    """The summary of ``redis-cli --memkeys`` on the (first) node."""
    try:
        done = subprocess.run(
            ["redis-cli", "-p", str(topology.primaries[0]), "--memkeys", "--memkeys-samples", "0"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return [f"redis-cli --memkeys failed: {exc}"]
    lines = done.stdout.split("-------- summary -------", 1)[-1].splitlines()
    return [
        line.strip()
        for line in lines
        if line.strip() and not line.lstrip().startswith("0 ") and "Total key length" not in line
    ]


# --- the run -----------------------------------------------------------------


def _progress(what: str) -> None:
    print(f"[bench store] {what} ...", file=sys.stderr, flush=True)


def _validate(config: StoreBenchConfig) -> None:
    if config.users < 1 or config.events < 1 or config.seconds <= 0:
        raise ValueError(f"need users >= 1, events >= 1, seconds > 0, got {config}")
    if config.claim_users < 1 or config.concurrency < 1 or config.claim_concurrency < 1:
        raise ValueError(f"need claim_users, concurrency, claim_concurrency >= 1, got {config}")


async def _bench(
    single: Topology, cluster: Topology, config: StoreBenchConfig, result: StoreBenchResult
) -> None:
    users = [f"u{i}" for i in range(config.users)]
    pool = SyntheticTraffic(config.users, seed=11).events(config.events, now_ms())
    topologies = (single, cluster)
    for topology in topologies:
        _progress(f"ingest, worker, reads on {topology.name}")
        result.ops.extend(await _pipeline_sections(topology, config, users, pool))
    for topology in topologies:
        _progress(f"claims on {topology.name}")
        result.ops.extend(await _claim_rows(topology, config))
    for topology in topologies:
        for history in config.history_lengths:
            for dtype in config.dtypes:
                _progress(f"bytes per user on {topology.name}, history {history}, {dtype}")
                memkeys = result.memkeys if topology is single and not result.memkeys else None
                row = await _memory_row(topology, config, history, dtype, memkeys)
                result.memory.append(row)


def run_store_bench(config: StoreBenchConfig) -> StoreBenchResult:
    """Start a single redis-server and a local Redis Cluster, measure, print the tables.

    Sections, each on both topologies:

    1. ingest: ``FeatureUpdater.apply`` of batches of synthetic events on users that
       already have a full feature history (get_features + put_features with
       compare-and-set), per event;
    2. worker: claim_dirty + get_features_and_embeddings + write_and_release of batches
       (random records, no model), per embedding;
    3. reads: get_embeddings of one user and of a batch, sequential and concurrent, next
       to a plain redis-py GET / MGET of the same keys on the single node;
    4. claims: users claimed per second with ``shards`` shards and with one shard (one
       queue key, the v1 layout);
    5. bytes per user: ``INFO memory`` delta per user by history length and embedding
       dtype, split by key kind with ``MEMORY USAGE``, and ``redis-cli --memkeys``.

    What each row counts: see ``measure``. Server CPU per unit is what projects to N
    primaries; the rates measured here are bounded by the client and by the few cores
    the cluster's processes share with it. Numbers are printed, never asserted."""
    _validate(config)
    with contextlib.ExitStack() as stack:
        single = single_topology(stack.enter_context(private_redis()))
        cluster = cluster_topology(stack.enter_context(private_redis_cluster(config.primaries, 1)))
        for topology in (single, cluster):
            stack.callback(topology.close)
        calibrate_s = max(0.2, min(1.0, config.seconds))
        for topology in (single, cluster):
            topology.calibrate_idle(calibrate_s)
        provenance: dict[str, Any] = {
            "commit": commit_id(),
            "machine": machine(),
            "redis": single.redis_version(),
            "idle_cpu_ms_per_s": {
                "single": 1e3 * single.idle_primary_cpu,
                "cluster_primaries": 1e3 * cluster.idle_primary_cpu,
                "cluster_replicas": 1e3 * cluster.idle_replica_cpu,
            },
        }
        result = StoreBenchResult(provenance, _config_dict(config))
        print_header(config, provenance, cluster)
        with counting_requests():
            uvloop.run(_bench(single, cluster, config, result))
    print_result(config, result)
    if config.json_path:
        path = Path(config.json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(result), indent=2) + "\n")
        print(f"\nnumbers written to {path}")
    return result


def _config_dict(config: StoreBenchConfig) -> dict[str, Any]:
    values = asdict(config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()}
