"""The asyncio client: ``await AsyncClient(url).get(user_id)``, ``.get_many(user_ids)``
(of one model, or of several: ``models=[...]``) and ``.list_models()``, optionally
coalescing concurrent single gets into batch reads (per model and pin).

Same options and semantics as :class:`userembed.Client`; each call's deadline is
enforced as a whole (``asyncio.timeout``), the parts of a split batch are sent
concurrently, and a hedge's slower request is cancelled.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import TypeVar, overload

from userembed.batching import DEFAULT_MAX_BATCH, check_user_id, split, users_per_request
from userembed.coalescing import GetCoalescer
from userembed.errors import DeadlineExceeded
from userembed.hedging import HedgeBudget, hedged_async
from userembed.options import ClientOptions
from userembed.results import Batch, Embedding, ModelBatches, ModelInfo
from userembed.retry import RetryPolicy, call_with_retries_async, deadline_after, remaining_s
from userembed.transport import AsyncTransport, Precision, Query, Target

T = TypeVar("T")


def open_async_transport(target: Target, options: ClientOptions) -> AsyncTransport:
    """The asyncio transport for ``target``."""
    if target.protocol == "grpc":
        from userembed.grpc_transport import AsyncGrpcTransport  # grpc only when asked for

        return AsyncGrpcTransport(
            target.address,
            secure=target.secure,
            api_key=options.api_key,
            precision=options.precision,
        )
    from userembed.http_transport import AsyncHttpTransport

    return AsyncHttpTransport(
        target.address,
        api_key=options.api_key,
        precision=options.precision,
        max_connections=options.max_connections,
    )


class AsyncClient:
    """Reads user embeddings from a ``userembed serve`` over HTTP or gRPC, in asyncio.

    The options are :class:`userembed.Client`'s, plus ``coalesce_window_s``: concurrent
    ``get`` calls within that many seconds of the first become one batch read per model
    and pin (off by default; 0.001-0.005 suits a ranker fanning out single gets).
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
        coalesce_window_s: float | None = None,
        max_connections: int = 32,
        transport: AsyncTransport | None = None,
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
            coalesce_window_s=coalesce_window_s,
        )
        self.target = Target.parse(url)
        self._transport = transport or open_async_transport(self.target, self.options)
        self.hedge_budget = HedgeBudget(self.options.hedge_budget)  # its .denied counts
        self._coalescer = (
            GetCoalescer(self._batch, coalesce_window_s, max_batch)
            if coalesce_window_s is not None
            else None
        )

    async def get(
        self,
        user_id: str,
        *,
        model: str | None = None,
        model_version: str | None = None,
        timeout: float | None = None,
    ) -> Embedding:
        """One user's embedding of ``model``; see :meth:`userembed.Client.get`."""
        check_user_id(user_id)
        query = self.options.query(model, model_version)
        deadline = deadline_after(self.options.timeout if timeout is None else timeout)
        if self._coalescer is not None:
            return await self._coalescer.get(user_id, query, deadline)
        return await self._call(
            lambda: self._transport.get(user_id, query, remaining_s(deadline)), deadline
        )

    @overload
    async def get_many(
        self,
        user_ids: Sequence[str],
        *,
        model: str | None = None,
        model_version: str | None = None,
        timeout: float | None = None,
    ) -> Batch: ...
    @overload
    async def get_many(
        self,
        user_ids: Sequence[str],
        *,
        models: Sequence[str],
        model_versions: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> ModelBatches: ...
    async def get_many(
        self,
        user_ids: Sequence[str],
        *,
        model: str | None = None,
        model_version: str | None = None,
        models: Sequence[str] | None = None,
        model_versions: Mapping[str, str] | None = None,
        timeout: float | None = None,
    ) -> Batch | ModelBatches:
        """Every user's answer in request order, of one model or of several; see
        :meth:`userembed.Client.get_many`."""
        ids = [check_user_id(u) for u in user_ids]
        query = self.options.batch_query(model, model_version, models, model_versions)
        deadline = deadline_after(self.options.timeout if timeout is None else timeout)
        answers = await self._batch(ids, query, deadline) if ids else []
        if models is None:
            return Batch(answers)
        return ModelBatches.from_answers(ids, query.models, answers)

    async def list_models(self, *, timeout: float | None = None) -> list[ModelInfo]:
        """The models the server serves; see :meth:`userembed.Client.list_models`."""
        deadline = deadline_after(self.options.timeout if timeout is None else timeout)
        return await self._call(
            lambda: self._transport.list_models(remaining_s(deadline)), deadline
        )

    async def _batch(self, ids: Sequence[str], query: Query, deadline: float) -> list[Embedding]:
        """``ids`` in parts of at most ``max_batch`` answers, sent concurrently, answers in
        order."""

        def part(chunk: Sequence[str]) -> Awaitable[list[Embedding]]:
            return self._call(
                lambda: self._transport.batch_get(chunk, query, remaining_s(deadline)), deadline
            )

        chunks = split(ids, users_per_request(self.options.max_batch, len(query.names)))
        if len(chunks) == 1:
            return await part(chunks[0])
        parts = await asyncio.gather(*(part(chunk) for chunk in chunks))
        return [e for answers in parts for e in answers]

    async def _call(self, request: Callable[[], Awaitable[T]], deadline: float) -> T:
        """``request`` with retries (and hedges), bounded by ``deadline`` as a whole."""
        hedge = self.options.hedge_after_s
        budget = self.hedge_budget
        attempt = request if hedge is None else (lambda: hedged_async(request, hedge, budget))
        try:
            async with asyncio.timeout(deadline - time.monotonic()):
                return await call_with_retries_async(attempt, self.options.retry, deadline)
        except TimeoutError:
            raise DeadlineExceeded(
                "no answer before the call's deadline", code="deadline_exceeded"
            ) from None

    async def aclose(self) -> None:
        """Send the coalesced gets still waiting, then close the connections."""
        if self._coalescer is not None:
            await self._coalescer.aclose()
        await self._transport.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
