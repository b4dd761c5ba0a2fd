"""Sizes of the evaluation: the default report, ``--quick`` and the tiny test run."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal

Preset = Literal["default", "quick", "tiny"]

MINUTE_MS = 60_000
HOUR_MS = 60 * MINUTE_MS
DAY_MS = 24 * HOUR_MS
# Staleness of the served embedding in the value-of-freshness section (simulated time).
STALENESS_MS: tuple[tuple[str, int], ...] = (
    ("0", 0),
    ("1 minute", MINUTE_MS),
    ("1 hour", HOUR_MS),
    ("1 day", DAY_MS),
    ("1 week", 7 * DAY_MS),
)


@dataclass(frozen=True, slots=True)
class LiveConfig:
    """The running pipeline (broker, Redis, ingest, worker, API) under synthetic traffic.

    Each rate gets ``warmup_s`` of traffic, then ``measure_s`` of freshness probes, then
    ``read_s`` of open-loop reads per target (HTTP, gRPC, raw Redis GET) at ``read_rate``.
    """

    rates: tuple[float, ...] = (1_000.0, 2_000.0, 5_000.0, 10_000.0, 20_000.0, 30_000.0, 40_000.0)
    users: int = 10_000
    warmup_s: float = 5.0
    measure_s: float = 30.0
    probe_users: int = 32
    probe_poll_ms: float = 5.0
    probe_timeout_s: float = 10.0
    read_rate: float = 500.0
    read_s: float = 8.0
    read_timeout_s: float = 5.0  # an open-loop read not answered by then is an error
    drain_timeout_s: float = 60.0
    kafka_partitions: int = 16
    redis_url: str | None = None  # None: a private redis-server for the run
    kafka_bootstrap: str | None = None  # None: librdkafka's mock cluster


@dataclass(frozen=True, slots=True)
class OfflineConfig:
    """The synthetic world, the two model versions and the downstream ranker.

    Model v2 is a retrain of v1 on the same days with another seed: the space rotates
    although the users did not change, which is exactly what alignment must undo.
    """

    users: int = 2_000
    days: int = 14
    world_seed: int = 0
    train_max_steps: int | None = None  # None: the trainer's own epochs and early stopping
    train_epochs: int = 10
    ranker_train_impressions: int = 120_000
    eval_impressions: int = 40_000
    ranker_epochs: int = 4
    # Strengths of stabilization compared in section 3 (time constant in seconds).
    stabilization_time_constants_s: tuple[float, ...] = (10.0, 60.0, 600.0)


@dataclass(frozen=True, slots=True)
class EvalConfig:
    preset: Preset = "default"
    live: LiveConfig = field(default_factory=LiveConfig)
    offline: OfflineConfig = field(default_factory=OfflineConfig)


def preset(name: Preset) -> EvalConfig:
    """The configuration of a named preset: default (about 12 minutes on 2 cores),
    quick (about 4 minutes) or tiny (the test suite's smoke run, well under a minute)."""
    if name == "default":
        return EvalConfig()
    if name == "quick":
        return EvalConfig(
            "quick",
            replace(
                LiveConfig(),
                rates=(1_000.0, 5_000.0, 20_000.0, 40_000.0),
                warmup_s=2.0,
                measure_s=8.0,
                read_s=3.0,
                drain_timeout_s=30.0,
            ),
            replace(
                OfflineConfig(),
                users=600,
                days=8,
                train_max_steps=300,
                ranker_train_impressions=40_000,
                eval_impressions=10_000,
                ranker_epochs=3,
            ),
        )
    if name == "tiny":
        return EvalConfig(
            "tiny",
            replace(
                LiveConfig(),
                rates=(200.0,),
                users=500,
                warmup_s=0.5,
                measure_s=2.0,
                probe_users=4,
                read_rate=100.0,
                read_s=0.5,
                drain_timeout_s=20.0,
                kafka_partitions=4,
            ),
            replace(
                OfflineConfig(),
                users=120,
                days=4,
                train_max_steps=15,
                ranker_train_impressions=3_000,
                eval_impressions=1_500,
                ranker_epochs=1,
                stabilization_time_constants_s=(60.0,),
            ),
        )
    raise ValueError(f"unknown preset {name!r}: default, quick or tiny")
