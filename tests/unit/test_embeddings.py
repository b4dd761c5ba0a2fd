from __future__ import annotations

import re

import numpy as np
import pytest

from service.core.embeddings import (
    EmbeddingDecodeError,
    EmbeddingRecord,
    StoredEmbedding,
    decode_embedding,
    encode_embedding,
    read_embedding,
)


def record(dtype: str = "float16", dim: int = 16) -> EmbeddingRecord:
    vector = np.random.default_rng(0).standard_normal(dim).astype(dtype)
    return EmbeddingRecord(vector, "v2", "v1", 1_760_000_000_123, 42)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_keeps_every_field(dtype: str) -> None:
    original = record(dtype)
    decoded = decode_embedding(encode_embedding(original))
    np.testing.assert_array_equal(decoded.vector, original.vector)
    assert decoded.vector.dtype == np.dtype(dtype)
    assert (decoded.model_version, decoded.space_version) == ("v2", "v1")
    assert (decoded.computed_at_ms, decoded.feature_version, decoded.dim) == (
        1_760_000_000_123,
        42,
        16,
    )


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_a_stored_record_keeps_its_vector_bytes_as_stored(dtype: str) -> None:
    original = record(dtype)
    data = encode_embedding(original)
    stored = read_embedding(data)
    itemsize = np.dtype(dtype).itemsize
    assert stored == StoredEmbedding(
        data[len(data) - 16 * itemsize :], dtype, "v2", "v1", 1_760_000_000_123, 42
    )
    assert stored.packed == original.vector.astype(np.dtype(dtype).newbyteorder("<")).tobytes()
    assert stored.dim == 16
    np.testing.assert_array_equal(stored.vector, original.vector)
    assert stored.vector.dtype == np.dtype(dtype)
    assert (stored.staleness_ms(original.computed_at_ms + 7), stored.staleness_ms(0)) == (7, 0)
    back = stored.record()
    assert (back.model_version, back.space_version, back.computed_at_ms, back.feature_version) == (
        "v2",
        "v1",
        1_760_000_000_123,
        42,
    )
    np.testing.assert_array_equal(back.vector, original.vector)


def test_float16_record_is_header_plus_two_bytes_per_dimension() -> None:
    assert len(encode_embedding(record("float16", 128))) == 24 + 4 + 256


def test_staleness_is_never_negative() -> None:
    r = record()
    assert r.staleness_ms(r.computed_at_ms + 500) == 500
    assert r.staleness_ms(r.computed_at_ms - 500) == 0


def test_other_dtypes_are_refused() -> None:
    with pytest.raises(
        ValueError, match=r"^embedding dtype float64 not storable: use float16 or float32$"
    ):
        encode_embedding(EmbeddingRecord(np.zeros(4, np.float64), "v", "v", 0, 0))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:5], "embedding record too short (5 bytes)"),
        (lambda b: b"ZZ" + b[2:], "not an embedding record (magic b'ZZ')"),
        (
            lambda b: b[:2] + bytes([7]) + b[3:],
            "unsupported embedding layout v7 (this build reads v1)",
        ),
        (lambda b: b[:3] + bytes([99]) + b[4:], "unknown embedding dtype code 99"),
        (lambda b: b[:-1], "embedding record is 59 bytes, expected 60"),
        (
            lambda b: b[:24] + b"\xff" + b[25:],
            "embedding record's versions are not UTF-8: 'utf-8' codec can't decode byte 0xff "
            "in position 0: invalid start byte",
        ),
        (
            lambda b: b[:26] + b"\xfe" + b[27:],
            "embedding record's versions are not UTF-8: 'utf-8' codec can't decode byte 0xfe "
            "in position 0: invalid start byte",
        ),
    ],
)
def test_unreadable_records_are_refused(mutate, message) -> None:  # type: ignore[no-untyped-def]
    for read in (decode_embedding, read_embedding):
        with pytest.raises(EmbeddingDecodeError, match=f"^{re.escape(message)}$"):
            read(mutate(encode_embedding(record())))
