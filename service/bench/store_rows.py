"""The store benchmark's configuration and the rows it measures, in a module of their own
so that the run, the probes and the report share them without an import cycle."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from service.core.embeddings import EmbeddingDtype
from service.store.keys import DEFAULT_SHARDS


@dataclass(frozen=True, slots=True)
class StoreBenchConfig:
    users: int = 20_000
    events: int = 40_000  # synthetic events cycled through by the ingest section
    seconds: float = 3.0  # per measurement
    shards: int = DEFAULT_SHARDS
    primaries: int = 3
    ingest_batch: int = 5000  # Settings.ingest_batch_max_events
    worker_batch: int = 256  # Settings.worker_batch_size
    read_batch: int = 100
    concurrency: int = 32
    claim_users: int = 200_000
    claim_concurrency: int = 4
    history_lengths: Sequence[int] = (50, 200)
    dtypes: Sequence[EmbeddingDtype] = ("float16", "float32")
    json_path: str | None = None


@dataclass(frozen=True, slots=True)
class OpRow:
    """One operation on one topology; per-op latencies in µs, CPU in µs per unit."""

    section: str
    op: str
    topology: str  # "single", "cluster", or "raw-single" (plain redis-py on the node)
    unit: str
    concurrency: int
    ops: int
    units: int
    seconds: float
    units_per_s: float
    us_per_unit: float
    p50_us: float
    p99_us: float
    requests_per_op: float
    commands_per_op: float
    server_us_per_unit: float  # Redis primaries
    replica_us_per_unit: float
    client_us_per_unit: float
    exhausted: bool = False  # the window ended early: nothing left to do
    refills: int = 0  # times the queue ran empty and was refilled outside the window


@dataclass(frozen=True, slots=True)
class MemoryRow:
    """Bytes per user after loading ``users`` users: the used_memory delta (less
    buffers) over the primaries, and each key kind's MEMORY USAGE."""

    topology: str
    history: int
    dtype: str
    users: int
    bytes_per_user: float
    replica_bytes_per_user: float
    feature_bytes: float
    embedding_bytes: float
    dirty_entry_bytes: float
    active_entry_bytes: float
    lease_entry_bytes: float  # while claimed only (leased + lease info)
    feature_payload: float  # the encoded records themselves
    embedding_payload: float


@dataclass(frozen=True, slots=True)
class StoreBenchResult:
    provenance: dict[str, Any]
    config: dict[str, Any]
    ops: list[OpRow] = field(default_factory=list)
    memory: list[MemoryRow] = field(default_factory=list)
    memkeys: list[str] = field(default_factory=list)
    projections: list[str] = field(default_factory=list)
