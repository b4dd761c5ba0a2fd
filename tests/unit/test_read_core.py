"""The pieces of the read path without a front end: the coalescer, the hot-user cache,
the reader's cache use and the cold start's space."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
from collections.abc import Sequence
from typing import Any, get_args

import numpy as np
import pytest
from prometheus_client import REGISTRY

from service.api import reads
from service.api.coalescer import ReadCoalescer
from service.api.cold_start import ColdStart
from service.api.hot_cache import HotCache
from service.api.reads import (
    Answer,
    AnswerColumns,
    EmbeddingReader,
    ReadError,
    Status,
    check_user_id,
    check_user_ids,
    max_request_bytes,
    parse_encoding,
    parse_model,
    parse_models,
    parse_pin,
    parse_pins,
)
from service.api.refresh import RefreshRequester
from service.core.embeddings import EmbeddingRecord, StoredEmbedding
from service.core.events import USER_ID_RULE
from service.core.model_names import DEFAULT_MODEL
from service.settings import Settings
from service.store.memory import MemoryStore
from service.store.protocol import StoreMisconfigured, StoreUnavailable
from service.store.records import COLUMNS_FROM
from tests.helpers import BASE_TS


def record(space: str = "m1", at: int = BASE_TS) -> EmbeddingRecord:
    return EmbeddingRecord(np.ones(4, dtype=np.float16), "m1", space, at, 1)


async def test_concurrent_gets_share_one_fetch() -> None:
    calls: list[list[str]] = []

    async def fetch(keys: Sequence[str]) -> list[str]:
        calls.append(list(keys))
        await asyncio.sleep(0)
        return [k.upper() for k in keys]

    coalescer = ReadCoalescer(fetch)
    assert await asyncio.gather(*(coalescer.get(k) for k in "abcab")) == list("ABCAB")
    assert calls == [list("abcab")]
    assert await coalescer.get("z") == "Z"
    assert len(calls) == 2


async def test_a_full_batch_is_fetched_at_once_and_errors_reach_every_caller() -> None:
    calls: list[int] = []

    async def fetch(keys: Sequence[str]) -> list[str]:
        calls.append(len(keys))
        if "bad" in keys:
            raise StoreUnavailable("down")
        return list(keys)

    coalescer = ReadCoalescer(fetch, max_batch=2)
    assert await asyncio.gather(*(coalescer.get(str(i)) for i in range(5))) == list("01234")
    assert calls == [2, 2, 1]
    results = await asyncio.gather(coalescer.get("bad"), coalescer.get("x"), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailable) for r in results)


def test_hot_cache_expires_evicts_and_counts() -> None:
    now = [0.0]
    cache = HotCache(ttl_ms=100, max_users=2, monotonic_ms=lambda: now[0])
    cache.put_many([("a", record()), ("b", record())])
    assert [r is not None for r in cache.get_many(["a", "b", "c"])] == [True, True, False]
    cache.put_many([("c", record())])  # evicts the oldest insertion, a
    assert [r is not None for r in cache.get_many(["a", "b", "c"])] == [False, True, True]
    now[0] = 100.0
    assert cache.get_many(["b", "c"]) == [None, None]
    assert (cache.hits, cache.misses) == (4, 4)
    assert cache.hit_rate == pytest.approx(0.5)
    with pytest.raises(ValueError):
        HotCache(ttl_ms=0, max_users=1)


async def test_reader_serves_hot_users_from_the_cache() -> None:
    store = MemoryStore()
    await store.put_embeddings({"u1": record()})
    cache = HotCache(ttl_ms=60_000, max_users=10)
    reader = EmbeddingReader(
        store,
        lambda: None,
        RefreshRequester(store, 1000, clock=lambda: BASE_TS),
        refresh_after_ms=60_000,
        cache=cache,
        clock=lambda: BASE_TS,
    )
    assert (await reader.get("u1")).status == "fresh"
    await store.put_embeddings({"u1": record(space="m2")})
    assert (await reader.get("u1")).space_version == "m1"  # cached copy within the TTL
    answers = await reader.batch_get(["u1", "u2"])
    assert [a.status for a in answers] == ["fresh", "not_found"]
    assert (cache.hits, cache.misses) == (2, 2)


async def test_a_store_that_does_not_answer_is_a_read_error_not_a_hang() -> None:
    class StuckStore(MemoryStore):
        async def get_embeddings(
            self, user_ids: Sequence[str], model: str = DEFAULT_MODEL, *, columns: bool = False
        ) -> list[EmbeddingRecord | None]:
            await asyncio.Event().wait()
            raise AssertionError("unreachable")

    store = StuckStore()
    reader = EmbeddingReader(
        store, lambda: None, RefreshRequester(store, 1000), refresh_after_ms=1, timeout_ms=20
    )
    for read in (reader.get("u1"), reader.batch_get(["u1", "u2"])):
        with pytest.raises(ReadError) as caught:
            await read
        assert caught.value.code == "store_unavailable"
        assert caught.value.retry_after_s == 1
        assert "did not answer within 20 ms" in caught.value.message


def test_cold_start_is_mapped_into_the_served_space() -> None:
    class Manifest:
        version = "m2"
        cold_start_embedding = (1.0, 0.0)

    swap = np.array([[0.0, 1.0], [1.0, 0.0]], dtype=np.float32)
    cold = ColdStart.from_manifest(Manifest(), "m1", swap)  # type: ignore[arg-type]
    assert (cold.model_version, cold.space_version) == ("m2", "m1")
    assert cold.vector.tolist() == [0.0, 1.0]
    assert ColdStart(np.zeros(2, dtype=np.float32), "m3").space_version == "m3"


# -- the read semantics, exactly ----------------------------------------------------------

REFRESH_AFTER_MS = 60_000
COLD = ColdStart(np.array([0.5, -0.5], dtype=np.float32), "m2", "m1")


class Refreshes:
    """A refresher that records what the reader asked to refresh."""

    def __init__(self) -> None:
        self.requested: list[list[str]] = []
        self.ran_until: asyncio.Event | None = None

    def request(self, user_ids: Sequence[str]) -> int:
        self.requested.append(list(user_ids))
        return len(user_ids)

    async def run(self, stop: asyncio.Event) -> None:
        self.ran_until = stop


def metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


STALENESS_COUNT = "userembed_api_served_staleness_seconds_count"
STALENESS_SUM = "userembed_api_served_staleness_seconds_sum"


def served(status: str, model: str = DEFAULT_MODEL) -> float:
    return metric("userembed_api_embeddings_served_total", {"model": model, "status": status})


def reader_for(
    store: MemoryStore,
    refreshes: Refreshes,
    cold: ColdStart | None = COLD,
    cold_calls: list[int] | None = None,
    **options: Any,
) -> EmbeddingReader:
    def cold_start() -> ColdStart | None:
        if cold_calls is not None:
            cold_calls.append(1)
        return cold

    return EmbeddingReader(
        store,
        cold_start,
        refreshes,  # type: ignore[arg-type]  # duck-typed RefreshRequester
        **{"refresh_after_ms": REFRESH_AFTER_MS, "clock": lambda: BASE_TS, **options},
    )


async def test_the_fresh_stale_boundary_is_the_refresh_age_itself() -> None:
    store, refreshes = MemoryStore(), Refreshes()
    await store.put_embeddings(
        {
            "edge": record(at=BASE_TS - REFRESH_AFTER_MS),
            "over": record(at=BASE_TS - REFRESH_AFTER_MS - 1),
            "future": record(at=BASE_TS + 5),
        }
    )
    answers = await reader_for(store, refreshes).batch_get(["edge", "over", "future"])
    assert [a.status for a in answers] == ["fresh", "stale", "fresh"]
    assert [a.staleness_ms for a in answers] == [REFRESH_AFTER_MS, REFRESH_AFTER_MS + 1, 0]
    assert refreshes.requested == [["over"]]


async def test_a_fresh_answer_carries_the_records_provenance() -> None:
    store, refreshes = MemoryStore(), Refreshes()
    stored = EmbeddingRecord(np.array([1.0, 2.0], np.float16), "m2", "m1", BASE_TS - 10, 9)
    await store.put_embeddings({"u1": stored})
    before = served("fresh")
    answer = await reader_for(store, refreshes).get("u1")
    assert answer.vector is not None and answer.vector.tolist() == [1.0, 2.0]
    assert (answer.user_id, answer.status, answer.model_version, answer.space_version) == (
        "u1",
        "fresh",
        "m2",
        "m1",
    )
    assert (answer.computed_at, answer.feature_version, answer.staleness_ms) == (
        BASE_TS - 10,
        9,
        10,
    )
    assert answer.dim == 2
    assert refreshes.requested == []
    assert served("fresh") - before == 1


async def test_a_pin_serves_its_space_and_refuses_another() -> None:
    store, refreshes = MemoryStore(), Refreshes()
    await store.put_embeddings({"u1": record(space="m1"), "old": record(at=BASE_TS - 10**6)})
    reader = reader_for(store, refreshes)
    assert (await reader.get("u1", pin="m1")).status == "fresh"
    (other,) = await reader.batch_get(["u1"], pin="m9")
    assert (other.status, other.vector, other.space_version) == ("version_mismatch", None, "m1")
    assert (other.model_version, other.staleness_ms, other.feature_version) == ("m1", 0, 1)
    with pytest.raises(ReadError) as caught:
        await reader.get("u1", pin="m9")
    assert caught.value.code == "version_mismatch"
    assert caught.value.message == (
        "the embedding of 'u1' is in space 'm1' (model 'm1'), not the requested 'm9'"
    )
    # a stale record in another space is still refreshed
    (old,) = await reader.batch_get(["old"], pin="m9")
    assert old.status == "version_mismatch"
    assert refreshes.requested == [["old"]]


async def test_a_missing_user_gets_the_cold_start_in_its_space_and_a_refresh() -> None:
    store, refreshes = MemoryStore(), Refreshes()
    reader = reader_for(store, refreshes)
    before = served("cold_start")
    answer = await reader.get("u9")
    assert (answer.user_id, answer.status) == ("u9", "cold_start")
    assert answer.vector is not None and answer.vector.tolist() == [0.5, -0.5]
    assert (answer.model_version, answer.space_version) == ("m2", "m1")
    assert (answer.computed_at, answer.feature_version, answer.staleness_ms) == (None, None, None)
    assert refreshes.requested == [["u9"]]
    assert served("cold_start") - before == 1
    assert (await reader.get("u9", pin="m1")).status == "cold_start"
    (mismatch,) = await reader.batch_get(["u9"], pin="m2")  # the model's own name, not its space
    assert (mismatch.user_id, mismatch.status, mismatch.vector) == ("u9", "not_found", None)
    assert (mismatch.model_version, mismatch.space_version) == (None, None)
    with pytest.raises(ReadError) as caught:
        await reader.get("u9", pin="m2")
    assert (caught.value.code, caught.value.message) == (
        "not_found",
        "no embedding of 'u9' in space 'm2' yet; a refresh was requested",
    )


async def test_without_a_cold_start_a_missing_user_is_not_found() -> None:
    store, refreshes = MemoryStore(), Refreshes()
    calls: list[int] = []
    reader = reader_for(store, refreshes, cold_start_404=True, cold_calls=calls)
    with pytest.raises(ReadError) as caught:
        await reader.get("u9")
    assert (caught.value.code, caught.value.message) == (
        "not_found",
        "no embedding of 'u9' yet; a refresh was requested",
    )
    assert calls == []  # the 404 mode does not even look at the model
    assert refreshes.requested == [["u9"]]
    no_model = reader_for(store, Refreshes(), cold=None)
    assert [a.status for a in await no_model.batch_get(["a", "b"])] == ["not_found"] * 2


def test_valid_ids_are_checked_in_one_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    checked: list[str] = []
    monkeypatch.setattr(reads, "check_user_id", checked.append)
    valid = ["a", "B.c:d@e-f_9", "x" * 128]
    check_user_ids(valid)
    check_user_ids(valid[:1])
    assert checked == []  # none checked one by one
    for ids in (["a", "b c"], ["a", "x" * 129], ["a", "b\nc"], ["a\nb"], [""], []):
        checked.clear()
        check_user_ids(ids)
        assert checked == ids  # an invalid batch is checked one by one, for the reason


async def test_batches_are_bounded_and_every_id_checked() -> None:
    store, refreshes = MemoryStore(), Refreshes()
    reader = reader_for(store, refreshes, max_batch=2)
    assert len(await reader.batch_get(["a", "b"])) == 2
    with pytest.raises(ReadError) as caught:
        await reader.batch_get(["a", "b", "c"])
    assert (caught.value.code, caught.value.message) == (
        "batch_too_large",
        "3 user_ids requested; at most 2 per call",
    )
    for read in (reader.batch_get(["a", "b c"]), reader.get("b c")):
        with pytest.raises(ReadError) as bad:
            await read
        assert bad.value.code == "invalid_user_id"
        assert bad.value.message == "invalid user_id 'b c': only [A-Za-z0-9_.:@-], 1..128 chars"
    assert check_user_id("ok:1") == "ok:1"
    assert await reader.batch_get([]) == []
    # one id holding a newline reads as two valid lines: the line count tells it apart
    for ids, bad_id in ((["a", "b\nc"], "b\nc"), (["a\nb"], "a\nb"), (["a", ""], "")):
        with pytest.raises(ReadError) as bad:
            await reader.batch_get(ids)
        assert bad.value.message == f"invalid user_id {bad_id!r}: {USER_ID_RULE}"
    assert refreshes.requested == [["a", "b"]]


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (
            StoreUnavailable("connection refused"),
            "store_unavailable",
            "connection refused; retry shortly",
        ),
        (StoreMisconfigured("use redis+cluster://"), "store_misconfigured", "use redis+cluster://"),
    ],
)
async def test_store_failures_are_read_errors_with_a_retry_after(
    error: Exception, code: str, message: str
) -> None:
    class FailingStore(MemoryStore):
        async def get_embeddings(
            self, user_ids: Sequence[str], model: str = DEFAULT_MODEL, *, columns: bool = False
        ) -> list[EmbeddingRecord | None]:
            raise error

    reader = reader_for(FailingStore(), Refreshes(), retry_after_s=7)
    before = metric("userembed_api_store_errors_total")
    with pytest.raises(ReadError) as caught:
        await reader.batch_get(["u1"])
    assert (caught.value.code, caught.value.message, caught.value.retry_after_s) == (
        code,
        message,
        7,
    )
    assert metric("userembed_api_store_errors_total") - before == 1


async def test_served_staleness_is_sampled_from_stored_answers_only() -> None:
    store = MemoryStore()
    await store.put_embeddings({f"u{i}": record(at=BASE_TS - 1000 * i) for i in range(40)})
    reader = reader_for(store, Refreshes(), refresh_after_ms=10**9)
    count, total = (
        "userembed_api_served_staleness_seconds_count",
        "userembed_api_served_staleness_seconds_sum",
    )
    before = (metric(count), metric(total), served("fresh"), served("cold_start"))
    await reader.batch_get([f"u{i}" for i in range(40)])  # every 40 // 16 = 2nd answer
    assert metric(count) - before[0] == 20
    assert metric(total) - before[1] == pytest.approx(sum(range(0, 40, 2)))
    assert served("fresh") - before[2] == 40
    await reader.batch_get(["u3", "u5", "nobody"])  # short batch: all, cold start excluded
    assert metric(count) - before[0] == 22
    assert metric(total) - before[1] == pytest.approx(sum(range(0, 40, 2)) + 8)
    assert served("cold_start") - before[3] == 1


async def test_the_reader_runs_its_refresher() -> None:
    refreshes, stop = Refreshes(), asyncio.Event()
    await reader_for(MemoryStore(), refreshes).run(stop)
    assert refreshes.ran_until is stop


async def test_the_reader_from_settings_uses_every_setting() -> None:
    now = [BASE_TS]
    store = MemoryStore()
    settings = Settings(
        refresh_after_s=2,
        refresh_coalesce_s=2,
        refresh_max_rate=2,
        batch_get_max_ids=3,
        api_retry_after_s=4,
        api_read_timeout_ms=250,
        hot_cache_ttl_ms=500,
        hot_cache_max_users=7,
    )
    reader = EmbeddingReader.from_settings(store, settings, lambda: COLD, clock=lambda: now[0])
    assert reader.max_batch == 3
    assert reader.cache is not None
    await store.put_embeddings({"a": record(at=BASE_TS - 2000), "b": record(at=BASE_TS - 2001)})
    answers = await reader.batch_get(["a", "b", "new"])
    assert [a.status for a in answers] == ["fresh", "stale", "cold_start"]
    assert reader.cache.misses == 3
    # the refresher: this store, this clock, 2 tokens, coalescing for 2 s
    assert reader.refresher.request(["x"]) == 0  # both tokens taken by b and new
    assert await reader.refresher.flush() == 2
    assert sorted(await store.pop_dirty(10)) == [("b", BASE_TS), ("new", BASE_TS)]
    now[0] = BASE_TS + 1999
    assert reader.refresher.request(["b"]) == 0
    now[0] = BASE_TS + 2000
    assert reader.refresher.request(["b"]) == 1

    class FailingStore(MemoryStore):
        async def get_embeddings(
            self, user_ids: Sequence[str], model: str = DEFAULT_MODEL, *, columns: bool = False
        ) -> list[EmbeddingRecord | None]:
            raise TimeoutError

    failing = EmbeddingReader.from_settings(FailingStore(), settings, lambda: None)
    with pytest.raises(ReadError) as caught:
        await failing.get("u1")
    assert (caught.value.message, caught.value.retry_after_s) == (
        "store did not answer within 250 ms; retry shortly",
        4,
    )
    strict = EmbeddingReader.from_settings(
        store, Settings(cold_start_404=True), lambda: COLD, clock=lambda: BASE_TS
    )
    assert [a.status for a in await strict.batch_get(["new"])] == ["not_found"]
    assert EmbeddingReader.from_settings(store, Settings(), lambda: None).cache is None


async def test_the_default_bounds_of_a_reader() -> None:
    class TimingOut(MemoryStore):
        async def get_embeddings(
            self, user_ids: Sequence[str], model: str = DEFAULT_MODEL, *, columns: bool = False
        ) -> list[EmbeddingRecord | None]:
            raise TimeoutError

    reader = EmbeddingReader(TimingOut(), lambda: None, Refreshes(), refresh_after_ms=1)  # type: ignore[arg-type]
    with pytest.raises(ReadError) as slow:
        await reader.batch_get(["u1"])
    assert slow.value.message == "store did not answer within 1000 ms; retry shortly"
    assert str(slow.value) == slow.value.message
    with pytest.raises(ReadError) as large:
        await reader.batch_get([f"u{i}" for i in range(1001)])
    assert large.value.message == "1001 user_ids requested; at most 1000 per call"


async def test_the_cache_keeps_only_found_records() -> None:
    store = MemoryStore()
    await store.put_embeddings({"u1": record(space="m1")})
    cache = HotCache(ttl_ms=60_000, max_users=10)
    reader = reader_for(store, Refreshes(), cache=cache)
    first = await reader.batch_get(["u1", "u2"])
    assert [(a.user_id, a.status) for a in first] == [("u1", "fresh"), ("u2", "cold_start")]
    await store.put_embeddings({"u1": record(space="m2"), "u2": record(space="m2")})
    again = await reader.batch_get(["u1", "u2"])
    assert [a.space_version for a in again] == ["m1", "m2"]  # u1 cached, u2 was not
    assert (cache.hits, cache.misses) == (1, 3)


def test_request_parsing() -> None:
    assert parse_encoding("base64_float16") == "base64_float16"
    with pytest.raises(ReadError) as caught:
        parse_encoding("xml")
    assert (caught.value.code, caught.value.message) == (
        "invalid_encoding",
        "unknown encoding 'xml': use one of json, base64_float16, base64_float32",
    )
    assert parse_pin(None) is None and parse_pin("") is None
    assert parse_pin("sum-2.1") == "sum-2.1"
    with pytest.raises(ReadError) as pin:
        parse_pin("no spaces")
    assert pin.value.code == "invalid_model_version"
    assert "invalid model version 'no spaces'" in pin.value.message
    assert max_request_bytes(Settings(api_max_body_bytes=10**6, batch_get_max_ids=10)) == 10**6
    assert max_request_bytes(Settings(api_max_body_bytes=1024, batch_get_max_ids=10)) == 5120


def test_answers_encode_their_vector_for_each_wire_form() -> None:
    answer = Answer("u1", "fresh", bytes.fromhex("003c00c0"), "float16", "m1", "m1")
    assert answer.dim == 2
    assert answer.vector is not None and answer.vector.tolist() == [1.0, -2.0]
    as_json = answer.encoded("json")
    assert isinstance(as_json, np.ndarray) and as_json.dtype == np.float32
    assert as_json.tolist() == [1.0, -2.0]
    assert answer.encoded("base64_float16") == base64.b64encode(bytes.fromhex("003c00c0")).decode()
    assert (
        answer.encoded("base64_float32")
        == base64.b64encode(bytes.fromhex("0000803f000000c0")).decode()
    )
    assert answer.packed("float16") == bytes.fromhex("003c00c0")
    assert answer.packed("float32") == bytes.fromhex("0000803f000000c0")
    as_float32 = Answer("u1", "fresh", bytes.fromhex("0000803f000000c0"), "float32", "m", "m")
    assert as_float32.dim == 2
    assert as_float32.packed("float16") == bytes.fromhex("003c00c0")
    assert as_float32.encoded("base64_float16") == answer.encoded("base64_float16")
    empty = Answer("u1", "not_found", None, "float32", None, None)
    assert (empty.encoded("json"), empty.packed("float32"), empty.dim) == (None, b"", None)
    assert empty.vector is None


async def test_a_store_answering_too_few_records_is_an_error_not_a_short_answer() -> None:
    class ShortStore(MemoryStore):
        async def get_embeddings(
            self, user_ids: Sequence[str], model: str = DEFAULT_MODEL, *, columns: bool = False
        ) -> list[EmbeddingRecord | None]:
            return (await super().get_embeddings(user_ids, model, columns=columns))[:-1]

    for cache in (None, HotCache(ttl_ms=60_000, max_users=10)):
        reader = reader_for(ShortStore(), Refreshes(), cache=cache)
        with pytest.raises(ValueError, match="zip"):
            await reader.batch_get(["u1", "u2"])


class OneByOneStore(MemoryStore):
    """Reads every record one by one (never as columns): the reference of the columns."""

    async def get_embeddings(
        self, user_ids: Sequence[str], model: str = DEFAULT_MODEL, *, columns: bool = False
    ) -> list[StoredEmbedding | None]:
        return list(await super().get_embeddings(user_ids, model))


def batch_records(n: int) -> dict[str, EmbeddingRecord]:
    """``n`` users on both sides of the refresh age, one in the future."""
    vectors = np.random.default_rng(n).standard_normal((n, 3)).astype(np.float16)
    ages = [REFRESH_AFTER_MS + 2 - i for i in range(n - 1)] + [-5]
    return {
        f"u{i}": EmbeddingRecord(v, "m2", "m1", BASE_TS - age, i)
        for i, (v, age) in enumerate(zip(vectors, ages, strict=True))
    }


async def test_a_batch_of_one_layout_is_answered_as_columns_as_one_by_one() -> None:
    """Fresh and stale users, refreshes, counters and sampled staleness: the same whether
    the batch is answered as columns or user by user."""
    users = batch_records(COLUMNS_FROM + 2)
    outcomes = []
    for store in (MemoryStore(), OneByOneStore()):
        await store.put_embeddings(users)
        refreshes = Refreshes()
        before = (served("fresh"), served("stale"), metric(STALENESS_COUNT), metric(STALENESS_SUM))
        answers = await reader_for(store, refreshes).batch_get(list(users))
        after = (served("fresh"), served("stale"), metric(STALENESS_COUNT), metric(STALENESS_SUM))
        counted = [b - a for a, b in zip(before, after, strict=True)]
        outcomes.append((answers, list(answers), refreshes.requested, counted))
    (columns, as_list, refreshed, counted), (one_by_one, expected, *reference) = outcomes
    assert isinstance(columns, AnswerColumns) and not isinstance(one_by_one, AnswerColumns)
    assert as_list == expected
    assert [a.status for a in expected] == ["stale", "stale"] + ["fresh"] * COLUMNS_FROM
    assert refreshed == reference[0] and counted == pytest.approx(reference[1])
    assert counted[:3] == [COLUMNS_FROM, 2, COLUMNS_FROM + 2]  # every answer sampled
    assert len(columns) == len(expected)
    assert [columns[i] for i in range(len(columns))] == expected
    assert (columns[-1], columns[2:5], columns[::-3]) == (
        expected[-1],
        expected[2:5],
        expected[::-3],
    )
    with pytest.raises(IndexError):
        columns[len(columns)]


async def test_a_batch_is_answered_user_by_user_unless_every_record_can_be_served_as_is() -> None:
    store = MemoryStore()
    users = batch_records(COLUMNS_FROM)
    await store.put_embeddings(users)
    reader = reader_for(store, Refreshes())
    assert isinstance(await reader.batch_get(list(users)), AnswerColumns)
    assert isinstance(await reader.batch_get(list(users), "m1"), AnswerColumns)  # its space
    named = await reader.batch_get(list(users), models=["default"])
    assert isinstance(named, AnswerColumns) and named[0].model == "default"
    for answers in (
        await reader.batch_get(list(users)[1:]),  # too few to read as columns
        await reader.batch_get([*users, "nobody"]),  # a cold start
        await reader.batch_get(list(users), "m0"),  # another space
    ):
        assert not isinstance(answers, AnswerColumns)
    mismatched = await reader.batch_get(list(users), "m0")
    assert {a.status for a in mismatched} == {"version_mismatch"}
    cached = reader_for(store, Refreshes(), cache=HotCache(ttl_ms=60_000, max_users=100))
    assert not isinstance(await cached.batch_get(list(users)), AnswerColumns)


async def test_answer_columns_of_different_lengths_are_refused_when_read() -> None:
    store = MemoryStore()
    users = batch_records(COLUMNS_FROM)
    await store.put_embeddings(users)
    answers = await reader_for(store, Refreshes()).batch_get(list(users))
    assert isinstance(answers, AnswerColumns)
    for short in (
        dataclasses.replace(answers, user_ids=answers.user_ids[1:]),
        dataclasses.replace(answers, stale=answers.stale[1:]),
        dataclasses.replace(answers, staleness_ms=answers.staleness_ms[1:]),
    ):
        with pytest.raises(ValueError, match="zip"):
            list(short)
    with pytest.raises(ValueError, match="zip"):  # a front end's vectors, one too few
        list(answers.rows(answers.records.packed()[1:]))
    assert list(answers.rows(answers.records.packed())) == [
        (a.user_id, a.status == "stale", a.data, a.computed_at, a.feature_version, a.staleness_ms)
        for a in answers
    ]


class ColumnsAsked(MemoryStore):
    """Records whether each read asked for columns."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[bool] = []

    async def get_embeddings(
        self, user_ids: Sequence[str], model: str = DEFAULT_MODEL, *, columns: bool = False
    ) -> Sequence[StoredEmbedding | None]:
        self.asked.append(columns)
        return await super().get_embeddings(user_ids, model, columns=columns)


async def test_only_a_batch_read_without_a_cache_asks_for_columns() -> None:
    """Coalesced single reads hand out each record: columns would cost more there."""
    store = ColumnsAsked()
    users = batch_records(COLUMNS_FROM)
    await store.put_embeddings(users)
    reader = reader_for(store, Refreshes())
    await reader.batch_get(list(users))
    answers = await asyncio.gather(*(reader.get(user) for user in users))
    assert store.asked == [True, False] and {a.status for a in answers} == {"fresh", "stale"}
    cached = reader_for(store, Refreshes(), cache=HotCache(ttl_ms=60_000, max_users=100))
    assert not isinstance(await cached.batch_get(list(users)), AnswerColumns)
    assert store.asked == [True, False, False]


class ShortColumnsStore(MemoryStore):
    """Answers one record too few, read as columns."""

    async def get_embeddings(
        self, user_ids: Sequence[str], model: str = DEFAULT_MODEL, *, columns: bool = False
    ) -> Sequence[StoredEmbedding | None]:
        return await super().get_embeddings(user_ids[:-1], model, columns=columns)


async def test_columns_of_the_wrong_length_are_an_error_not_a_short_answer() -> None:
    store = ShortColumnsStore()
    users = batch_records(COLUMNS_FROM + 1)
    await store.put_embeddings(users)
    with pytest.raises(ValueError, match="zip"):
        await reader_for(store, Refreshes()).batch_get(list(users))


# -- several models --------------------------------------------------------------------

CLICKS_COLD = ColdStart(np.array([1.0, 2.0, 3.0], dtype=np.float32), "c2", "c1")


class Models:
    """Served models with a cold start each; counts how often the served set is read."""

    def __init__(
        self,
        served: Sequence[str] = ("default", "clicks"),
        colds: dict[str, ColdStart] | None = None,
    ) -> None:
        self._served = tuple(served)
        self._colds = {"default": COLD, "clicks": CLICKS_COLD} if colds is None else colds
        self.served_calls = 0

    def served(self) -> Sequence[str]:
        self.served_calls += 1
        return self._served

    def cold_start(self, model: str) -> ColdStart | None:
        return self._colds.get(model)

    def states(self) -> list[Any]:
        return []


class RecordingStore(MemoryStore):
    """Records every embedding read: (method, user ids, model or models)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[str, list[str], Any]] = []

    async def get_embeddings(
        self, user_ids: Sequence[str], model: str = DEFAULT_MODEL, *, columns: bool = False
    ) -> list[EmbeddingRecord | None]:
        self.reads.append(("one", list(user_ids), model))
        return await super().get_embeddings(user_ids, model, columns=columns)

    async def get_model_embeddings(
        self, user_ids: Sequence[str], models: Sequence[str]
    ) -> list[list[EmbeddingRecord | None]]:
        self.reads.append(("many", list(user_ids), list(models)))
        return [await MemoryStore.get_embeddings(self, user_ids, m) for m in models]


def clicks_record(space: str = "c1", at: int = BASE_TS) -> EmbeddingRecord:
    return EmbeddingRecord(np.full(3, 0.25, dtype=np.float16), "c1", space, at, 2)


def models_reader(store: MemoryStore, refreshes: Refreshes, **options: Any) -> EmbeddingReader:
    models = options.pop("models", None) or Models()
    return EmbeddingReader(
        store,
        models,
        refreshes,  # type: ignore[arg-type]  # duck-typed RefreshRequester
        **{"refresh_after_ms": REFRESH_AFTER_MS, "clock": lambda: BASE_TS, **options},
    )


def test_model_request_parsing() -> None:
    assert parse_model(None) == "default" and parse_model("") == "default"
    assert parse_model("clicks-2_b") == "clicks-2_b"
    with pytest.raises(ReadError) as bad:
        parse_model("no.dots")
    assert (bad.value.code, bad.value.message) == (
        "invalid_model",
        "invalid model name 'no.dots': letters, digits, '_' and '-', up to 32 characters, "
        "starting with a letter or digit",
    )
    assert parse_models(["clicks", "default"]) == ("clicks", "default")
    with pytest.raises(ReadError) as empty:
        parse_models([])
    assert (empty.value.code, empty.value.message) == (
        "invalid_request",
        "models is empty: name at least one model, or omit it",
    )
    with pytest.raises(ReadError) as twice:
        parse_models(["clicks", "default", "clicks"])
    assert (twice.value.code, twice.value.message) == (
        "invalid_request",
        "models names a model more than once: ['clicks', 'default', 'clicks']",
    )
    with pytest.raises(ReadError) as blank:
        parse_models(["clicks", ""])  # in a list, "" is no name (not the default model)
    assert blank.value.code == "invalid_model"
    assert blank.value.message.startswith("invalid model name ''")
    assert parse_pins({"clicks": "c-1.2", "default": ""}) == {"clicks": "c-1.2"}
    assert parse_pins({}) == {}
    for pins, code in (
        ({"no way": "v1"}, "invalid_model"),
        ({"x": "no way"}, "invalid_model_version"),
    ):
        with pytest.raises(ReadError) as wrong:
            parse_pins(pins)
        assert wrong.value.code == code


async def test_a_named_model_is_read_from_its_own_records() -> None:
    store, refreshes = RecordingStore(), Refreshes()
    await store.put_embeddings({"u1": record()})
    await store.put_embeddings({"u1": clicks_record(at=BASE_TS - 5)}, "clicks")
    reader = models_reader(store, refreshes)
    default = await reader.get("u1")
    clicks = await reader.get("u1", model="clicks")
    assert (default.model, default.space_version, default.dim) == ("default", "m1", 4)
    assert (clicks.user_id, clicks.status, clicks.model) == ("u1", "fresh", "clicks")
    assert (clicks.model_version, clicks.space_version, clicks.dim) == ("c1", "c1", 3)
    assert (clicks.computed_at, clicks.feature_version, clicks.staleness_ms) == (BASE_TS - 5, 2, 5)
    assert store.reads == [("one", ["u1"], "default"), ("one", ["u1"], "clicks")]
    assert refreshes.requested == []


async def test_concurrent_single_reads_share_one_store_read_per_model() -> None:
    store = RecordingStore()
    reader = models_reader(store, Refreshes())
    reads = (
        reader.get("u1"),
        reader.get("u1", model="clicks"),
        reader.get("u2"),
        reader.get("u3", model="clicks"),
    )
    answers = await asyncio.gather(*reads)
    assert [(a.user_id, a.model, a.status) for a in answers] == [
        ("u1", "default", "cold_start"),
        ("u1", "clicks", "cold_start"),
        ("u2", "default", "cold_start"),
        ("u3", "clicks", "cold_start"),
    ]
    assert store.reads == [("one", ["u1", "u2"], "default"), ("one", ["u1", "u3"], "clicks")]
    await asyncio.gather(reader.get("u4", model="clicks"), reader.get("u5", model="clicks"))
    assert store.reads[2:] == [("one", ["u4", "u5"], "clicks")]


async def test_each_model_has_its_cold_start_and_its_messages() -> None:
    store, refreshes = MemoryStore(), Refreshes()
    await store.put_embeddings({"u1": clicks_record(space="c0")}, "clicks")
    reader = models_reader(store, refreshes)
    cold = await reader.get("u9", model="clicks")
    assert (cold.status, cold.model, cold.model_version, cold.space_version) == (
        "cold_start",
        "clicks",
        "c2",
        "c1",
    )
    assert cold.vector is not None and cold.vector.tolist() == [1.0, 2.0, 3.0]
    assert (await reader.get("u9", pin="c1", model="clicks")).status == "cold_start"
    with pytest.raises(ReadError) as missing:
        await reader.get("u9", pin="c2", model="clicks")
    assert (missing.value.code, missing.value.message) == (
        "not_found",
        "no 'clicks' embedding of 'u9' in space 'c2' yet; a refresh was requested",
    )
    with pytest.raises(ReadError) as mismatch:
        await reader.get("u1", pin="c1", model="clicks")
    assert (mismatch.value.code, mismatch.value.message) == (
        "version_mismatch",
        "the 'clicks' embedding of 'u1' is in space 'c0' (model 'c1'), not the requested 'c1'",
    )
    strict = models_reader(store, Refreshes(), cold_start_404=True)
    with pytest.raises(ReadError) as none:
        await strict.get("u9", model="clicks")
    assert none.value.message == "no 'clicks' embedding of 'u9' yet; a refresh was requested"
    (not_found,) = await strict.batch_get(["u9"], models=["clicks"])
    assert (not_found.status, not_found.model, not_found.vector) == ("not_found", "clicks", None)
    assert refreshes.requested == [["u9"]] * 3


async def test_an_unknown_model_is_refused_with_the_served_ones() -> None:
    store = RecordingStore()
    reader = models_reader(store, Refreshes())
    for read in (
        reader.get("u1", model="nope"),
        reader.batch_get(["u1"], models=["default", "nope"]),
        reader.batch_get(["u1"], pins={"nope": "v1"}),  # a pin names a model too
        reader.batch_get([f"u{i}" for i in range(2000)], models=["nope"]),  # before the size
    ):
        with pytest.raises(ReadError) as caught:
            await read
        assert (caught.value.code, caught.value.message) == (
            "unknown_model",
            "model 'nope' is not served; served models: default, clicks",
        )
    nothing = models_reader(store, Refreshes(), models=Models(served=()))
    with pytest.raises(ReadError) as none:
        await nothing.get("u1", model="clicks")
    assert none.value.message == "model 'clicks' is not served; served models: none"
    # the default model is always readable, without a look at the served models
    models = Models(served=())
    unlisted = models_reader(store, Refreshes(), models=models)
    assert (await unlisted.get("u1")).status == "cold_start"
    assert [a.model for a in await unlisted.batch_get(["u1"], models=["default"])] == ["default"]
    assert models.served_calls == 0
    assert store.reads == [("one", ["u1"], "default")] * 2


async def test_a_batch_of_several_models_is_user_major_from_one_store_read() -> None:
    store, refreshes = RecordingStore(), Refreshes()
    await store.put_embeddings({"u1": record(), "u2": record(at=BASE_TS - 10**6)})
    await store.put_embeddings({"u2": clicks_record(), "u3": clicks_record()}, "clicks")
    reader = models_reader(store, refreshes)
    answers = await reader.batch_get(["u1", "u2", "u3"], models=["clicks", "default"])
    assert [(a.user_id, a.model, a.status) for a in answers] == [
        ("u1", "clicks", "cold_start"),
        ("u1", "default", "fresh"),
        ("u2", "clicks", "fresh"),
        ("u2", "default", "stale"),
        ("u3", "clicks", "fresh"),
        ("u3", "default", "cold_start"),
    ]
    assert [a.model_version for a in answers] == ["c2", "m1", "c1", "m1", "c1", "m2"]
    assert [a.dim for a in answers] == [3, 4, 3, 4, 3, 2]
    assert store.reads == [("many", ["u1", "u2", "u3"], ["clicks", "default"])]
    assert refreshes.requested == [["u1", "u2", "u3"]]  # per user, whatever the model
    (only,) = await reader.batch_get(["u2"], models=["clicks"])
    assert (only.model, only.status) == ("clicks", "fresh")
    assert [a.model for a in await reader.batch_get(["u2"])] == ["default"]
    assert store.reads[1:] == [("one", ["u2"], "clicks"), ("one", ["u2"], "default")]
    assert await reader.batch_get([], models=["clicks", "default"]) == []


async def test_pins_are_per_model() -> None:
    store = MemoryStore()
    await store.put_embeddings({"u1": record(space="m1")})
    await store.put_embeddings({"u1": clicks_record(space="c1")}, "clicks")
    reader = models_reader(store, Refreshes())
    both = ["default", "clicks"]

    async def statuses(**request: Any) -> list[str]:
        return [a.status for a in await reader.batch_get(["u1"], **request)]

    assert await statuses(models=both) == ["fresh", "fresh"]
    assert await statuses(models=both, pins={"clicks": "c9"}) == ["fresh", "version_mismatch"]
    assert await statuses(models=both, pins={"default": "m9", "clicks": "c1"}) == [
        "version_mismatch",
        "fresh",
    ]
    assert await statuses(models=both, pins={}) == ["fresh", "fresh"]
    assert await statuses(models=["clicks"], pin="c9") == ["version_mismatch"]
    assert await statuses(models=["clicks"], pins={"clicks": "c9"}) == ["version_mismatch"]
    assert await statuses(pin="m1") == ["fresh"]
    refused = [
        (
            {"models": both, "pin": "m1"},
            "model_version pins the space of one model, not of 2: pin each model in model_versions",
        ),
        (
            {"models": ["clicks"], "pin": "c1", "pins": {"clicks": "c1"}},
            "both model_version and model_versions given: use model_versions",
        ),
        (
            {"models": ["clicks"], "pins": {"clicks": "c1", "default": "m1"}},
            "model_versions pins 'default', which models does not name",
        ),
    ]
    for request, message in refused:
        with pytest.raises(ReadError) as caught:
            await reader.batch_get(["u1"], **request)
        assert (caught.value.code, caught.value.message) == ("invalid_request", message)


async def test_a_batch_counts_answers_against_the_limit() -> None:
    reader = models_reader(MemoryStore(), Refreshes(), max_batch=5)
    assert len(await reader.batch_get(["a", "b"], models=["default", "clicks"])) == 4
    assert len(await reader.batch_get(list("abcde"), models=["clicks"])) == 5
    with pytest.raises(ReadError) as caught:
        await reader.batch_get(["a", "b", "c"], models=["default", "clicks"])
    assert (caught.value.code, caught.value.message) == (
        "batch_too_large",
        "3 user_ids x 2 models = 6 embeddings requested; at most 5 per call",
    )
    with pytest.raises(ReadError) as single:
        await reader.batch_get(list("abcdef"), models=["clicks"])
    assert single.value.message == "6 user_ids requested; at most 5 per call"
    with pytest.raises(ReadError) as bad:
        await reader.batch_get(["a", "b c"], models=["default", "clicks"])
    assert bad.value.code == "invalid_user_id"


async def test_the_cache_keys_records_by_model_and_user() -> None:
    store = RecordingStore()
    await store.put_embeddings({"u1": record(space="m1"), "u2": record(space="m1")})
    await store.put_embeddings({"u1": clicks_record(space="c1")}, "clicks")
    cache = HotCache(ttl_ms=60_000, max_users=10)
    reader = models_reader(store, Refreshes(), cache=cache)
    assert (await reader.get("u1")).space_version == "m1"
    assert (await reader.get("u1", model="clicks")).space_version == "c1"  # not default's
    await store.put_embeddings({"u1": record(space="m2"), "u2": record(space="m2")})
    await store.put_embeddings({"u1": clicks_record(space="c2")}, "clicks")
    assert (await reader.get("u1", model="clicks")).space_version == "c1"  # cached
    assert (cache.hits, cache.misses) == (1, 2)
    store.reads.clear()
    # u1 is cached in both models; u2 in neither: only u2 is read, in both
    answers = await reader.batch_get(["u1", "u2"], models=["default", "clicks"])
    assert [(a.user_id, a.model, a.status, a.space_version) for a in answers] == [
        ("u1", "default", "fresh", "m1"),
        ("u1", "clicks", "fresh", "c1"),
        ("u2", "default", "fresh", "m2"),
        ("u2", "clicks", "cold_start", "c1"),
    ]
    assert store.reads == [("many", ["u2"], ["default", "clicks"])]
    assert (cache.hits, cache.misses) == (3, 4)
    # u2 is now cached in default only (a missing record is not cached): read in both
    await store.put_embeddings({"u2": clicks_record(space="c3")}, "clicks")
    answers = await reader.batch_get(["u2", "u1"], models=["default", "clicks"])
    assert [a.space_version for a in answers] == ["m2", "c3", "m1", "c1"]
    assert store.reads[1:] == [("many", ["u2"], ["default", "clicks"])]
    assert len(cache) == 4  # (default|clicks, u1|u2)


async def test_a_store_answering_the_wrong_shape_for_several_models_is_an_error() -> None:
    class WrongStore(MemoryStore):
        def __init__(self, shape: str) -> None:
            super().__init__()
            self.shape = shape

        async def get_model_embeddings(
            self, user_ids: Sequence[str], models: Sequence[str]
        ) -> list[list[EmbeddingRecord | None]]:
            records = await super().get_model_embeddings(user_ids, models)
            if self.shape == "a model short":
                return records[:-1]
            if self.shape == "a model longer":
                return [records[0], [*records[1], None]]
            return [records[0], records[1][:-1]]

    for shape in ("a model short", "a model longer", "a user short"):
        for cache in (None, HotCache(ttl_ms=60_000, max_users=10)):
            reader = models_reader(WrongStore(shape), Refreshes(), cache=cache)
            with pytest.raises(ValueError, match="zip"):
                await reader.batch_get(["u1", "u2"], models=["default", "clicks"])


async def test_served_embeddings_are_counted_per_model_and_status() -> None:
    store, refreshes = MemoryStore(), Refreshes()
    await store.put_embeddings({"u1": record(), "u2": record(at=BASE_TS - REFRESH_AFTER_MS - 1)})
    await store.put_embeddings({"u1": clicks_record(space="c0"), "u3": clicks_record()}, "clicks")
    reader = models_reader(store, refreshes)
    keys = [(m, s) for m in ("default", "clicks") for s in get_args(Status)]
    before = {key: served(key[1], key[0]) for key in keys}

    def delta() -> dict[tuple[str, str], float]:
        changed = {key: served(key[1], key[0]) - before[key] for key in keys}
        return {key: value for key, value in changed.items() if value}

    await reader.batch_get(
        ["u1", "u2", "u3", "u1"], models=["clicks", "default"], pins={"clicks": "c1"}
    )
    assert delta() == {
        ("clicks", "version_mismatch"): 2,  # u1 twice, in space c0
        ("clicks", "cold_start"): 1,  # u2
        ("clicks", "fresh"): 1,  # u3
        ("default", "fresh"): 2,  # u1 twice
        ("default", "stale"): 1,  # u2
        ("default", "cold_start"): 1,  # u3
    }
    await reader.get("u3", model="clicks")
    await reader.get("u3")
    assert delta()[("clicks", "fresh")] == 2 and delta()[("default", "cold_start")] == 2
    await reader.batch_get(["u2", "u3"], models=["clicks"])
    assert delta()[("clicks", "cold_start")] == 2 and delta()[("clicks", "fresh")] == 3
    assert len(delta()) == 6  # nothing else counted
