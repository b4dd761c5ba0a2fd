"""What a read returns: one user's :class:`Embedding`, a :class:`Batch` of them in
request order with the vectors as one matrix, a :class:`ModelBatches` (one batch per
model) when a read names several models, and the served models' :class:`ModelInfo`."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args, overload

import numpy as np
import numpy.typing as npt

from userembed.errors import NotFound, ServerError, VersionMismatch

Status = Literal["fresh", "stale", "cold_start", "not_found", "version_mismatch"]
STATUSES: Final[tuple[Status, ...]] = get_args(Status)
ColdStartStatus = Literal["available", "unavailable", "disabled"]
COLD_START_STATUSES: Final[tuple[ColdStartStatus, ...]] = get_args(ColdStartStatus)
DEFAULT_MODEL: Final = "default"  # the model a read that names none gets (the server's)
Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True, eq=False)
class Embedding:
    """One user's answer. ``vector`` is float32 (float16 on the wire is widened exactly)
    and None for ``not_found`` and ``version_mismatch``, which only a batch reports.

    ``status``: ``fresh``; ``stale`` (older than the server's ``refresh_after_s``: served,
    and a refresh requested); ``cold_start`` (no embedding yet: the model's cold-start
    vector, ``computed_at``/``staleness_ms`` None). ``space_version`` is the space the
    vector is in (what ``model_version=`` pins); ``model_version`` the model version that
    made it; ``model`` the served model it is of (``"default"`` unless the read named one).
    """

    user_id: str
    status: Status
    vector: Vector | None
    model_version: str | None
    space_version: str | None
    computed_at: int | None = None
    feature_version: int | None = None
    staleness_ms: int | None = None
    model: str = DEFAULT_MODEL

    @property
    def dim(self) -> int | None:
        return None if self.vector is None else int(self.vector.shape[0])

    @property
    def found(self) -> bool:
        """True when there is a vector to use (fresh, stale or cold start)."""
        return self.vector is not None


class Batch(Sequence[Embedding]):
    """``get_many``'s answer: one :class:`Embedding` per requested id, in request order
    (duplicates included), each with its own status."""

    __slots__ = ("_items",)

    def __init__(self, items: Sequence[Embedding]) -> None:
        self._items = list(items)

    @overload
    def __getitem__(self, index: int) -> Embedding: ...
    @overload
    def __getitem__(self, index: slice) -> Batch: ...
    def __getitem__(self, index: int | slice) -> Embedding | Batch:
        if isinstance(index, slice):
            return Batch(self._items[index])
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Embedding]:
        return iter(self._items)

    def __repr__(self) -> str:
        counts: dict[str, int] = {}
        for item in self._items:
            counts[item.status] = counts.get(item.status, 0) + 1
        return f"Batch({len(self._items)} users, {counts})"

    @property
    def statuses(self) -> list[Status]:
        return [item.status for item in self._items]

    @property
    def found(self) -> npt.NDArray[np.bool_]:
        """Which rows have a vector."""
        return np.fromiter((i.vector is not None for i in self._items), bool, len(self._items))

    def matrix(self, dim: int | None = None) -> Vector:
        """The vectors as an ``(n, dim)`` float32 array, zero rows where there is none (see
        :attr:`found`). ``dim`` is needed only when no row has a vector."""
        dims = {int(i.vector.shape[0]) for i in self._items if i.vector is not None}
        if len(dims) > 1:
            raise ValueError(f"vectors of different dimensions {sorted(dims)} in one batch")
        if dims:
            dim = dims.pop()
        elif dim is None:
            raise ValueError("no user in the batch has a vector: pass dim= for an empty matrix")
        out = np.zeros((len(self._items), dim), dtype=np.float32)
        for row, item in enumerate(self._items):
            if item.vector is not None:
                out[row] = item.vector
        return out


class ModelBatches(Mapping[str, Batch]):
    """``get_many(user_ids, models=[...])``'s answer: one :class:`Batch` per model, in the
    order of ``models``, each with one answer per requested id in request order.

    Indexed by model, then user: ``batches["clicks"].matrix()`` is the clicks model's
    ``(n, dim)`` matrix (models may differ in dimension), ``batches["clicks"][i]`` user
    ``i``'s answer of it; :meth:`user` gives one user's answers by model.
    """

    __slots__ = ("_batches", "user_ids")

    def __init__(self, user_ids: Sequence[str], batches: Mapping[str, Batch]) -> None:
        self.user_ids = list(user_ids)
        self._batches = dict(batches)

    @classmethod
    def from_answers(
        cls, user_ids: Sequence[str], models: Sequence[str], answers: Sequence[Embedding]
    ) -> ModelBatches:
        """From the server's user-major answers (each user's answer of each model in turn);
        ServerError when they are not that."""
        step = len(models)
        if len(answers) != len(user_ids) * step:
            raise ServerError(
                f"{len(answers)} answers for {len(user_ids)} users x {step} models",
                code="bad_answer",
            )
        batches = {model: Batch(answers[j::step]) for j, model in enumerate(models)}
        for model, batch in batches.items():
            for user_id, answer in zip(user_ids, batch, strict=True):
                if (answer.model, answer.user_id) != (model, user_id):
                    raise ServerError(
                        f"answer of {answer.user_id!r} in model {answer.model!r} where "
                        f"{user_id!r} in {model!r} was expected",
                        code="bad_answer",
                    )
        return cls(user_ids, batches)

    @property
    def models(self) -> tuple[str, ...]:
        return tuple(self._batches)

    def __getitem__(self, model: str) -> Batch:
        return self._batches[model]

    def __iter__(self) -> Iterator[str]:
        return iter(self._batches)

    def __len__(self) -> int:
        return len(self._batches)

    def __repr__(self) -> str:
        return f"ModelBatches({len(self.user_ids)} users x models {list(self._batches)})"

    def user(self, index: int) -> dict[str, Embedding]:
        """The answers of the ``index``-th requested user (request order), by model."""
        return {model: batch[index] for model, batch in self._batches.items()}


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A served model, as ``list_models`` reports it: its ``name`` (what ``model=``
    names), the ``version`` whose cold start the server loaded, the ``space_version`` it
    serves (what pins name), ``dim``, the stored ``dtype``, its ``input_schema_hash``,
    and ``cold_start``: ``available``, ``unavailable`` (users without an embedding are
    ``not_found``) or ``disabled``. Fields the server does not know yet are None."""

    name: str
    version: str | None
    space_version: str | None
    dim: int | None
    dtype: str
    input_schema_hash: str | None
    cold_start: ColdStartStatus


def single(embedding: Embedding, pin: str | None) -> Embedding:
    """A batch answer as a single get would give it: ``not_found`` and
    ``version_mismatch`` raise (the server's 404 and 409, in its words), anything else
    is returned."""
    if embedding.status == "not_found":
        space = f" in space {pin!r}" if pin else ""
        raise NotFound(
            f"no {_noun(embedding.model)} of {embedding.user_id!r}{space} yet; "
            "a refresh was requested",
            code="not_found",
        )
    if embedding.status == "version_mismatch":
        raise VersionMismatch(
            f"the {_noun(embedding.model)} of {embedding.user_id!r} is in space "
            f"{embedding.space_version!r} (model {embedding.model_version!r}), "
            f"not the requested {pin!r}",
            code="version_mismatch",
        )
    return embedding


def _noun(model: str) -> str:
    """The server's noun: "embedding", or "'clicks' embedding" for a named model."""
    return "embedding" if model == DEFAULT_MODEL else f"{model!r} embedding"


def stack_vectors(chunks: Sequence[bytes], dtype: str) -> list[Vector]:
    """Packed little-endian vectors (``dtype`` ``<f2``/``<f4``) of one dimension as float32
    rows of one matrix: one decode for the whole batch instead of one per user."""
    if not chunks:
        return []
    sizes = {len(c) for c in chunks}
    if len(sizes) > 1:
        return [np.frombuffer(c, dtype).astype(np.float32) for c in chunks]
    rows = np.frombuffer(b"".join(chunks), dtype).astype(np.float32)
    return list(rows.reshape(len(chunks), -1))
