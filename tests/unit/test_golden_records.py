"""Pinned bytes of the two stored records and of the id hash.

A round trip passes for any symmetric change of a layout (big-endian fields, swapped
fields, another hash byte order), yet every such change makes the records already in
Redis, and the buckets of every trained model, silently mean something else. These
literals were built once from the hand-chosen values below and frozen: a change that
makes them fail needs a new LAYOUT_VERSION (or a retrain), not a new literal.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest

from service.core.embeddings import (
    EmbeddingDecodeError,
    EmbeddingRecord,
    decode_embedding,
    encode_embedding,
)
from service.core.events import NUM_EVENT_TYPES, EventType
from service.core.features import (
    NUM_HALF_LIVES,
    VERSION_OFFSET,
    VERSION_SIZE,
    FeatureDecodeError,
    FeatureState,
    decode_features,
    encode_features,
    encoded_version,
    hash_id,
)
from tests.helpers import BASE_TS

HOUR = 3_600_000

# hash_id of the ids below: blake2b-64 of the decimal/UTF-8 text, read little-endian,
# mod 2^63-1, plus 1.
HASH_1 = 8518482412311870711
HASH_MOVIE_42 = 3284743916117874661
HASH_C1 = 5653263758500360260

FEATURE_RECORD = bytes.fromhex(
    "5546"  # magic "UF"
    "01"  # layout 1
    "08"  # 8 event types
    "03"  # 3 half-lives
    "00"  # reserved
    "0200"  # 2 events
    "0700000000000000"  # version 7
    "80ae63c899010000"  # last_event_ms BASE_TS + 1 h
    "03000000"  # partition 3
    "87d6120000000000"  # offset 1234567
    "f7fc42039fba3776"
    "e5d7543a30c1952d"  # item hashes: 1, "movie-42"
    "44f000a36f6d744e"
    "0000000000000000"  # category hashes: "c1", none
    "00c02cc899010000"
    "80ae63c899010000"  # timestamps BASE_TS, BASE_TS + 1 h
    "00"
    "02"  # types: view, like
    "0000003f"
    "0000403f"
    "0000603f"  # counters[view]: 0.5, 0.75, 0.875
    + "00000000"
    * 3  # click
    + "0000803f"
    "00000040"
    "00008040"  # like: 1, 2, 4
     + "00000000" * 3 * 5  # share .. hide
)

EMBEDDING_FLOAT16 = bytes.fromhex(
    "5545"  # magic "UE"
    "01"  # layout 1
    "01"  # dtype float16
    "0400"  # dim 4
    "0700000000000000"  # feature_version 7
    "7bc02cc899010000"  # computed_at_ms BASE_TS + 123
    "02"
    "02"  # len("m2"), len("m1")
    "6d32"
    "6d31"  # model "m2", space "m1"
    "003c"
    "00b8"
    "0034"
    "0040"  # 1.0, -0.5, 0.25, 2.0
)

EMBEDDING_FLOAT32 = bytes.fromhex(
    "55450102020007000000000000007bc02cc89901000002026d326d310000803f000000bf"  # 1.0, -0.5
)


def pinned_state() -> FeatureState:
    counters = np.zeros((NUM_EVENT_TYPES, NUM_HALF_LIVES), dtype=np.float32)
    counters[EventType.VIEW.code] = [0.5, 0.75, 0.875]
    counters[EventType.LIKE.code] = [1.0, 2.0, 4.0]
    return FeatureState(
        item_hashes=np.array([HASH_1, HASH_MOVIE_42], dtype=np.int64),
        category_hashes=np.array([HASH_C1, 0], dtype=np.int64),
        types=np.array([EventType.VIEW.code, EventType.LIKE.code], dtype=np.uint8),
        timestamps=np.array([BASE_TS, BASE_TS + HOUR], dtype=np.int64),
        counters=counters,
        last_event_ms=BASE_TS + HOUR,
        version=7,
        partition=3,
        offset=1_234_567,
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1, HASH_1),
        ("1", HASH_1),
        ("movie-42", HASH_MOVIE_42),
        ("c1", HASH_C1),
        (2**40, 8200540286402289720),
        ("é", 3394012004367669964),  # hashed as UTF-8
        (None, 0),
    ],
)
def test_hash_id_values_are_pinned(value: str | int | None, expected: int) -> None:
    assert hash_id(value) == expected


def test_the_pinned_feature_record_decodes_to_its_fields() -> None:
    decoded = decode_features(FEATURE_RECORD)
    state = pinned_state()
    for field in ("item_hashes", "category_hashes", "types", "timestamps", "counters"):
        assert getattr(decoded, field).tolist() == getattr(state, field).tolist(), field
        assert getattr(decoded, field).dtype == getattr(state, field).dtype, field
    assert decoded.counters.shape == (NUM_EVENT_TYPES, NUM_HALF_LIVES)
    assert (decoded.last_event_ms, decoded.version) == (BASE_TS + HOUR, 7)
    assert (decoded.partition, decoded.offset) == (3, 1_234_567)
    assert decoded.num_events == 2


def test_the_pinned_feature_state_encodes_to_the_pinned_bytes() -> None:
    assert encode_features(pinned_state()).hex() == FEATURE_RECORD.hex()
    assert encode_features(decode_features(FEATURE_RECORD)) == FEATURE_RECORD


def test_the_version_field_sits_where_the_store_compares_it() -> None:
    assert (VERSION_OFFSET, VERSION_SIZE) == (8, 8)
    assert FEATURE_RECORD[VERSION_OFFSET : VERSION_OFFSET + VERSION_SIZE] == encoded_version(7)
    assert encoded_version(7) == bytes.fromhex("0700000000000000")
    assert encoded_version(0) == b""


def test_the_empty_state_has_a_pinned_record() -> None:
    empty = encode_features(FeatureState.empty())
    assert empty.hex() == ("5546010803000000" + "00" * 16 + "ffffffff" + "ff" * 8 + "00000000" * 24)
    decoded = decode_features(empty)
    assert (decoded.version, decoded.partition, decoded.offset) == (0, -1, -1)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (FEATURE_RECORD + b"\x00", "feature record is 183 bytes, expected 182"),
        (FEATURE_RECORD[:-1], "feature record is 181 bytes, expected 182"),
        (FEATURE_RECORD[:35], r"feature record too short \(35 bytes\)"),
        (b"", r"feature record too short \(0 bytes\)"),
        (
            FEATURE_RECORD[:3] + b"\x07" + FEATURE_RECORD[4:],
            "counter shape 7x3 does not match this build",
        ),
        (
            FEATURE_RECORD[:4] + b"\x02" + FEATURE_RECORD[5:],
            "counter shape 8x2 does not match this build",
        ),
    ],
)
def test_feature_records_of_the_wrong_size_or_shape_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(FeatureDecodeError, match=f"^{message}$"):
        decode_features(data)


def test_the_shortest_feature_record_is_just_a_header_and_counters() -> None:
    header_only = FEATURE_RECORD[:6] + b"\x00\x00" + FEATURE_RECORD[8:36]
    counters = b"\x00" * 4 * NUM_EVENT_TYPES * NUM_HALF_LIVES
    decoded = decode_features(header_only + counters)
    assert decoded.num_events == 0 and decoded.version == 7


def test_a_big_endian_feature_header_does_not_read_as_the_same_fields() -> None:
    state = pinned_state()
    big = (
        struct.pack(">2sBBBBHQqiq", b"UF", 1, 8, 3, 0, 2, 7, BASE_TS + HOUR, 3, 1_234_567)
        + FEATURE_RECORD[36:]
    )
    assert big != FEATURE_RECORD
    with pytest.raises(FeatureDecodeError, match="expected"):  # 2 events read as 512
        decode_features(big)
    assert encode_features(state)[:36] != big[:36]


def test_the_pinned_embedding_records_decode_to_their_fields() -> None:
    half = decode_embedding(EMBEDDING_FLOAT16)
    assert half.vector.dtype == np.float16
    assert half.vector.tolist() == [1.0, -0.5, 0.25, 2.0]
    assert (half.model_version, half.space_version) == ("m2", "m1")
    assert (half.computed_at_ms, half.feature_version, half.dim) == (BASE_TS + 123, 7, 4)
    single = decode_embedding(EMBEDDING_FLOAT32)
    assert single.vector.dtype == np.float32
    assert single.vector.tolist() == [1.0, -0.5]
    assert (single.model_version, single.space_version) == ("m2", "m1")


def test_the_pinned_embedding_records_encode_to_the_pinned_bytes() -> None:
    for dtype, pinned, values in (
        (np.float16, EMBEDDING_FLOAT16, [1.0, -0.5, 0.25, 2.0]),
        (np.float32, EMBEDDING_FLOAT32, [1.0, -0.5]),
    ):
        record = EmbeddingRecord(np.array(values, dtype=dtype), "m2", "m1", BASE_TS + 123, 7)
        assert encode_embedding(record).hex() == pinned.hex()
        assert encode_embedding(decode_embedding(pinned)) == pinned


def test_long_version_strings_are_kept_up_to_255_bytes() -> None:
    model, space = "m" * 255, "s" * 255
    for lengths in ((255, 255), (255, 3), (3, 255)):
        record = EmbeddingRecord(np.zeros(2, np.float32), "m" * lengths[0], "s" * lengths[1], 0, 0)
        encoded = encode_embedding(record)
        assert encoded[22:24] == bytes(lengths)
        decoded = decode_embedding(encoded)
        assert (decoded.model_version, decoded.space_version) == (
            record.model_version,
            record.space_version,
        )
    for too_long in ((model + "m", "s"), ("m", space + "s"), (model + "m", space + "s")):
        with pytest.raises(
            ValueError, match=r"^model and space versions are limited to 255 bytes$"
        ):
            encode_embedding(EmbeddingRecord(np.zeros(2, np.float32), *too_long, 0, 0))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (EMBEDDING_FLOAT16 + b"\x00", "embedding record is 37 bytes, expected 36"),
        (EMBEDDING_FLOAT16[:-1], "embedding record is 35 bytes, expected 36"),
        (EMBEDDING_FLOAT16[:23], r"embedding record too short \(23 bytes\)"),
        (EMBEDDING_FLOAT32 + b"\x00\x00", "embedding record is 38 bytes, expected 36"),
        (EMBEDDING_FLOAT16[:24], "embedding record is 24 bytes, expected 36"),
        (EMBEDDING_FLOAT16[:3] + b"\x00" + EMBEDDING_FLOAT16[4:], "unknown embedding dtype code 0"),
        (EMBEDDING_FLOAT16[:3] + b"\x03" + EMBEDDING_FLOAT16[4:], "unknown embedding dtype code 3"),
    ],
)
def test_embedding_records_of_the_wrong_size_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(EmbeddingDecodeError, match=f"^{message}$"):
        decode_embedding(data)


def test_a_big_endian_embedding_header_does_not_read_as_the_same_fields() -> None:
    big = struct.pack(">2sBBHQqBB", b"UE", 1, 1, 4, 7, BASE_TS + 123, 2, 2) + EMBEDDING_FLOAT16[24:]
    assert big != EMBEDDING_FLOAT16
    with pytest.raises(EmbeddingDecodeError, match="expected"):  # dim 4 read as 1024
        decode_embedding(big)
