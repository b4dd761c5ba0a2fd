"""The one settings object, read once at start-up and handed down.

Every field can be set from the environment with the ``USEREMBED_`` prefix, for
example ``USEREMBED_REDIS_URL=redis://localhost:6379/0``. List fields take JSON
(``USEREMBED_API_KEYS='["k1","k2"]'``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of every role (api, worker, ingest, demo)."""

    model_config = SettingsConfigDict(env_prefix="USEREMBED_", extra="ignore")

    # --- store -------------------------------------------------------------
    redis_url: str = Field(
        "memory://",
        description="redis://host:port/db (rediss:// TLS), redis+cluster://host:port[,host:port]"
        " (rediss+cluster:// TLS) for a Redis Cluster, or memory:// (embedded)",
    )
    redis_timeout_ms: int = Field(250, gt=0, description="Bound on every Redis call")
    redis_shards: int = Field(
        64,
        ge=1,
        le=16384,
        description="Shard hash tags of the key layout: a multiple of the Kafka partitions, "
        "8-16x the cluster's primaries, fixed for the life of the data (docs/capacity.md)",
    )
    redis_write_replicas: int = Field(
        0,
        ge=0,
        description="Replicas that must acknowledge an ingest write (Redis WAIT) before its "
        "Kafka offsets are committed: 1 on a cluster with replicas, so a failover loses none",
    )

    # --- kafka (ingest) ----------------------------------------------------
    kafka_bootstrap: str = "localhost:9092"
    kafka_topic: str = "user-events"
    kafka_group: str = "userembed-ingest"
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    kafka_sasl_mechanism: str | None = Field(None, description="PLAIN, SCRAM-SHA-512, ...")
    kafka_sasl_username: str | None = None
    kafka_sasl_password: SecretStr | None = None
    kafka_ssl_ca_location: Path | None = None
    kafka_extra: dict[str, str] = Field(
        default_factory=dict, description="Extra librdkafka properties (JSON object)"
    )
    ingest_batch_max_events: int = Field(5000, ge=1, description="Max messages per batch")
    ingest_batch_max_wait_ms: int = Field(10, ge=1, description="Max wait to fill a batch")
    ingest_max_backoff_s: float = Field(5.0, gt=0, description="Cap on retry backoff")
    ingest_max_message_bytes: int = Field(
        64 * 1024,
        ge=1024,
        description="Largest event message; a bigger one is dead-lettered unparsed (too_large)",
    )
    ingest_max_json_depth: int = Field(
        32,
        ge=2,
        le=256,
        description="Deepest JSON nesting of an event message, checked before parsing (too_deep)",
    )
    ingest_dlq_max_message_bytes: int = Field(
        1_000_000,
        ge=4096,
        description="Largest dead-letter record (the DLQ producer's message.max.bytes); a "
        "bigger message is dead-lettered truncated, with userembed.truncated=1",
    )
    ingest_dlq_timeout_ms: int = Field(
        10_000,
        ge=100,
        description="Wait for the DLQ's acknowledgement per attempt; ingest stops consuming "
        "and retries (userembed_ingest_dlq_blocked=1) while the DLQ cannot be written",
    )
    ingest_crash_loop_restarts: int = Field(
        3,
        ge=1,
        description="Restarts at the same committed offset before its batch is replayed one "
        "message at a time and the message that kills ingest is dead-lettered",
    )
    kafka_dlq_extra: dict[str, str] = Field(
        default_factory=dict,
        description="Extra librdkafka properties of the dead-letter producer only (JSON "
        "object, over kafka_extra)",
    )

    # --- metrics -----------------------------------------------------------
    metrics_port: int = Field(
        9400, ge=0, le=65535, description="Prometheus port of ingest/worker (0 = off)"
    )

    # --- model -------------------------------------------------------------
    registry_path: Path = Field(
        Path("var/registry"),
        description="Model registry directory; with registry_url, the local cache it is "
        "mirrored into",
    )
    registry_url: str | None = Field(
        None,
        description="Registry on an object store (fsspec URL: s3://bucket/prefix, gs://..., "
        "file:///...): worker and serve mirror it into registry_path every "
        "worker_model_poll_s (docs/registry.md); unset = registry_path is the registry",
    )
    registry_storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options of registry_url (JSON object, e.g. "
        '{"endpoint_url": "http://minio:9000"}); credentials come from the environment',
    )
    embedding_dtype: Literal["float16", "float32"] = "float16"
    history_length: int = Field(50, ge=1, le=1024, description="Last L events kept per user")

    # --- worker ------------------------------------------------------------
    worker_batch_size: int = Field(256, ge=1, description="Max users per micro-batch")
    worker_max_wait_ms: int = Field(10, ge=0, description="Max wait to fill a micro-batch")
    worker_idle_sleep_ms: int = Field(5, ge=1, description="Sleep when the dirty queue is empty")
    worker_lease_ms: int = Field(
        30_000, ge=100, description="A claimed user returns to the queue if not written by then"
    )
    worker_precision: Literal["auto", "fp32", "fp16"] = Field(
        "auto", description="auto = fp16 on CUDA, fp32 on the CPU"
    )
    worker_intra_op_threads: int = Field(
        0, ge=0, description="ONNX Runtime threads (0 = usable cores - 1 on CPU, 1 on CUDA)"
    )
    worker_model_poll_s: float = Field(
        5.0, gt=0, description="How often the worker checks the registry for a new version"
    )
    reembed_rate: float = Field(
        1000.0, gt=0, description="Active users per second queued for re-embedding after a swap"
    )
    active_index_size: int = Field(
        1_000_000, ge=1, description="Most recently active users remembered for re-embedding"
    )

    # --- stabilization (docs/stabilization.md) -----------------------------
    stabilization_enabled: bool = True
    stabilization_time_constant_s: float = Field(
        60.0, gt=0, description="Age at which a fresh embedding outweighs the served one"
    )
    stabilization_min_weight: float = Field(
        0.25, ge=0, le=1, description="Fresh embedding's share even when the served one is new"
    )
    stabilization_max_step: float = Field(
        0.6, gt=0, description="Max move per update: radians (normalized models) or L2"
    )

    # --- staleness ---------------------------------------------------------
    refresh_after_s: float = Field(
        300.0, gt=0, description="A served embedding older than this is 'stale' and refreshed"
    )
    refresh_coalesce_s: float = Field(
        5.0, ge=0, description="At most one refresh enqueue per user per this interval"
    )

    # --- api ---------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(8000, ge=0, le=65535)
    api_keys: list[SecretStr] = Field(
        default_factory=list, description="Bearer keys; empty = no auth"
    )
    api_keys_file: Path | None = Field(None, description="File with one API key per line")
    batch_get_max_ids: int = Field(1000, ge=1)
    api_events_max: int = Field(1000, ge=1, description="Max events per POST /v1/events")
    api_events_enabled: bool = Field(True, description="Serve POST /v1/events (to Kafka)")
    cold_start_404: bool = Field(False, description="404 instead of the cold-start embedding")
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port of serve (0 = off)")
    api_workers: int = Field(
        1,
        ge=0,
        description="Server processes of serve sharing its HTTP and gRPC ports (SO_REUSEPORT), "
        "supervised by a parent: 1 = one process, 0 = one per usable core (docs/serving.md)",
    )
    api_drain_timeout_s: float = Field(
        20.0,
        gt=0,
        description="serve with workers > 1: how long the parent waits on SIGTERM for its "
        "workers to finish in-flight requests before it kills them",
    )
    api_auth_ops: bool = Field(
        False, description="Also require API keys on /healthz, /readyz, /metrics and gRPC health"
    )
    api_read_timeout_ms: int = Field(
        1000, gt=0, description="Hard bound on a read's store call before answering 503"
    )
    api_retry_after_s: int = Field(1, ge=0, description="Retry-After of a 503 answer")
    refresh_max_rate: float = Field(
        1000.0, gt=0, description="At most this many refresh enqueues per second (per process)"
    )
    hot_cache_ttl_ms: int = Field(0, ge=0, description="In-process hot-user cache TTL (0 = off)")
    hot_cache_max_users: int = Field(100_000, ge=1, description="Hot-user cache capacity")
    api_max_body_bytes: int = Field(
        1 << 20,
        ge=1024,
        description="Largest request body, HTTP or gRPC (413 / RESOURCE_EXHAUSTED above); "
        "batchGet allows at least 512 bytes per id of batch_get_max_ids",
    )
    api_max_json_depth: int = Field(
        32, ge=2, le=256, description="Deepest JSON nesting of a request body (400 beyond)"
    )
    api_max_header_bytes: int = Field(
        16 * 1024,
        ge=1024,
        description="Largest request line plus headers (431, connection closed, above)",
    )
    api_head_timeout_s: float = Field(
        5.0,
        gt=0,
        description="A request's line and headers, or a new connection's first request, must "
        "arrive within this (408 and closed otherwise)",
    )
    api_body_timeout_s: float = Field(
        10.0, gt=0, description="A request's body must arrive within this (408 and closed)"
    )
    api_grpc_max_send_bytes: int = Field(
        32 << 20, ge=1024, description="Largest gRPC answer (RESOURCE_EXHAUSTED above)"
    )

    # --- demo --------------------------------------------------------------
    demo_users: int = Field(10_000, ge=1)
    demo_event_rate: float = Field(2000.0, gt=0, description="Synthetic events per second")
    demo_seed: int = 7

    @field_validator("redis_url")
    @classmethod
    def _known_scheme(cls, url: str) -> str:
        schemes = ("memory", "redis", "rediss", "unix", "redis+cluster", "rediss+cluster")
        if not url.startswith(tuple(f"{scheme}://" for scheme in schemes)):
            raise ValueError(
                f"unsupported redis_url scheme in {url.split('://')[0]!r}: use "
                + ", ".join(f"{scheme}://" for scheme in schemes)
            )
        return url

    @field_validator("registry_url")
    @classmethod
    def _registry_url(cls, url: str | None) -> str | None:
        if not url:
            return None
        if "://" not in url:
            raise ValueError(f"registry_url {url!r} is not a URL: use s3://, gs:// or file://")
        return url

    @property
    def kafka_dlq_topic(self) -> str:
        return f"{self.kafka_topic}.dlq"

    def kafka_client_config(self) -> dict[str, str]:
        """librdkafka properties shared by consumer, producer and admin clients."""
        config = {
            "bootstrap.servers": self.kafka_bootstrap,
            "security.protocol": self.kafka_security_protocol,
        }
        if self.kafka_sasl_mechanism:
            config["sasl.mechanism"] = self.kafka_sasl_mechanism
        if self.kafka_sasl_username:
            config["sasl.username"] = self.kafka_sasl_username
        if self.kafka_sasl_password:
            config["sasl.password"] = self.kafka_sasl_password.get_secret_value()
        if self.kafka_ssl_ca_location:
            config["ssl.ca.location"] = str(self.kafka_ssl_ca_location)
        return {**config, **self.kafka_extra}

    def resolved_api_keys(self) -> list[str]:
        """Keys from the environment plus those in ``api_keys_file`` (blank lines skipped)."""
        keys = [k.get_secret_value() for k in self.api_keys]
        if self.api_keys_file is not None:
            lines = self.api_keys_file.read_text().splitlines()
            keys.extend(line.strip() for line in lines if line.strip())
        return keys
