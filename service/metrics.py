"""Prometheus metrics of every role, named ``userembed_<component>_<what>_<unit>``.

Labels are few and bounded: a metric about one of the served models has a ``model``
label (a served model's name: a handful, never a user); a stage shared by every model
has ``model=""``, which PromQL reads as no label.

Metrics are process-wide by nature (one registry per process, scraped on /metrics),
so they live here rather than being threaded through constructors.

``serve --workers N`` runs N server processes in prometheus-client's multiprocess mode
(docs/serving.md): every gauge says how its processes' values combine
(``multiprocess_mode``, ignored by a single process), and the ``API_WORKER_*`` metrics,
in no registry, are exported only there, through the multiprocess collector.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS: Final = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
_BATCH_BUCKETS: Final = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)

# --- ingest ------------------------------------------------------------------
INGEST_EVENTS = Counter(
    "userembed_ingest_events_total", "Events seen by ingest, by outcome", ["outcome"]
)
INGEST_BATCH_SECONDS = Histogram(
    "userembed_ingest_batch_seconds",
    "Time to apply and commit one event batch",
    buckets=_LATENCY_BUCKETS,
)
INGEST_BATCH_SIZE = Histogram(
    "userembed_ingest_batch_size_events",
    "Valid events per batch",
    buckets=(1, 10, 50, 100, 500, 1000, 2000, 5000, 10000, 20000),
)
INGEST_CONFLICTS = Counter(
    "userembed_ingest_write_conflicts_total", "Users re-applied after a compare-and-set conflict"
)
INGEST_RETRIES = Counter(
    "userembed_ingest_retries_total", "Retried operations during outages", ["operation"]
)
INGEST_LAG = Gauge(
    "userembed_ingest_consumer_lag_messages",
    "Consumer lag per partition",
    ["partition"],
    multiprocess_mode="livemax",
)
INGEST_LAST_COMMIT = Gauge(
    "userembed_ingest_last_commit_timestamp_seconds",
    "Unix time of the last offset commit",
    multiprocess_mode="max",
)
INGEST_REBALANCES = Counter(
    "userembed_ingest_rebalances_total", "Partition assignment changes", ["kind"]
)
INGEST_COMMITTED_OFFSET = Gauge(
    "userembed_ingest_committed_offset",
    "Next offset to consume per partition, as last committed (flat while a partition is stuck)",
    ["partition"],
    multiprocess_mode="max",
)
INGEST_DEAD_LETTERS = Counter(
    "userembed_ingest_dead_letters_total",
    "Messages acknowledged by the dead-letter topic, by reason class (closed set: too_large, "
    "too_deep, string_too_long, not_json, contract, invalid, decoder_error, crash_loop)",
    ["reason"],
)
INGEST_DEAD_LETTERS_TRUNCATED = Counter(
    "userembed_ingest_dead_letters_truncated_total",
    "Dead letters cut to fit the dead-letter topic's largest message (userembed.truncated=1)",
)
INGEST_DECODER_REJECTIONS = Counter(
    "userembed_ingest_decoder_rejections_total",
    "Messages refused by a decoder bound (size, depth, string_length), before parsing them",
    ["limit"],
)
INGEST_DLQ_BLOCKED = Gauge(
    "userembed_ingest_dlq_blocked",
    "1 while dead letters cannot be written: ingest retries them and consumes nothing more",
    multiprocess_mode="livemax",
)
INGEST_CRASH_LOOP_PARTITIONS = Gauge(
    "userembed_ingest_crash_loop_partitions",
    "Partitions replayed one message at a time after ingest died repeatedly at one offset",
    multiprocess_mode="livesum",
)

# --- worker ------------------------------------------------------------------
WORKER_EMBEDDINGS = Counter(
    "userembed_worker_embeddings_total", "Embeddings written, by model", ["model"]
)
WORKER_SKIPPED = Counter(
    "userembed_worker_skipped_total",
    "Dirty users a model did not embed, by model and reason (no_features: every model's)",
    ["model", "reason"],
)
WORKER_BATCH_SIZE = Histogram(
    "userembed_worker_batch_size_users", "Users per micro-batch", buckets=_BATCH_BUCKETS
)
WORKER_STAGE_SECONDS = Histogram(
    "userembed_worker_stage_seconds",
    'Per-stage latency of a micro-batch: fetch, assemble and write (shared: model=""), '
    "infer and stabilize (per model)",
    ["model", "stage"],
    buckets=_LATENCY_BUCKETS,
)
WORKER_QUEUE_DEPTH = Gauge(
    "userembed_worker_queue_depth_users",
    "Users in the dirty queue",
    multiprocess_mode="livemax",  # every process sees the one shared queue
)
WORKER_OLDEST_DIRTY_AGE = Gauge(
    "userembed_worker_oldest_dirty_age_seconds",
    "Age of the oldest dirty user",
    multiprocess_mode="livemax",
)
WORKER_MODEL = Gauge(
    "userembed_worker_model_info",
    "Models served by this worker (1 for each model's current version)",
    ["model", "version", "space", "provider", "precision"],
    multiprocess_mode="livemax",
)
WORKER_LEASED = Gauge(
    "userembed_worker_leased_users",
    "Users leased to workers, in flight",
    multiprocess_mode="livemax",  # a count in the shared store, not per process
)
WORKER_EMBEDDING_STALENESS = Histogram(
    "userembed_worker_embedding_staleness_seconds",
    "From a user becoming dirty to its embedding being written",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
)
WORKER_MODEL_SWAPS = Counter(
    "userembed_worker_model_swaps_total",
    "Model versions seen in the registry, by model and outcome (added, swapped, refused)",
    ["model", "outcome"],
)
WORKER_REEMBED_ENQUEUED = Counter(
    "userembed_worker_reembed_enqueued_total",
    "Active users queued for re-embedding after a swap (or a backfill of a new model), by model",
    ["model"],
)
WORKER_READY = Gauge(
    "userembed_worker_ready",
    "1 once the worker's models are loaded and warmed up",
    multiprocess_mode="livemin",
)

# --- api ---------------------------------------------------------------------
API_REQUEST_SECONDS = Histogram(
    "userembed_api_request_seconds",
    "Request latency by protocol (http, grpc), route (or gRPC method) and status",
    ["protocol", "route", "status"],
    buckets=_LATENCY_BUCKETS,
)
API_IN_FLIGHT = Gauge(
    "userembed_api_in_flight_requests",
    "Requests being answered (HTTP + gRPC)",
    multiprocess_mode="livesum",
)
API_SERVED = Counter(
    "userembed_api_embeddings_served_total",
    "Embeddings served, by model and status",
    ["model", "status"],
)
API_SERVED_STALENESS = Histogram(
    "userembed_api_served_staleness_seconds",
    "Age of the stored embeddings served (cold starts excluded; a batch: 16 sampled answers)",
    buckets=(1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 6 * 3600.0, 86400.0, 7 * 86400.0),
)
API_CACHE_REQUESTS = Counter(
    "userembed_api_cache_requests_total", "Hot-user cache lookups (when enabled)", ["result"]
)
API_REFRESH_ENQUEUED = Counter(
    "userembed_api_refresh_enqueued_total", "Refreshes enqueued by the read path"
)
API_REFRESH_DROPPED = Counter(
    "userembed_api_refresh_dropped_total",
    "Refresh requests dropped, by reason (full: pending set full, rate: over refresh_max_rate)",
    ["reason"],
)
API_STORE_ERRORS = Counter("userembed_api_store_errors_total", "Store calls that failed")

# --- api workers (serve --workers N; exported through the multiprocess collector only) --
API_WORKER_UP = Gauge(
    "userembed_api_worker_up",
    "1 per live server process of serve --workers N, by pid",
    multiprocess_mode="liveall",
    registry=None,
)
API_WORKER_STARTS = Counter(
    "userembed_api_worker_starts_total",
    "Server processes started by serve --workers N (restarts: this minus the workers)",
    registry=None,
)
