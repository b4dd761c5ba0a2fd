"""The embedding record the worker writes and the API serves, with its binary codec.

Two views of one stored record: :class:`EmbeddingRecord` (the vector as an array: what
the worker computes and stabilizes) and :class:`StoredEmbedding` (the vector still
packed: what the read path serves, so a reader asking for the stored dtype gets the
stored bytes without a decode and re-encode per user). A bulk read whose records share
one layout, as nearly all do, is also readable at once as :class:`StoredColumns`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Final, Literal, cast, overload

import numpy as np
import numpy.typing as npt

EmbeddingDtype = Literal["float16", "float32"]

LAYOUT_VERSION: Final = 1
_MAGIC: Final = b"UE"
_DTYPE_CODES: Final[dict[str, int]] = {"float16": 1, "float32": 2}
_CODE_DTYPES: Final[dict[int, EmbeddingDtype]] = {1: "float16", 2: "float32"}
LITTLE_ENDIAN: Final = {name: np.dtype(name).newbyteorder("<") for name in _DTYPE_CODES}
ITEMSIZE: Final[dict[str, int]] = {name: np.dtype(name).itemsize for name in _DTYPE_CODES}
# magic, layout, dtype code, dim, feature_version, computed_at_ms, len(model), len(space)
_HEADER: Final = struct.Struct("<2sBBHQqBB")
_STAMPS_AT: Final = 6  # feature_version and computed_at_ms: what differs between records
_VERSIONS_AT: Final = _HEADER.size - 2  # the name lengths, then the names
_STAMPS: Final = np.dtype([("feature_version", "<u8"), ("computed_at", "<i8")])


class EmbeddingDecodeError(ValueError):
    """A stored embedding record that this build cannot read."""


@dataclass(frozen=True, slots=True)
class EmbeddingRecord:
    """A computed embedding and where it came from.

    ``space_version`` is the model version whose space the vector is expressed in;
    it differs from ``model_version`` once a retrained model is aligned to its parent.
    """

    vector: npt.NDArray[np.floating]
    model_version: str
    space_version: str
    computed_at_ms: int
    feature_version: int

    @property
    def dim(self) -> int:
        return int(self.vector.shape[0])

    def staleness_ms(self, now_ms: int) -> int:
        return max(0, now_ms - self.computed_at_ms)


def packed_vector(vector: npt.NDArray[np.floating], dtype: EmbeddingDtype) -> bytes:
    """``vector`` as little-endian ``dtype`` bytes (the stored and the transported form)."""
    return bytes(vector.astype(LITTLE_ENDIAN[dtype], copy=False).tobytes())


def encode_embedding(record: EmbeddingRecord) -> bytes:
    """Versioned binary record: header, two short version strings, then the vector."""
    dtype = str(record.vector.dtype)
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"embedding dtype {dtype} not storable: use float16 or float32")
    model = record.model_version.encode()
    space = record.space_version.encode()
    if len(model) > 255 or len(space) > 255:
        raise ValueError("model and space versions are limited to 255 bytes")
    header = _HEADER.pack(
        _MAGIC,
        LAYOUT_VERSION,
        _DTYPE_CODES[dtype],
        record.dim,
        record.feature_version,
        record.computed_at_ms,
        len(model),
        len(space),
    )
    vector = packed_vector(record.vector, cast(EmbeddingDtype, dtype))  # checked above
    return b"".join((header, model, space, vector))


@dataclass(slots=True)  # not frozen: one is built per user read (frozen __init__ is ~3x slower)
class StoredEmbedding:
    """A stored record with its vector still packed: ``packed`` is little-endian ``dtype``
    bytes, exactly as stored. Treat it as immutable."""

    packed: bytes
    dtype: EmbeddingDtype
    model_version: str
    space_version: str
    computed_at_ms: int
    feature_version: int

    @property
    def dim(self) -> int:
        return len(self.packed) // ITEMSIZE[self.dtype]

    @property
    def vector(self) -> npt.NDArray[np.floating]:
        """The vector, a read-only view of ``packed``."""
        return np.frombuffer(self.packed, dtype=LITTLE_ENDIAN[self.dtype])

    def staleness_ms(self, now_ms: int) -> int:
        return max(0, now_ms - self.computed_at_ms)

    def record(self) -> EmbeddingRecord:
        return EmbeddingRecord(
            self.vector,
            self.model_version,
            self.space_version,
            self.computed_at_ms,
            self.feature_version,
        )


def read_embedding(data: bytes) -> StoredEmbedding:
    """The stored record ``data``, its vector left packed; raise
    :class:`EmbeddingDecodeError` when unreadable."""
    if len(data) < _HEADER.size:
        raise EmbeddingDecodeError(f"embedding record too short ({len(data)} bytes)")
    magic, layout, code, dim, feature_version, computed_at, n_model, n_space = _HEADER.unpack_from(
        data
    )
    if magic != _MAGIC:
        raise EmbeddingDecodeError(f"not an embedding record (magic {magic!r})")
    if layout != LAYOUT_VERSION:
        raise EmbeddingDecodeError(
            f"unsupported embedding layout v{layout} (this build reads v{LAYOUT_VERSION})"
        )
    dtype = _CODE_DTYPES.get(code)
    if dtype is None:
        raise EmbeddingDecodeError(f"unknown embedding dtype code {code}")
    pos = _HEADER.size
    vector_at = pos + n_model + n_space
    expected = vector_at + dim * ITEMSIZE[dtype]
    if len(data) != expected:
        raise EmbeddingDecodeError(f"embedding record is {len(data)} bytes, expected {expected}")
    try:
        model, space = data[pos : pos + n_model].decode(), data[pos + n_model : vector_at].decode()
    except UnicodeDecodeError as exc:
        raise EmbeddingDecodeError(f"embedding record's versions are not UTF-8: {exc}") from None
    return StoredEmbedding(data[vector_at:], dtype, model, space, computed_at, feature_version)


def decode_embedding(data: bytes) -> EmbeddingRecord:
    """Inverse of :func:`encode_embedding`; raise :class:`EmbeddingDecodeError` when unreadable."""
    return read_embedding(data).record()


@dataclass(frozen=True, slots=True)
class StoredColumns(Sequence[StoredEmbedding]):
    """Records read together that share one layout (dtype, dim, versions), as columns:
    ``vectors`` holds row ``i``'s packed vector (little-endian ``dtype``). Indexing
    gives each record as a :class:`StoredEmbedding`; the read path serves the columns
    without an object per record."""

    vectors: npt.NDArray[np.uint8]
    dtype: EmbeddingDtype
    model_version: str
    space_version: str
    computed_at_ms: npt.NDArray[np.int64]
    feature_version: npt.NDArray[np.uint64]

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1]) // ITEMSIZE[self.dtype]

    def __len__(self) -> int:
        return len(self.vectors)

    def __iter__(self) -> Iterator[StoredEmbedding]:
        columns = zip(
            self.packed(), self.computed_at_ms.tolist(), self.feature_version.tolist(), strict=True
        )
        for packed, computed_at, feature_version in columns:
            yield self._record(packed, computed_at, feature_version)

    @overload
    def __getitem__(self, index: int) -> StoredEmbedding: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[StoredEmbedding]: ...

    def __getitem__(self, index: int | slice) -> StoredEmbedding | Sequence[StoredEmbedding]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return self._record(
            self.vectors[index].tobytes(),
            int(self.computed_at_ms[index]),
            int(self.feature_version[index]),
        )

    def _record(self, packed: bytes, computed_at: int, feature_version: int) -> StoredEmbedding:
        return StoredEmbedding(
            packed, self.dtype, self.model_version, self.space_version, computed_at, feature_version
        )

    def packed(self, dtype: EmbeddingDtype | None = None) -> list[bytes]:
        """Each record's vector as little-endian ``dtype`` bytes (default: as stored)."""
        vectors = self.vectors
        if dtype is not None and dtype != self.dtype:
            as_dtype = vectors.view(LITTLE_ENDIAN[self.dtype]).astype(LITTLE_ENDIAN[dtype])
            vectors = as_dtype.view(np.uint8)
        blob, width = vectors.tobytes(), vectors.shape[1]
        if not width:
            return [b""] * len(self)
        return [blob[at : at + width] for at in range(0, len(blob), width)]


def read_columns(raws: Sequence[bytes | None]) -> StoredColumns | None:
    """The records ``raws`` at once, when every one is present and they share the first
    one's layout; None otherwise (read them one by one, which says what is wrong).

    The first record is read in full; any other with the same length and the same
    bytes where the layout is written (magic, layout, dtype, dim, the name lengths and
    the names) is as readable, so the rest is a few array comparisons."""
    if not raws or None in raws:
        return None
    records = cast(Sequence[bytes], raws)
    length = len(records[0])
    if any(len(raw) != length for raw in records):
        return None
    try:
        first = read_embedding(records[0])
    except EmbeddingDecodeError:
        return None
    vector_at = length - len(first.packed)
    rows = np.frombuffer(b"".join(records), dtype=np.uint8).reshape(len(records), length)
    layout = np.concatenate((rows[:, :_STAMPS_AT], rows[:, _VERSIONS_AT:vector_at]), axis=1)
    if not (layout == layout[0]).all():
        return None
    stamps = np.ascontiguousarray(rows[:, _STAMPS_AT:_VERSIONS_AT]).view(_STAMPS)
    return StoredColumns(
        rows[:, vector_at:],
        first.dtype,
        first.model_version,
        first.space_version,
        stamps["computed_at"].ravel(),
        stamps["feature_version"].ravel(),
    )
