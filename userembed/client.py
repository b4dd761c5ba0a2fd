"""The blocking client: ``Client(url).get(user_id)``, ``.get_many(user_ids)`` (of one
model, or of several: ``models=[...]``) and ``.list_models()``.

One pooled connection set (HTTP) or channel (gRPC) per client, safe to share between
threads. Every call has a deadline (``timeout``) that bounds all it does: its requests,
retries with backoff, hedges and the parts of a split batch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import TracebackType
from typing import TypeVar, overload

from userembed.batching import DEFAULT_MAX_BATCH, check_user_id, split, users_per_request
from userembed.hedging import HedgeBudget, hedged
from userembed.options import ClientOptions
from userembed.results import Batch, Embedding, ModelBatches, ModelInfo
from userembed.retry import RetryPolicy, call_with_retries, deadline_after, remaining_s
from userembed.transport import Precision, Query, Target, Transport

T = TypeVar("T")


def open_transport(target: Target, options: ClientOptions) -> Transport:
    """The blocking transport for ``target`` (the composition of the client)."""
    if target.protocol == "grpc":
        from userembed.grpc_transport import GrpcTransport  # grpc only when asked for

        return GrpcTransport(
            target.address,
            secure=target.secure,
            api_key=options.api_key,
            precision=options.precision,
        )
    from userembed.http_transport import HttpTransport

    return HttpTransport(
        target.address,
        api_key=options.api_key,
        precision=options.precision,
        max_connections=options.max_connections,
    )


class Client:
    """Reads user embeddings from a ``userembed serve`` over HTTP or gRPC.

    ``url``: ``http://host:8000`` (HTTP API) or ``grpc://host:50051`` (gRPC);
    ``https://`` / ``grpcs://`` for TLS. ``model`` is the model a call reads when it
    names none (None: the server's default model); ``model_version`` pins the space
    the calls reading that model expect (overridable per call); ``timeout`` is each
    call's default deadline in seconds; ``retry`` how
    :class:`~userembed.errors.Unavailable` is retried;
    ``max_batch`` the server's ``batch_get_max_ids`` (larger ``get_many`` calls are
    split); ``precision`` the vectors' wire format (float16 is exact for the default
    float16 store); ``hedge_after_s`` sends a second request when the first has not
    answered by then (off by default), for at most ``hedge_budget`` of the calls.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        model: str | None = None,
        model_version: str | None = None,
        timeout: float = 1.0,
        retry: RetryPolicy | None = None,
        max_batch: int = DEFAULT_MAX_BATCH,
        precision: Precision = "float16",
        hedge_after_s: float | None = None,
        hedge_budget: float = 0.1,
        max_connections: int = 32,
        transport: Transport | None = None,
    ) -> None:
        self.options = ClientOptions(
            api_key=api_key,
            model=model,
            model_version=model_version,
            timeout=timeout,
            retry=retry or RetryPolicy(),
            max_batch=max_batch,
            precision=precision,
            hedge_after_s=hedge_after_s,
            hedge_budget=hedge_budget,
            max_connections=max_connections,
        )
        self.target = Target.parse(url)
        self._transport = transport or open_transport(self.target, self.options)
        self.hedge_budget = HedgeBudget(self.options.hedge_budget)  # its .denied counts
        self._pools: dict[str, ThreadPoolExecutor] = {}
        self._pools_lock = threading.Lock()

    def get(
        self,
        user_id: str,
        *,
        model: str | None = None,
        model_version: str | None = None,
        timeout: float | None = None,
    ) -> Embedding:
        """One user's embedding of ``model`` (``fresh``, ``stale`` or ``cold_start``).
        Raises :class:`~userembed.errors.NotFound` /
        :class:`~userembed.errors.VersionMismatch` when there is none to serve in the
        pinned space, :class:`~userembed.errors.UnknownModel` for a model the server does
        not serve, and the other typed errors."""
        check_user_id(user_id)
        query = self.options.query(model, model_version)
        deadline = deadline_after(self.options.timeout if timeout is None else timeout)
        return self._call(
            lambda: self._transport.get(user_id, query, remaining_s(deadline)), deadline
        )

    @overload
    def get_many(
        self,
        user_ids: Sequence[str],
        *,
        model: str | None = None,
        model_version: str | None = None,
        timeout: float | None = None,
    ) -> Batch: ...
    @overload
    def get_many(
        self,
        user_ids: Sequence[str],
        *,
        models: Sequence[str],
        model_versions: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ModelBatches: ...
    def get_many(
        self,
        user_ids: Sequence[str],
        *,
        model: str | None = None,
        model_version: str | None = None,
        models: Sequence[str] | None = None,
        model_versions: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Batch | ModelBatches:
        """Every user's answer in request order, with a per-user status (``not_found`` and
        ``version_mismatch`` included, with no vector): a :class:`Batch` of ``model``, or,
        with ``models=[...]``, a :class:`ModelBatches` (one batch per model, all read in
        one request per part), each model pinned by ``model_versions``. Above
        ``max_batch`` answers (users x models) the requests are split and sent in
        parallel."""
        ids = [check_user_id(u) for u in user_ids]
        query = self.options.batch_query(model, model_version, models, model_versions)
        deadline = deadline_after(self.options.timeout if timeout is None else timeout)
        answers = self._batch(ids, query, deadline) if ids else []
        if models is None:
            return Batch(answers)
        return ModelBatches.from_answers(ids, query.models, answers)

    def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models the server serves (``GET /v1/models``, gRPC ``ListModels``): the
        default model first, then by name."""
        deadline = deadline_after(self.options.timeout if timeout is None else timeout)
        return self._call(lambda: self._transport.list_models(remaining_s(deadline)), deadline)

    def _batch(self, ids: Sequence[str], query: Query, deadline: float) -> list[Embedding]:
        """``ids`` in parts of at most ``max_batch`` answers, in parallel, answers in order."""

        def part(chunk: Sequence[str]) -> list[Embedding]:
            return self._call(
                lambda: self._transport.batch_get(chunk, query, remaining_s(deadline)), deadline
            )

        chunks = split(ids, users_per_request(self.options.max_batch, len(query.names)))
        if len(chunks) == 1:
            return part(chunks[0])
        futures = [self._executor("parts").submit(part, chunk) for chunk in chunks]
        return [e for future in futures for e in future.result()]

    def _call(self, request: Callable[[], T], deadline: float) -> T:
        hedge = self.options.hedge_after_s
        if hedge is None:
            return call_with_retries(request, self.options.retry, deadline)
        return call_with_retries(
            lambda: hedged(request, hedge, self._executor("hedges"), deadline, self.hedge_budget),
            self.options.retry,
            deadline,
        )

    def _executor(self, kind: str) -> ThreadPoolExecutor:
        """Threads for the parts of split batches or for hedges, made on first need; two
        pools, so that a part waiting for its hedge never waits for a thread of its own."""
        with self._pools_lock:
            pool = self._pools.get(kind)
            if pool is None:
                pool = self._pools[kind] = ThreadPoolExecutor(
                    max_workers=self.options.max_connections,
                    thread_name_prefix=f"userembed-{kind}",
                )
            return pool

    def close(self) -> None:
        """Close the connections; threads still running a hedge finish by their deadline."""
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)
        self._transport.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
