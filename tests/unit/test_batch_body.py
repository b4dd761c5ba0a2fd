"""The batchGet body written from columns is, byte for byte, what orjson writes of the
answers' dicts: for both stored dtypes, every encoding, named or not, odd dimensions,
values JSON cannot hold (NaN and infinities are null) and versions holding a quote and
a ``%``."""

from __future__ import annotations

import numpy as np
import orjson
import pytest

from service.api.http_reads import answer_dicts, columns_body
from service.api.reads import ENCODINGS, AnswerColumns, EmbeddingReader
from service.api.refresh import RefreshRequester
from service.core.embeddings import EmbeddingRecord
from service.store.memory import MemoryStore
from service.store.records import COLUMNS_FROM

NOW = 1_760_000_000_000


async def columns(dtype: str, dim: int) -> AnswerColumns:
    store = MemoryStore()
    vectors = np.random.default_rng(dim).standard_normal((COLUMNS_FROM, dim)) * 1e3
    if dim:
        vectors[:3, 0] = [np.nan, np.inf, -np.inf]
    await store.put_embeddings(
        {
            f"user:{i}@x": EmbeddingRecord(v.astype(dtype), "m-2%s", 'sp"%d1', NOW - 40 * i, i)
            for i, v in enumerate(vectors)
        }
    )
    reader = EmbeddingReader(
        store, lambda: None, RefreshRequester(store, 1000), refresh_after_ms=300, clock=lambda: NOW
    )
    answers = await reader.batch_get(
        [f"user:{i}@x" for i in range(COLUMNS_FROM)], models=["default"]
    )
    assert isinstance(answers, AnswerColumns)
    return answers


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("dim", [0, 1, 2, 3, 128])
async def test_the_columns_body_is_the_dicts_body(dtype: str, dim: int) -> None:
    answers = await columns(dtype, dim)
    assert {a.status for a in answers} == {"fresh", "stale"}
    for encoding in ENCODINGS:
        for named in (False, True):
            dicts = answer_dicts(list(answers), encoding, named)  # type: ignore[arg-type]
            expected = orjson.dumps({"embeddings": dicts}, option=orjson.OPT_SERIALIZE_NUMPY)
            assert columns_body(answers, encoding, named) == expected, (encoding, named)  # type: ignore[arg-type]


async def test_a_named_model_is_written_in_every_answer() -> None:
    body = orjson.loads(columns_body(await columns("float16", 2), "json", True))
    assert {a["model"] for a in body["embeddings"]} == {"default"}
    first = body["embeddings"][0]
    assert first["embedding"][0] is None and first["space_version"] == 'sp"%d1'  # NaN -> null
