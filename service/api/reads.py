"""The read semantics shared by the HTTP and gRPC front ends (SOAP "latency free").

A read answers from the store at once and never waits for the model: a stale record
is served flagged ``stale``, a missing one gets the model's cold-start embedding
(``cold_start``, or ``not_found`` when configured); both ask for a background
refresh. A reader may pin the space it expects (``model_version``); a record in
another space is not served as if it were comparable (``version_mismatch``).
Several models are served side by side: a read names them (the default model when
it names none) and gets each user's answer of each model from one store read; a pin
is per model. Front ends only parse requests and encode :class:`Answer` objects.
"""

from __future__ import annotations

import asyncio
import binascii
import functools
import logging
import re
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Final, Literal, TypeGuard, TypeVar, get_args, overload

import numpy as np
import numpy.typing as npt
from prometheus_client import Counter

from models.registry import RegistryError, check_version_name
from service.api.coalescer import ReadCoalescer
from service.api.cold_start import ColdStartSource, ServedModels, as_served_models
from service.api.hot_cache import HotCache
from service.api.refresh import RefreshRequester
from service.core.clock import Clock, now_ms
from service.core.embeddings import (
    ITEMSIZE,
    LITTLE_ENDIAN,
    EmbeddingDtype,
    StoredColumns,
    StoredEmbedding,
    packed_vector,
)
from service.core.events import USER_ID_PATTERN, user_id_problem
from service.core.model_names import DEFAULT_MODEL, InvalidModelName, check_model_name
from service.metrics import API_SERVED, API_SERVED_STALENESS, API_STORE_ERRORS
from service.settings import Settings
from service.store.protocol import Store, StoreMisconfigured, StoreUnavailable

log = logging.getLogger(__name__)

Status = Literal["fresh", "stale", "cold_start", "not_found", "version_mismatch"]
Encoding = Literal["json", "base64_float16", "base64_float32"]
ENCODINGS: Final[tuple[str, ...]] = get_args(Encoding)
DEFAULT_ONLY: Final[tuple[str, ...]] = (DEFAULT_MODEL,)

_STATUSES: Final[tuple[Status, ...]] = get_args(Status)
_USER_IDS: Final = re.compile(f"(?:{USER_ID_PATTERN.pattern}\n)*")
_STALENESS_SAMPLE: Final = 16
V = TypeVar("V")


class ReadError(Exception):
    """A request the read path refuses, with a stable ``code`` each front end maps to
    its own status (HTTP 4xx/503, a gRPC status code)."""

    def __init__(self, code: str, message: str, retry_after_s: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.retry_after_s = code, message, retry_after_s


@dataclass(slots=True)  # not frozen: a frozen dataclass's __init__ is ~3x slower
class Answer:
    """One user's answer of one model. ``data`` is the vector as little-endian ``dtype``
    bytes (a stored record's bytes as stored), None for ``not_found`` and
    ``version_mismatch``."""

    user_id: str
    status: Status
    data: bytes | None
    dtype: EmbeddingDtype
    model_version: str | None
    space_version: str | None
    computed_at: int | None = None
    feature_version: int | None = None
    staleness_ms: int | None = None
    model: str = DEFAULT_MODEL

    @property
    def vector(self) -> npt.NDArray[np.floating] | None:
        """The vector, a read-only view of ``data``."""
        return None if self.data is None else np.frombuffer(self.data, LITTLE_ENDIAN[self.dtype])

    @property
    def dim(self) -> int | None:
        return None if self.data is None else len(self.data) // ITEMSIZE[self.dtype]

    def packed(self, dtype: EmbeddingDtype) -> bytes:
        """The vector as little-endian ``dtype`` bytes (empty when there is none): the
        stored bytes themselves when ``dtype`` is the stored one."""
        if self.data is None:
            return b""
        if dtype == self.dtype:
            return self.data
        return packed_vector(np.frombuffer(self.data, LITTLE_ENDIAN[self.dtype]), dtype)

    def encoded(self, encoding: Encoding) -> npt.NDArray[np.float32] | str | None:
        """The vector for a JSON body: a float32 array (orjson writes it as numbers), or
        base64 of the packed bytes."""
        if self.data is None:
            return None
        if encoding == "json":
            return np.frombuffer(self.data, LITTLE_ENDIAN[self.dtype]).astype(np.float32)
        dtype: EmbeddingDtype = "float16" if encoding == "base64_float16" else "float32"
        return binascii.b2a_base64(self.packed(dtype), newline=False).decode("ascii")


@dataclass(frozen=True, slots=True)
class AnswerColumns(Sequence[Answer]):
    """A batch's answers of one model, every user's stored record in ``records`` (one
    layout, in the requested space): each answer is ``fresh``, or ``stale`` where
    ``stale``. Indexing gives each as an :class:`Answer`; a front end can write the
    columns without an object per user."""

    user_ids: Sequence[str]
    records: StoredColumns
    staleness_ms: npt.NDArray[np.int64]
    stale: npt.NDArray[np.bool_]
    model: str

    def __len__(self) -> int:
        return len(self.user_ids)

    def __iter__(self) -> Iterator[Answer]:
        columns = zip(
            self.user_ids,
            self.stale.tolist(),
            self.staleness_ms.tolist(),
            self.records,
            strict=True,
        )
        for user_id, stale, staleness, record in columns:
            yield self._answer(user_id, stale, staleness, record)

    @overload
    def __getitem__(self, index: int) -> Answer: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[Answer]: ...

    def __getitem__(self, index: int | slice) -> Answer | Sequence[Answer]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        stale, staleness = bool(self.stale[index]), int(self.staleness_ms[index])
        return self._answer(self.user_ids[index], stale, staleness, self.records[index])

    def _answer(self, user_id: str, stale: bool, staleness: int, record: StoredEmbedding) -> Answer:
        return _stored_answer(user_id, "stale" if stale else "fresh", record, staleness, self.model)

    def rows(self, vectors: Sequence[V]) -> Iterator[tuple[str, bool, V, int, int, int]]:
        """What a front end writes of each answer, in order: (user_id, stale, its vector
        from ``vectors``, computed_at, feature_version, staleness_ms)."""
        records = self.records
        return zip(
            self.user_ids,
            self.stale.tolist(),
            vectors,
            records.computed_at_ms.tolist(),
            records.feature_version.tolist(),
            self.staleness_ms.tolist(),
            strict=True,
        )


def _stored_answer(
    user_id: str, status: Status, record: StoredEmbedding, staleness: int, model: str
) -> Answer:
    """The answer of a stored ``record`` (without its vector when ``version_mismatch``)."""
    return Answer(
        user_id,
        status,
        None if status == "version_mismatch" else record.packed,
        record.dtype,
        record.model_version,
        record.space_version,
        record.computed_at_ms,
        record.feature_version,
        staleness,
        model,
    )


def parse_encoding(value: str) -> Encoding:
    if value not in ENCODINGS:
        raise ReadError(
            "invalid_encoding", f"unknown encoding {value!r}: use one of {', '.join(ENCODINGS)}"
        )
    return value  # type: ignore[return-value]  # checked against the Literal's values


def parse_pin(value: str | None) -> str | None:
    """A requested space (``model_version``); empty means any."""
    if not value:
        return None
    try:
        return check_version_name(value)
    except RegistryError as exc:
        raise ReadError("invalid_model_version", str(exc)) from None


def parse_model(value: str | None) -> str:
    """A requested model; empty means the default model."""
    return _model_name(value) if value else DEFAULT_MODEL


def parse_models(values: Sequence[str]) -> tuple[str, ...]:
    """The models of a batch read: at least one, each named once."""
    if not values:
        raise ReadError("invalid_request", "models is empty: name at least one model, or omit it")
    models = tuple(map(_model_name, values))
    if len(set(models)) < len(models):
        raise ReadError("invalid_request", f"models names a model more than once: {list(models)}")
    return models


def parse_pins(values: Mapping[str, str]) -> dict[str, str]:
    """Per-model pins (``model_versions``): model name -> space; an empty space is no pin."""
    pins = {_model_name(model): parse_pin(space) for model, space in values.items()}
    return {model: space for model, space in pins.items() if space is not None}


def _model_name(value: str) -> str:
    try:
        return check_model_name(value)
    except InvalidModelName as exc:
        raise ReadError("invalid_model", str(exc)) from None


def max_request_bytes(settings: Settings) -> int:
    """The largest batch read request (an HTTP body, a gRPC message): ``api_max_body_bytes``,
    and at least 512 bytes per id allowed (ids are at most 128 chars; JSON adds a few)."""
    return max(settings.api_max_body_bytes, settings.batch_get_max_ids * 512)


def check_user_id(user_id: str) -> str:
    problem = user_id_problem(user_id)
    if problem is not None:
        raise ReadError("invalid_user_id", problem)
    return user_id


def check_user_ids(user_ids: Sequence[str]) -> None:
    """:func:`check_user_id` of every id: one regex pass over them all when they are all
    valid (the usual case), one by one (for the first one's reason) otherwise. The ids
    are joined by newlines, which no valid id holds; an id holding one adds a line."""
    joined = "\n".join(user_ids)
    if _USER_IDS.fullmatch(joined + "\n") is None or joined.count("\n") != len(user_ids) - 1:
        for user_id in user_ids:
            check_user_id(user_id)


class EmbeddingReader:
    """Store records -> answers, with refresh requests for missing or stale users.

    Single-user reads are coalesced into one store call per model and event-loop turn;
    a batch read is one store call, whatever models it names. Every store call is
    bounded by ``timeout_ms``. ``cold_start`` knows the served models and their cold
    starts (a plain :data:`ColdStartSource` serves the default model alone); the
    default model is always readable, a named one only while it is served.
    """

    def __init__(
        self,
        store: Store,
        cold_start: ColdStartSource | ServedModels,
        refresher: RefreshRequester,
        *,
        refresh_after_ms: int,
        cold_start_404: bool = False,
        max_batch: int = 1000,
        timeout_ms: int = 1000,
        retry_after_s: int = 1,
        cache: HotCache | None = None,
        clock: Clock = now_ms,
    ) -> None:
        self._store = store
        self.models = as_served_models(cold_start)
        self.refresher = refresher
        self._refresh_after_ms = refresh_after_ms
        self._cold_start_404 = cold_start_404
        self.max_batch = max_batch
        self._timeout_s = timeout_ms / 1000
        self._retry_after_s = retry_after_s
        self.cache = cache
        self._clock = clock
        self._single: dict[str, ReadCoalescer[StoredEmbedding | None]] = {}

    @classmethod
    def from_settings(
        cls,
        store: Store,
        settings: Settings,
        cold_start: ColdStartSource | ServedModels,
        clock: Clock = now_ms,
    ) -> EmbeddingReader:
        refresher = RefreshRequester(
            store,
            int(settings.refresh_coalesce_s * 1000),
            max_rate=settings.refresh_max_rate,
            clock=clock,
        )
        cache = (
            HotCache(settings.hot_cache_ttl_ms, settings.hot_cache_max_users)
            if settings.hot_cache_ttl_ms
            else None
        )
        return cls(
            store,
            cold_start,
            refresher,
            refresh_after_ms=int(settings.refresh_after_s * 1000),
            cold_start_404=settings.cold_start_404,
            max_batch=settings.batch_get_max_ids,
            timeout_ms=settings.api_read_timeout_ms,
            retry_after_s=settings.api_retry_after_s,
            cache=cache,
            clock=clock,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Background work of the read path: flushing refresh requests until ``stop``."""
        await self.refresher.run(stop)

    async def get(self, user_id: str, pin: str | None = None, model: str = DEFAULT_MODEL) -> Answer:
        """One user's answer of ``model``; raise :class:`ReadError` when there is nothing
        to serve."""
        check_user_id(user_id)
        self._check_served((model,))
        key = (model, user_id)
        record = self.cache.get_many([key])[0] if self.cache is not None else None
        if record is None:
            record = await self._coalescer(model).get(user_id)
            if self.cache is not None and record is not None:
                self.cache.put_many([(key, record)])
        refresh: list[str] = []
        answer = self._answer(user_id, model, record, self._clock(), pin, refresh)
        if refresh:
            self.refresher.request(refresh)
        _count((answer,), (model,))
        if answer.status == "not_found":
            space = f" in space {pin!r}" if pin else ""
            raise ReadError(
                "not_found",
                f"no {_embedding(model)} of {user_id!r}{space} yet; a refresh was requested",
            )
        if answer.status == "version_mismatch":
            raise ReadError(
                "version_mismatch",
                f"the {_embedding(model)} of {user_id!r} is in space {answer.space_version!r} "
                f"(model {answer.model_version!r}), not the requested {pin!r}",
            )
        return answer

    async def batch_get(
        self,
        user_ids: Sequence[str],
        pin: str | None = None,
        *,
        models: Sequence[str] = DEFAULT_ONLY,
        pins: Mapping[str, str] | None = None,
    ) -> Sequence[Answer]:
        """Answers in request order, user-major (each user's answer of each of ``models``
        in turn); users with nothing to serve get a status, not an error. ``pin`` pins
        the space of a single model, ``pins`` the space of each model it names. A batch
        of one model whose records were all read as columns, in the pinned space, is
        answered as :class:`AnswerColumns`."""
        self._check_served([*models, *(pins or ())])
        spaces = _model_pins(models, pin, pins or {})
        if len(user_ids) * len(models) > self.max_batch:
            raise ReadError(
                "batch_too_large", _too_many(len(user_ids), len(models), self.max_batch)
            )
        check_user_ids(user_ids)
        records = await self._records(user_ids, models)
        now = self._clock()
        refresh: list[str] = []
        answer = self._answer
        answers: Sequence[Answer]
        if len(models) == 1:  # the usual batch: one model, no per-user tuple of records
            (model,), (space,), (read,) = models, spaces, records
            if _servable_columns(read, len(user_ids), space):
                answers = self._columns(user_ids, model, read, now, refresh)
            else:
                answers = [
                    answer(u, model, r, now, space, refresh)
                    for u, r in zip(user_ids, read, strict=True)
                ]
        else:
            answers = [
                answer(user_id, model, record, now, space, refresh)
                for user_id, row in zip(user_ids, zip(*records, strict=True), strict=True)
                for model, space, record in zip(models, spaces, row, strict=True)
            ]
        if refresh:
            self.refresher.request(refresh)
        _count(answers, models)
        return answers

    def _check_served(self, models: Iterable[str]) -> None:
        """ReadError ``unknown_model`` for a named model that is not served (the default
        model is always readable, without a look at the registry)."""
        named = [model for model in models if model != DEFAULT_MODEL]
        if not named:
            return
        served = self.models.served()
        for model in named:
            if model not in served:
                raise ReadError(
                    "unknown_model",
                    f"model {model!r} is not served; served models: {', '.join(served) or 'none'}",
                )

    def _coalescer(self, model: str) -> ReadCoalescer[StoredEmbedding | None]:
        """The single-read coalescer of ``model`` (one per served model, made on first use)."""
        coalescer = self._single.get(model)
        if coalescer is None:
            coalescer = self._single[model] = ReadCoalescer(partial(self._fetch_model, model))
        return coalescer

    async def _records(
        self, user_ids: Sequence[str], models: Sequence[str]
    ) -> Sequence[Sequence[StoredEmbedding | None]]:
        """The records ``[model][user]``: cached ones, and the rest in one store call (a
        user missing from the cache in any model is read in every model); without a cache,
        one model's as columns where they can be."""
        if self.cache is None:
            return await self._fetch(user_ids, models, columns=True)
        cache = self.cache
        records = [cache.get_many([(model, u) for u in user_ids]) for model in models]
        missing = [i for i in range(len(user_ids)) if any(r[i] is None for r in records)]
        if missing:
            fetched = await self._fetch([user_ids[i] for i in missing], models)
            found: list[tuple[Hashable, StoredEmbedding]] = []
            for model, cached, read in zip(models, records, fetched, strict=True):
                for i, record in zip(missing, read, strict=True):
                    cached[i] = record
                    if record is not None:
                        found.append(((model, user_ids[i]), record))
            cache.put_many(found)
        return records

    async def _fetch_model(
        self, model: str, user_ids: Sequence[str]
    ) -> Sequence[StoredEmbedding | None]:
        (records,) = await self._fetch(user_ids, (model,))
        return records

    async def _fetch(
        self, user_ids: Sequence[str], models: Sequence[str], columns: bool = False
    ) -> Sequence[Sequence[StoredEmbedding | None]]:
        """One bounded store call for ``[model][user]`` records (one model's as columns
        where it can, with ``columns``): a slow or absent store is a ``store_unavailable``
        ReadError (one per failed call, shared by the coalesced callers), never a hang."""
        try:
            async with asyncio.timeout(self._timeout_s):
                if len(models) == 1:
                    store = self._store
                    return [await store.get_embeddings(user_ids, models[0], columns=columns)]
                return await self._store.get_model_embeddings(user_ids, models)
        except StoreMisconfigured as exc:
            API_STORE_ERRORS.inc()
            raise ReadError("store_misconfigured", str(exc), self._retry_after_s) from None
        except (StoreUnavailable, TimeoutError) as exc:
            API_STORE_ERRORS.inc()
            reason = (
                f"store did not answer within {self._timeout_s * 1000:.0f} ms"
                if isinstance(exc, TimeoutError)
                else str(exc)
            )
            raise ReadError(
                "store_unavailable", f"{reason}; retry shortly", self._retry_after_s
            ) from None

    def _columns(
        self,
        user_ids: Sequence[str],
        model: str,
        records: StoredColumns,
        now: int,
        refresh: list[str],
    ) -> AnswerColumns:
        """:meth:`_answer` of every user at once, their records being ``records``."""
        staleness = np.maximum(now - records.computed_at_ms, 0)
        stale = staleness > self._refresh_after_ms
        refresh.extend(user_ids[i] for i in np.flatnonzero(stale).tolist())
        return AnswerColumns(user_ids, records, staleness, stale, model)

    def _answer(
        self,
        user_id: str,
        model: str,
        record: StoredEmbedding | None,
        now: int,
        pin: str | None,
        refresh: list[str],
    ) -> Answer:
        """The answer for one user and model; users to refresh (missing or stale) go to
        ``refresh`` (a refresh recomputes every model of the user)."""
        if record is not None:
            staleness = record.staleness_ms(now)
            status: Status = "fresh" if staleness <= self._refresh_after_ms else "stale"
            if status == "stale":
                refresh.append(user_id)
            if pin is not None and record.space_version != pin:
                status = "version_mismatch"
            return _stored_answer(user_id, status, record, staleness, model)
        refresh.append(user_id)
        cold = None if self._cold_start_404 else self.models.cold_start(model)
        if cold is None or (pin is not None and cold.space_version != pin):
            return Answer(user_id, "not_found", None, "float32", None, None, model=model)
        return Answer(
            user_id,
            "cold_start",
            cold.packed,
            "float32",
            cold.model_version,
            cold.space_version,
            model=model,
        )


def _servable_columns(
    records: Sequence[StoredEmbedding | None], users: int, pin: str | None
) -> TypeGuard[StoredColumns]:
    """Whether ``records`` (of ``users`` users) can be answered as columns: read as
    :class:`StoredColumns`, one per user, in the pinned space if any."""
    return (
        isinstance(records, StoredColumns)
        and len(records) == users
        and (pin is None or records.space_version == pin)
    )


def _model_pins(
    models: Sequence[str], pin: str | None, pins: Mapping[str, str]
) -> list[str | None]:
    """The pinned space of each of ``models``: from ``pins`` (per model), or ``pin``
    (the space of a single model)."""
    if not pins:
        if pin is not None and len(models) > 1:
            raise ReadError(
                "invalid_request",
                f"model_version pins the space of one model, not of {len(models)}: "
                "pin each model in model_versions",
            )
        return [pin] * len(models)
    if pin is not None:
        raise ReadError(
            "invalid_request", "both model_version and model_versions given: use model_versions"
        )
    for model in pins:
        if model not in models:
            raise ReadError(
                "invalid_request", f"model_versions pins {model!r}, which models does not name"
            )
    return [pins.get(model) for model in models]


def _too_many(users: int, models: int, limit: int) -> str:
    if models == 1:
        return f"{users} user_ids requested; at most {limit} per call"
    return (
        f"{users} user_ids x {models} models = {users * models} embeddings requested; "
        f"at most {limit} per call"
    )


def _embedding(model: str) -> str:
    """The noun of error messages: "embedding", or "'clicks' embedding" for a named model."""
    return "embedding" if model == DEFAULT_MODEL else f"{model!r} embedding"


@functools.cache
def _served(model: str, status: Status) -> Counter:
    """The served-embeddings counter of (``model``, ``status``), looked up once."""
    return API_SERVED.labels(model, status)


def _count(answers: Sequence[Answer], models: Sequence[str]) -> None:
    """Served-embedding metrics of ``answers`` (user-major over ``models``): one counter
    increment per (model, status); the staleness of the stored embeddings served, from at
    most ``_STALENESS_SAMPLE`` evenly spaced answers of a batch (each observation takes
    two locks: all 1,000 of a batch would be ~10% of it)."""
    if isinstance(answers, AnswerColumns):
        _count_columns(answers)
        return
    step = len(models)
    for first, model in enumerate(models):
        counts = dict.fromkeys(_STATUSES, 0)
        for answer in answers[first::step]:
            counts[answer.status] += 1
        for status, count in counts.items():
            if count:
                _served(model, status).inc(count)
    for answer in answers[:: max(1, len(answers) // _STALENESS_SAMPLE)]:
        if answer.staleness_ms is not None and answer.data is not None:
            API_SERVED_STALENESS.observe(answer.staleness_ms / 1000)


def _count_columns(answers: AnswerColumns) -> None:
    """:func:`_count` of answers read as columns: fresh and stale ones, all stored."""
    stale = int(answers.stale.sum())
    for status, count in (("fresh", len(answers) - stale), ("stale", stale)):
        if count:
            _served(answers.model, status).inc(count)
    for staleness in answers.staleness_ms[:: max(1, len(answers) // _STALENESS_SAMPLE)].tolist():
        API_SERVED_STALENESS.observe(staleness / 1000)
