"""What a read returns: one user's :class:`Embedding`, and a :class:`Batch` of them in
request order with the vectors as one matrix."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args, overload

import numpy as np
import numpy.typing as npt

from userembed.errors import NotFound, VersionMismatch

Status = Literal["fresh", "stale", "cold_start", "not_found", "version_mismatch"]
STATUSES: Final[tuple[Status, ...]] = get_args(Status)
Vector = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True, eq=False)
class Embedding:
    """One user's answer. ``vector`` is float32 (float16 on the wire is widened exactly)
    and None for ``not_found`` and ``version_mismatch``, which only a batch reports.

    ``status``: ``fresh``; ``stale`` (older than the server's ``refresh_after_s``: served,
    and a refresh requested); ``cold_start`` (no embedding yet: the model's cold-start
    vector, ``computed_at``/``staleness_ms`` None). ``space_version`` is the space the
    vector is in (what ``model_version=`` pins); ``model_version`` the model that made it.
    """

    user_id: str
    status: Status
    vector: Vector | None
    model_version: str | None
    space_version: str | None
    computed_at: int | None = None
    feature_version: int | None = None
    staleness_ms: int | None = None

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


def single(embedding: Embedding, pin: str | None) -> Embedding:
    """A batch answer as a single get would give it: ``not_found`` and
    ``version_mismatch`` raise (the server's 404 and 409), anything else is returned."""
    if embedding.status == "not_found":
        space = f" in space {pin!r}" if pin else ""
        raise NotFound(
            f"no embedding of {embedding.user_id!r}{space} yet; a refresh was requested",
            code="not_found",
        )
    if embedding.status == "version_mismatch":
        raise VersionMismatch(
            f"the embedding of {embedding.user_id!r} is in space {embedding.space_version!r} "
            f"(model {embedding.model_version!r}), not the requested {pin!r}",
            code="version_mismatch",
        )
    return embedding


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
