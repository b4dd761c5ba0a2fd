from __future__ import annotations

import dataclasses
import re

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.core.embeddings import (
    EmbeddingDecodeError,
    EmbeddingRecord,
    StoredColumns,
    StoredEmbedding,
    decode_embedding,
    encode_embedding,
    packed_vector,
    read_columns,
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


# -- many records at once ----------------------------------------------------------------


def records(n: int, dtype: str = "float16", dim: int = 3, model: str = "v2") -> list[bytes]:
    vectors = np.random.default_rng(n).standard_normal((n, dim)).astype(dtype)
    return [
        encode_embedding(EmbeddingRecord(v, model, "v1", 1_760_000_000_000 + i, 2**63 + i))
        for i, v in enumerate(vectors)
    ]


@pytest.mark.parametrize(("dtype", "dim"), [("float16", 3), ("float32", 5), ("float16", 0)])
def test_records_of_one_layout_read_as_columns_read_as_one_by_one(dtype: str, dim: int) -> None:
    raws = records(4, dtype, dim)
    columns = read_columns(raws)
    assert columns is not None
    one_by_one = [read_embedding(raw) for raw in raws]
    assert list(columns) == one_by_one
    assert [columns[i] for i in range(4)] == one_by_one
    assert (columns[-1], columns[1:3], columns[::-2]) == (
        one_by_one[-1],
        one_by_one[1:3],
        one_by_one[::-2],
    )
    assert (len(columns), columns.dim, columns.dtype) == (4, dim, dtype)
    assert (columns.model_version, columns.space_version) == ("v2", "v1")
    assert columns.packed() == columns.packed(dtype) == [r.packed for r in one_by_one]  # type: ignore[arg-type]
    for other in ("float16", "float32"):
        assert columns.packed(other) == [packed_vector(r.vector, other) for r in one_by_one]  # type: ignore[arg-type]
    assert columns.computed_at_ms.tolist() == [1_760_000_000_000 + i for i in range(4)]
    assert columns.feature_version.tolist() == [2**63 + i for i in range(4)]
    with pytest.raises(IndexError):
        columns[4]


def test_records_that_do_not_share_a_layout_are_not_read_as_columns() -> None:
    """Each of these differs from the others in one place where the layout is written
    (or is absent, or unreadable): they are read one by one, which says what is wrong."""
    raws = records(3)
    assert read_columns(raws) is not None
    assert read_columns([]) is None
    assert read_columns([*raws, None]) is None
    assert read_columns([*raws, records(1, model="v3")[0]]) is None  # same length, other name
    assert read_columns([*raws, records(1, dim=4)[0]]) is None  # longer
    for at, value in ((0, ord("Z")), (1, ord("Z")), (2, 7), (3, 2), (4, 9), (22, 3), (23, 1)):
        changed = bytearray(raws[1])
        changed[at] = value
        assert read_columns([raws[0], bytes(changed), raws[2]]) is None, at
        assert read_columns([bytes(changed), raws[0], raws[2]]) is None, at
    unreadable = raws[0][:24] + b"\xff" + raws[0][25:]  # the model name is not UTF-8
    assert read_columns([unreadable, unreadable]) is None


def test_records_that_differ_only_in_their_stamps_and_vectors_share_a_layout() -> None:
    raws = records(2)
    stamped = bytearray(raws[1])
    stamped[6:22] = bytes(range(16))  # feature_version, computed_at
    stamped[-1] ^= 0xFF  # the vector
    columns = read_columns([raws[0], bytes(stamped)])
    assert columns is not None and columns[1] == read_embedding(bytes(stamped))


layouts = st.tuples(
    st.sampled_from(["float16", "float32"]), st.integers(0, 4), st.sampled_from(["a", "b", "ab"])
)


@given(st.lists(st.tuples(layouts, st.booleans()), min_size=1, max_size=6))
def test_columns_are_always_what_one_by_one_reads(draws: list[tuple[tuple, bool]]) -> None:  # type: ignore[type-arg]
    """Whatever mix of layouts, missing and corrupted records: columns, when read at all,
    are the records read one by one; records of one layout are always read as columns."""
    raws: list[bytes | None] = []
    for (dtype, dim, model), broken in draws:
        (raw,) = records(1, dtype, dim, model)
        raws.append(raw[:3] + b"\x09" + raw[4:] if broken else raw)
    columns = read_columns(raws)
    if columns is not None:
        assert list(columns) == [read_embedding(raw) for raw in raws if raw is not None]
    layouts_seen = {layout for layout, _ in draws}
    if len(layouts_seen) == 1 and not any(broken for _, broken in draws):
        assert isinstance(columns, StoredColumns) and len(columns) == len(raws)


def test_columns_of_different_lengths_are_refused_when_read() -> None:
    """read_columns never builds them; a caller that does gets an error, not fewer records."""
    columns = read_columns(records(2))
    assert columns is not None
    for short in (
        dataclasses.replace(columns, computed_at_ms=columns.computed_at_ms[:1]),
        dataclasses.replace(columns, feature_version=columns.feature_version[:1]),
        dataclasses.replace(columns, vectors=columns.vectors[:1]),
    ):
        with pytest.raises(ValueError, match="zip"):
            list(short)
