"""``userembed``: one CLI, a subcommand per role. This is the composition root: the
only place where implementations (store, runtime, event source) are chosen."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from models.cli import add_model_commands
from models.registry_cli import add_registry_commands
from service.settings import Settings

if TYPE_CHECKING:
    from service.store.protocol import Store


def _configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(),
        format="ts=%(asctime)s level=%(levelname)s logger=%(name)s %(message)s",
        stream=sys.stderr,
    )


def _settings(overrides: dict[str, Any]) -> Settings:
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise SystemExit(f"userembed: invalid configuration:\n{exc}") from None


async def _store(settings: Settings) -> Store:
    """The configured store, checked; a misconfiguration ends the command in one sentence."""
    from service.store.connect import open_checked_store
    from service.store.protocol import StoreMisconfigured

    try:
        return await open_checked_store(settings)
    except (StoreMisconfigured, ValueError) as exc:
        raise SystemExit(f"userembed: {exc}") from None


def _cmd_demo(args: argparse.Namespace) -> None:
    from service.api.server import run_loop
    from service.demo import run_demo

    settings = _settings(
        {
            "demo_users": args.users,
            "demo_event_rate": args.rate,
            "api_host": args.host,
            "api_port": args.port,
            "registry_path": args.registry,
        }
    )
    run_loop(run_demo(settings, duration_s=args.duration))


def _serve_ops(settings: Settings, ready: Callable[[], bool]) -> None:
    """/metrics, /healthz, /readyz of a non-HTTP role (ingest, worker) on ``metrics_port``."""
    from service.api.ops_server import serve_ops

    if settings.metrics_port:
        serve_ops(settings.api_host, settings.metrics_port, ready)


def _cmd_serve(args: argparse.Namespace) -> None:
    """HTTP and gRPC read APIs: one process sharing one reader (refreshes, cache), or
    with ``api_workers`` other than 1, that many such processes sharing the ports under
    a supervising parent (docs/serving.md)."""
    from service.api.supervisor import resolve_workers

    settings = _settings(
        {
            "api_host": args.host,
            "api_port": args.port,
            "grpc_port": args.grpc_port,
            "api_workers": args.workers,
        }
    )
    if args.worker_index is not None:  # started by the supervisor below
        _serve_api(settings, _Worker(args.worker_index, args.parent_pid or os.getppid()))
    elif (workers := resolve_workers(settings.api_workers)) == 1:
        _serve_api(settings, None)
    else:
        _supervise_api(settings, workers, args.log_level)


@dataclass(frozen=True)
class _Worker:
    """A server process of ``serve --workers N``: its slot and its supervisor's pid."""

    index: int
    parent: int


def _serve_api(settings: Settings, worker: _Worker | None) -> None:
    """The read APIs in this process; as a ``worker``, on ports shared with the others."""
    import gc

    from models.registry_sync import mirror_from_settings
    from service.api.app import create_app
    from service.api.cold_start import RegistryColdStart
    from service.api.grpc_service import start_grpc_server
    from service.api.http_protocol import JoinedWritesHttpToolsProtocol
    from service.api.reads import EmbeddingReader
    from service.api.server import EmbeddedServer, http_config, install_stop_handlers, run_loop
    from service.ingest.kafka import KafkaEventSink

    async def serve() -> None:
        store = await _store(settings)
        sink = KafkaEventSink(settings) if settings.api_events_enabled else None
        mirror = mirror_from_settings(settings)  # registry_url: mirrored into registry_path
        if mirror is not None:
            await asyncio.to_thread(mirror.sync, wait=True)  # cold starts before requests
        cold_start = RegistryColdStart(settings.registry_path)
        cold_start()  # load the current model's cold start before the first request
        reader = EmbeddingReader.from_settings(store, settings, cold_start)
        app = create_app(store, settings, cold_start, event_sink=sink, reader=reader)
        config = http_config(app, settings.api_host, settings.api_port)
        config.http = JoinedWritesHttpToolsProtocol
        server = EmbeddedServer(config)
        sockets = None if worker is None else [_shared_socket(settings)]
        stop_reads = asyncio.Event()
        refresher = asyncio.create_task(reader.run(stop_reads), name="refresh-flusher")
        mirroring = None
        if mirror is not None:
            follow = mirror.follow(stop_reads, settings.worker_model_poll_s)
            mirroring = asyncio.create_task(follow, name="registry-mirror")
        grpc_server = None
        if settings.grpc_port:
            grpc_server, _ = await start_grpc_server(
                reader,
                settings,
                settings.api_host,
                settings.grpc_port,
                reuse_port=worker is not None,
            )

        grpc_stopping: asyncio.Task[None] | None = None

        def stop() -> None:
            nonlocal grpc_stopping
            server.should_exit = True
            if worker is not None and grpc_server is not None and grpc_stopping is None:
                # A worker stops accepting on both ports at once (the parent bounds the drain).
                grace = settings.api_drain_timeout_s
                grpc_stopping = asyncio.create_task(grpc_server.stop(grace=grace))

        if worker is None:
            install_stop_handlers(stop)
            orphan_watch = None
        else:
            orphan_watch = _enter_worker(worker, stop)
        # Objects alive now (modules, the app) live forever: keep them out of the cyclic
        # collector's full passes, which otherwise show up in the read path's p99.9.
        gc.collect()
        gc.freeze()
        try:
            await server.serve(sockets)
        finally:
            if orphan_watch is not None:
                orphan_watch.cancel()
            if grpc_stopping is not None:
                await grpc_stopping
            elif grpc_server is not None:
                await grpc_server.stop(grace=2.0)
            stop_reads.set()
            await refresher
            if mirroring is not None:
                await mirroring
            await store.close()
            if sink is not None:
                await sink.close()

    run_loop(serve())


def _shared_socket(settings: Settings) -> socket.socket:
    from service.api.worker_process import reuseport_socket

    return reuseport_socket(settings.api_host, settings.api_port)


def _enter_worker(worker: _Worker, stop: Callable[[], None]) -> asyncio.Task[None]:
    """Signals, /metrics and liveness of a worker process; returns its orphan watch."""
    from service.api import worker_process

    worker_process.install_drain_handlers(stop)
    worker_process.aggregate_default_registry(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    worker_process.mark_started(worker.index)
    return asyncio.create_task(
        worker_process.stop_when_orphaned(worker.parent, stop), name="orphan-watch"
    )


def _supervise_api(settings: Settings, workers: int, log_level: str | None) -> None:
    """``serve`` as the parent of ``workers`` server processes: what would fail every
    one of them (configuration, a taken port) fails here, once; then supervise."""
    from service.api.supervisor import supervise

    if settings.redis_url.startswith("memory://"):
        raise SystemExit(
            "userembed serve with more than one worker needs a shared store: set "
            "USEREMBED_REDIS_URL=redis://... or redis+cluster://..."
        )
    asyncio.run(_check_store(settings))
    port = _free_to_share(settings.api_host, settings.api_port)
    if settings.grpc_port:
        _free_to_share(settings.api_host, settings.grpc_port)
    parent = os.getpid()
    logging_args = ["--log-level", log_level] if log_level else []

    def command(index: int) -> list[str]:
        return [
            *(sys.executable, "-m", "service.cli", *logging_args, "serve"),
            *("--worker-index", str(index), "--parent-pid", str(parent)),
            *("--host", settings.api_host, "--port", str(port)),
            *("--grpc-port", str(settings.grpc_port)),
        ]

    status = supervise(
        command,
        workers,
        host=settings.api_host,
        metrics_port=settings.metrics_port,
        drain_timeout_s=settings.api_drain_timeout_s,
    )
    if status:
        raise SystemExit(status)


async def _check_store(settings: Settings) -> None:
    store = await _store(settings)
    await store.close()


def _free_to_share(host: str, port: int) -> int:
    """``port`` (a free one for 0) if this process could bind it with SO_REUSEPORT."""
    from service.api.worker_process import reuseport_socket

    try:
        with reuseport_socket(host, port, listen=False) as sock:
            return int(sock.getsockname()[1])
    except OSError as exc:
        raise SystemExit(f"userembed: cannot bind {host}:{port}: {exc.strerror}") from None


def _cmd_worker(args: argparse.Namespace) -> None:
    from service.api.server import install_stop_handlers, run_loop
    from service.worker.role import WorkerRole

    settings = _settings({})
    if settings.redis_url.startswith("memory://"):
        raise SystemExit(
            "userembed worker needs a shared store: set USEREMBED_REDIS_URL=redis://... "
            "or redis+cluster://..."
        )

    async def work() -> None:
        store = await _store(settings)
        role = WorkerRole(settings, store)
        _serve_ops(settings, role.ready.is_set)
        stop = asyncio.Event()
        install_stop_handlers(stop.set)
        try:
            await role.run(stop)
        finally:
            await store.close()

    run_loop(work())


def _cmd_ingest(args: argparse.Namespace) -> None:
    from service.api.server import install_stop_handlers, run_loop
    from service.ingest.kafka import KafkaEventSource
    from service.ingest.updater import FeatureUpdater, run_ingest

    settings = _settings({"metrics_port": args.metrics_port})
    if settings.redis_url.startswith("memory://"):
        raise SystemExit(
            "userembed ingest needs a shared store: set USEREMBED_REDIS_URL=redis://... "
            "or redis+cluster://..."
        )
    _serve_ops(settings, lambda: True)

    async def ingest() -> None:
        store = await _store(settings)
        source = KafkaEventSource(settings)
        stop = asyncio.Event()
        install_stop_handlers(stop.set)
        logging.getLogger(__name__).info(
            "event=ingest_started topic=%s group=%s", settings.kafka_topic, settings.kafka_group
        )
        try:
            await run_ingest(
                source,
                FeatureUpdater(store, settings.history_length),
                stop,
                max_events=settings.ingest_batch_max_events,
                max_wait_s=settings.ingest_batch_max_wait_ms / 1000,
                max_backoff_s=settings.ingest_max_backoff_s,
            )
        finally:
            await source.close()
            await store.close()
            logging.getLogger(__name__).info("event=ingest_stopped")

    run_loop(ingest())


def _cmd_produce(args: argparse.Namespace) -> None:
    from service.ingest.produce import ProduceConfig, run_producer

    config = ProduceConfig(
        rate=args.rate,
        users=args.users,
        malformed_fraction=args.malformed_fraction,
        count=args.count,
        duration_s=args.duration,
        seed=args.seed,
    )
    run_producer(_settings({}), config)


def _cmd_publish_standin(args: argparse.Namespace) -> None:
    from models.registry_target import publishing
    from models.standin import publish_standin

    settings = _settings({})
    with publishing(args.registry, args.model) as target:
        artifact = publish_standin(
            target.root,
            version=args.version,
            history_length=settings.history_length,
            output_dim=args.dim,
        )
        where = target.done(artifact)
    print(f"published {artifact.version} of model {args.model} to {where}")


def _cmd_retire_model(args: argparse.Namespace) -> None:
    from models.registry import retire_model
    from models.registry_target import open_remote

    remote = open_remote(args.registry)
    if remote is not None:
        version = remote.retire(args.model)
    else:
        version = retire_model(
            _settings({"registry_path": args.registry}).registry_path, args.model
        )
    print(f"retired model {args.model} (it served {version}); publishing a version serves it again")


def _cmd_init_registry(args: argparse.Namespace) -> None:
    """Seed an empty registry (container start-up, Kubernetes Job); a no-op otherwise,
    unless ``--force`` (then it publishes the source's CURRENT as the new CURRENT)."""
    from pathlib import Path

    from models.default import DEFAULT_REGISTRY
    from models.registry import current_version, install, load_artifact, model_root
    from models.registry_target import open_remote

    source = Path(args.source) if args.source else DEFAULT_REGISTRY
    remote = open_remote(args.registry)
    if remote is not None:  # an object store: pushed (files verified, CURRENT last)
        existing = remote.current_version(args.model)
        if existing is not None and not args.force:
            print(
                f"registry {remote.location(args.model)} already serves {existing}: nothing to do"
            )
            return
        artifact = load_artifact(source)
        print(
            f"installed {artifact.version} from {source} into {remote.push(artifact, args.model)}"
        )
        return
    settings = _settings({"registry_path": args.registry})
    root = model_root(settings.registry_path, args.model)
    existing = current_version(root)
    if existing is not None and not args.force:
        print(f"registry {root} already serves {existing}: nothing to do")
        return
    artifact = install(root, load_artifact(source))
    print(f"installed {artifact.version} from {source} into {root}")


def _cmd_inspect(args: argparse.Namespace) -> None:
    from service.core.events import user_id_problem

    problem = user_id_problem(args.user_id)
    if problem:
        raise SystemExit(problem)
    settings = _settings({})

    async def inspect() -> dict[str, Any]:
        store = await _store(settings)
        try:
            (features,) = await store.get_features([args.user_id])
            (record,) = await store.get_embeddings([args.user_id])
        finally:
            await store.close()
        return {
            "user_id": args.user_id,
            "features": None
            if features is None
            else {
                "version": features.version,
                "last_event_ms": features.last_event_ms,
                "position": {"partition": features.partition, "offset": features.offset},
                "history": {
                    "item_hashes": features.item_hashes.tolist(),
                    "category_hashes": features.category_hashes.tolist(),
                    "types": features.types.tolist(),
                    "timestamps": features.timestamps.tolist(),
                },
                "counters": features.counters.tolist(),
            },
            "embedding": None
            if record is None
            else {
                "model_version": record.model_version,
                "space_version": record.space_version,
                "computed_at_ms": record.computed_at_ms,
                "feature_version": record.feature_version,
                "dtype": str(record.vector.dtype),
                "vector": record.vector.astype(float).tolist(),
            },
        }

    print(json.dumps(asyncio.run(inspect()), indent=2))


def _cmd_migrate_keys(args: argparse.Namespace) -> None:
    """Key layout v1 -> v2 on the single Redis node of USEREMBED_REDIS_URL, with
    USEREMBED_REDIS_SHARDS shards; run with ingest, worker and serve stopped."""
    from service.store.migrate import MigrationProgress, migrate_keys
    from service.store.protocol import StoreUnavailable

    settings = _settings({})
    tty = sys.stderr.isatty()
    shown: dict[str, int] = {}  # per phase: the last tenth printed

    def progress(p: MigrationProgress) -> None:
        percent = 100 * p.done // p.total if p.total else 100
        line = f"migrate-keys: {p.phase} {p.done}/{p.total} ({percent}%)"
        if tty:
            print(f"\r{line:<64}", end="", file=sys.stderr, flush=True)
        elif percent // 10 <= shown.get(p.phase, -1):
            return
        else:
            print(line, file=sys.stderr, flush=True)
        shown[p.phase] = percent // 10

    try:
        report = asyncio.run(
            migrate_keys(
                settings.redis_url, settings.redis_shards, batch=args.batch, progress=progress
            )
        )
    except (ValueError, StoreUnavailable) as exc:  # MigrationRefused is a ValueError
        raise SystemExit(f"userembed migrate-keys: {exc}") from None
    finally:
        if tty and shown:
            print(file=sys.stderr)
    print(report.summary())


def _cmd_bench_read(args: argparse.Namespace) -> None:
    from service.bench.read import BenchConfig, run_read_bench

    def levels(text: str) -> list[int]:
        return [int(c) for c in text.split(",")]

    config = BenchConfig(
        redis_url=args.redis_url,
        concurrency=levels(args.concurrency),
        duration_s=args.duration,
        users=args.users,
        batch_size=args.batch_size,
        workers=levels(args.workers),
        rounds=args.rounds,
        client=args.client,
        client_concurrency=levels(args.client_concurrency) if args.client_concurrency else None,
        hedge=args.hedge,
        hedge_concurrency=args.hedge_concurrency,
        hedge_after_ms=args.hedge_after_ms,
    )
    run_read_bench(config)


def _cmd_bench_grpc(args: argparse.Namespace) -> None:
    from service.bench.grpc_servers import GrpcBenchConfig, run_grpc_bench

    run_grpc_bench(
        GrpcBenchConfig(
            redis_url=args.redis_url,
            concurrency=[int(c) for c in args.concurrency.split(",")],
            duration_s=args.duration,
            users=args.users,
            batch_size=args.batch_size,
            candidates=args.candidates.split(","),
            channels=args.channels,
            rounds=args.rounds,
        )
    )


def _cmd_bench_ingest(args: argparse.Namespace) -> None:
    from service.bench.ingest import IngestBenchConfig, run_ingest_bench

    run_ingest_bench(
        IngestBenchConfig(
            events=args.events,
            users=args.users,
            batch=args.batch,
            redis_url=args.redis_url,
            kafka_bootstrap=args.kafka_bootstrap or os.environ.get("KAFKA_BOOTSTRAP"),
        )
    )


def _cmd_bench_worker(args: argparse.Namespace) -> None:
    from pathlib import Path

    from service.bench.worker import WorkerBenchConfig, run_worker_bench

    run_worker_bench(
        WorkerBenchConfig(
            users=args.users,
            batch_sizes=[int(b) for b in args.batches.split(",")],
            redis_url=args.redis_url,
            intra_op_threads=args.threads,
            precision=args.precision,
            events_per_user=args.events_per_user,
            provider=args.provider,
            processes=[int(p) for p in args.processes.split(",")],
            json_path=Path(args.json) if args.json else None,
        )
    )


def _cmd_bench_models(args: argparse.Namespace) -> None:
    from service.bench.models import ModelsBenchConfig, run_models_bench

    run_models_bench(
        ModelsBenchConfig(
            users=args.users, batch=args.batch, reads=args.reads, redis_url=args.redis_url
        )
    )


def _cmd_bench_store(args: argparse.Namespace) -> None:
    from service.bench.store import StoreBenchConfig, run_store_bench

    config = StoreBenchConfig(
        users=args.users, events=args.events, seconds=args.seconds, json_path=args.json
    )
    run_store_bench(config)


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from service.evaluation.config import preset
    from service.evaluation.runner import PARTS, run_evaluation

    config = preset("quick" if args.quick else args.preset)
    if args.redis_url or args.kafka_bootstrap:
        from dataclasses import replace

        live = replace(config.live, redis_url=args.redis_url, kafka_bootstrap=args.kafka_bootstrap)
        config = replace(config, live=live)
    parts = PARTS if args.only is None else (args.only,)
    command = "userembed evaluate" + (
        f" --preset {config.preset}" if config.preset != "default" else ""
    )
    path = run_evaluation(config, Path(args.out), parts=parts, command=command)
    print(f"report: {path} (plots and report.json in {path.parent / 'report'})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="userembed",
        description="Fresh, stable user embeddings for rankers. Configuration: USEREMBED_* "
        "environment variables (see README).",
    )
    parser.add_argument(
        "--log-level", help="debug, info, warning, error (default info; warning for evaluate)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="everything in one process on the embedded default")
    demo.add_argument("--users", type=int, help="synthetic users u0..u{N-1} (default 10000)")
    demo.add_argument("--rate", type=float, help="synthetic events per second (default 2000)")
    demo.add_argument("--host", help="API host (default 127.0.0.1)")
    demo.add_argument("--port", type=int, help="API port (default 8000)")
    demo.add_argument("--registry", help="model registry directory (default var/registry)")
    demo.add_argument("--duration", type=float, help="stop after this many seconds")
    demo.set_defaults(func=_cmd_demo)

    serve = sub.add_parser("serve", help="the read API against the configured store")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--grpc-port", type=int, help="gRPC port (default 50051, 0 = off)")
    serve.add_argument(
        "--workers",
        type=int,
        help="server processes sharing the ports, supervised (default 1; 0 = one per usable core)",
    )
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by the parent
    serve.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(func=_cmd_serve)

    worker = sub.add_parser("worker", help="the embedding worker against the configured store")
    worker.set_defaults(func=_cmd_worker)

    ingest = sub.add_parser("ingest", help="Kafka consumer that keeps feature states in Redis")
    ingest.add_argument("--metrics-port", type=int, help="Prometheus port (default 9400)")
    ingest.set_defaults(func=_cmd_ingest)

    produce = sub.add_parser("produce", help="synthetic events to Kafka")
    produce.add_argument("--rate", type=float, default=1000.0, help="events per second")
    produce.add_argument("--users", type=int, default=10_000)
    produce.add_argument("--malformed-fraction", type=float, default=0.0)
    produce.add_argument("--count", type=int, help="stop after this many events")
    produce.add_argument("--duration", type=float, help="stop after this many seconds")
    produce.add_argument("--seed", type=int, default=7)
    produce.set_defaults(func=_cmd_produce)

    publish = sub.add_parser("publish-standin", help="publish the untrained stand-in model")
    publish.add_argument("--version", default="standin-1")
    publish.add_argument("--registry", help="registry directory or URL (default: settings)")
    publish.add_argument("--model", default="default", help="the model to publish it as")
    publish.add_argument("--dim", type=int, default=128, help="output dimension")
    publish.set_defaults(func=_cmd_publish_standin)

    retire = sub.add_parser(
        "retire-model", help="stop serving a model (its CURRENT becomes RETIRED)"
    )
    retire.add_argument("model")
    retire.add_argument("--registry", help="registry directory or URL (default: settings)")
    retire.set_defaults(func=_cmd_retire_model)

    init_registry = sub.add_parser(
        "init-registry", help="install a model into the registry if it has none (default model)"
    )
    init_registry.add_argument(
        "--registry", help="registry directory or URL to seed (default: settings)"
    )
    init_registry.add_argument("--model", default="default", help="the model to seed")
    init_registry.add_argument(
        "--from",
        dest="source",
        help="registry whose CURRENT to install (default: the committed sum-default-1)",
    )
    init_registry.add_argument(
        "--force", action="store_true", help="install even if the registry serves a model"
    )
    init_registry.set_defaults(func=_cmd_init_registry)

    inspect = sub.add_parser("inspect", help="print a user's feature state and embedding")
    inspect.add_argument("user_id")
    inspect.set_defaults(func=_cmd_inspect)

    migrate = sub.add_parser(
        "migrate-keys",
        help="move a single Redis from key layout v1 to v2 (roles stopped; docs/migrate-keys.md)",
    )
    migrate.add_argument(
        "--batch", type=int, default=1000, help="keys per SCAN and per atomic step (default 1000)"
    )
    migrate.set_defaults(func=_cmd_migrate_keys)

    add_model_commands(sub)  # train, bench-model, export-world (torch imported on use)
    add_registry_commands(sub)  # registry push / sync (object-store registries)

    bench = sub.add_parser("bench", help="benchmarks that print numbers next to a baseline")
    bench_sub = bench.add_subparsers(dest="bench", required=True)
    read = bench_sub.add_parser(
        "read",
        help="API over HTTP and gRPC vs raw Redis GET/MGET, same load generator; the client"
        " library vs raw httpx; hedging with one of two server processes slowed",
    )
    read.add_argument("--redis-url", help="existing Redis (default: start a private one)")
    read.add_argument("--concurrency", default="8,32,64", help="comma-separated levels")
    read.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    read.add_argument("--users", type=int, default=10_000)
    read.add_argument("--batch-size", type=int, default=100, help="users per batch (0 = skip)")
    read.add_argument(
        "--workers",
        default="1",
        help="serve --workers counts, comma-separated: several are measured side by side,"
        " rows labelled [wN] (default 1)",
    )
    read.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="the targets of a level are measured in turns, this many slices of"
        " duration/rounds each (default 3)",
    )
    read.add_argument(
        "--no-client",
        dest="client",
        action="store_false",
        help="skip the client library vs raw httpx rows",
    )
    read.add_argument(
        "--client-concurrency",
        help="levels of the client rows, comma-separated (default: the middle --concurrency)",
    )
    read.add_argument(
        "--no-hedge",
        dest="hedge",
        action="store_false",
        help="skip the hedging rows (client gets, serve --workers 2, one process paused)",
    )
    read.add_argument("--hedge-concurrency", type=int, default=4, help="tasks of the hedging rows")
    read.add_argument(
        "--hedge-after-ms",
        type=float,
        help="hedge delay (default: the p95 of the unhedged reads, both processes healthy)",
    )
    read.set_defaults(func=_cmd_bench_read)
    grpc_bench = bench_sub.add_parser(
        "grpc", help="gRPC server candidates vs the HTTP path, per process (docs/grpc.md)"
    )
    grpc_bench.add_argument("--redis-url", help="existing Redis (default: start a private one)")
    grpc_bench.add_argument("--concurrency", default="8,32", help="comma-separated levels")
    grpc_bench.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    grpc_bench.add_argument("--users", type=int, default=10_000)
    grpc_bench.add_argument("--batch-size", type=int, default=100, help="users per batch")
    grpc_bench.add_argument(
        "--candidates",
        default="aio-messages,aio-bytes,sync-pool,grpclib,aio-constant",
        help="comma-separated (grpclib is skipped when not installed; aio-constant is a ceiling)",
    )
    grpc_bench.add_argument("--channels", type=int, default=4, help="gRPC channels of the load")
    grpc_bench.add_argument(
        "--rounds", type=int, default=1, help="every target measured again, interleaved"
    )
    grpc_bench.set_defaults(func=_cmd_bench_grpc)
    ingest_bench = bench_sub.add_parser("ingest", help="events/s: memory vs Kafka, decoders")
    ingest_bench.add_argument("--events", type=int, default=40_000)
    ingest_bench.add_argument("--users", type=int, default=10_000)
    ingest_bench.add_argument("--batch", type=int, default=5000)
    ingest_bench.add_argument("--redis-url", help="existing Redis (default: a private one)")
    ingest_bench.add_argument(
        "--kafka-bootstrap", help="existing Kafka (default: KAFKA_BOOTSTRAP or the mock cluster)"
    )
    ingest_bench.set_defaults(func=_cmd_bench_ingest)
    worker_bench = bench_sub.add_parser(
        "worker", help="embeddings/s by batch size: pipelined vs sequential vs model only"
    )
    worker_bench.add_argument("--users", type=int, default=20_000)
    worker_bench.add_argument("--batches", default="64,256,1024", help="comma-separated sizes")
    worker_bench.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads")
    worker_bench.add_argument(
        "--precision", choices=["auto", "fp32", "fp16"], default="auto", help="model precision"
    )
    worker_bench.add_argument(
        "--provider", choices=["auto", "cuda", "cpu"], default="auto", help="auto: CUDA if present"
    )
    worker_bench.add_argument(
        "--processes", default="1", help="comma-separated worker-process counts (e.g. 1,4)"
    )
    worker_bench.add_argument("--events-per-user", type=int, default=30)
    worker_bench.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    worker_bench.add_argument("--redis-url", help="existing Redis (default: a private one)")
    worker_bench.set_defaults(func=_cmd_bench_worker)
    store_bench = bench_sub.add_parser(
        "store", help="store cost per op: local 3-primary Redis Cluster vs one node, bytes/user"
    )
    store_bench.add_argument("--users", type=int, default=20_000)
    store_bench.add_argument("--events", type=int, default=40_000, help="synthetic events cycled")
    store_bench.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    store_bench.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    store_bench.set_defaults(func=_cmd_bench_store)
    models_bench = bench_sub.add_parser(
        "models", help="several models: worker users/s with 1, 2, 4 models; reads of 1 vs 3"
    )
    models_bench.add_argument("--users", type=int, default=10_000)
    models_bench.add_argument("--batch", type=int, default=256)
    models_bench.add_argument("--reads", type=int, default=5_000)
    models_bench.add_argument("--redis-url", help="existing Redis (default: a private one)")
    models_bench.set_defaults(func=_cmd_bench_models)

    evaluate = sub.add_parser(
        "evaluate",
        help="run the whole pipeline on the synthetic world and write docs/report.md",
        description="Freshness, its value, stabilization and read latency under load, "
        "measured on this machine (about 12 min on 2 cores by default, 4 with --quick).",
    )
    size = evaluate.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="the 'quick' preset: about 4 minutes")
    size.add_argument(
        "--preset", choices=["default", "quick", "tiny"], default="default", help="run size"
    )
    evaluate.add_argument("--out", default="docs", help="writes OUT/report.md and OUT/report/")
    evaluate.add_argument(
        "--only", choices=["live", "offline"], help="live: sections 1, 5; offline: 2-4"
    )
    evaluate.add_argument("--redis-url", help="existing Redis (default: a private one)")
    evaluate.add_argument("--kafka-bootstrap", help="existing Kafka (default: librdkafka's mock)")
    evaluate.set_defaults(func=_cmd_evaluate)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    from models.registry import RegistryError
    from service.core.model_names import InvalidModelName

    args = build_parser().parse_args(argv)
    _configure_logging(args.log_level or ("warning" if args.command == "evaluate" else "info"))
    try:
        args.func(args)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except (RegistryError, InvalidModelName) as exc:  # a wrong name or registry: one sentence
        raise SystemExit(f"userembed {args.command}: {exc}") from None


if __name__ == "__main__":
    main()
