"""The embedding record the worker writes and the API serves, with its binary codec."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final, Literal, cast

import numpy as np
import numpy.typing as npt

EmbeddingDtype = Literal["float16", "float32"]

LAYOUT_VERSION: Final = 1
_MAGIC: Final = b"UE"
_DTYPE_CODES: Final[dict[str, int]] = {"float16": 1, "float32": 2}
_CODE_DTYPES: Final = {code: name for name, code in _DTYPE_CODES.items()}
_LITTLE_ENDIAN: Final = {name: np.dtype(name).newbyteorder("<") for name in _DTYPE_CODES}
# magic, layout, dtype code, dim, feature_version, computed_at_ms, len(model), len(space)
_HEADER: Final = struct.Struct("<2sBBHQqBB")


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
    return bytes(vector.astype(_LITTLE_ENDIAN[dtype], copy=False).tobytes())


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


def decode_embedding(data: bytes) -> EmbeddingRecord:
    """Inverse of :func:`encode_embedding`; raise :class:`EmbeddingDecodeError` when unreadable."""
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
    if code not in _CODE_DTYPES:
        raise EmbeddingDecodeError(f"unknown embedding dtype code {code}")
    dtype = _LITTLE_ENDIAN[_CODE_DTYPES[code]]
    pos = _HEADER.size
    expected = pos + n_model + n_space + dim * dtype.itemsize
    if len(data) != expected:
        raise EmbeddingDecodeError(f"embedding record is {len(data)} bytes, expected {expected}")
    model = data[pos : pos + n_model].decode()
    space = data[pos + n_model : pos + n_model + n_space].decode()
    vector = np.frombuffer(data, dtype=dtype, count=dim, offset=pos + n_model + n_space)
    return EmbeddingRecord(
        vector=vector,
        model_version=model,
        space_version=space,
        computed_at_ms=computed_at,
        feature_version=feature_version,
    )
