"""Pure parts of the client: user ids, batch splitting, server URLs, options, decoding
answers of both transports, and the batch result."""

from __future__ import annotations

import base64
import re

import numpy as np
import orjson
import pytest

from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.core.model_names import DEFAULT_MODEL as SERVER_DEFAULT_MODEL
from userembed.batching import check_user_id, split, users_per_request
from userembed.errors import InvalidRequest, NotFound, ServerError, VersionMismatch
from userembed.grpc_transport import batch_request, decode_messages, get_request
from userembed.grpc_transport import decode_models as decode_grpc_models
from userembed.http_transport import _Requests, decode_answers, decode_models, get_path
from userembed.options import ClientOptions
from userembed.results import DEFAULT_MODEL, Batch, Embedding, ModelBatches, ModelInfo, single
from userembed.transport import Query, Target

VECTORS = np.array([[0.5, -1.0, 2.0], [0.25, 0.0, -3.5]], dtype=np.float16)


def answer(user_id: str, status: str, vector: np.ndarray | None) -> dict[str, object]:
    return {
        "user_id": user_id,
        "embedding": None if vector is None else base64.b64encode(vector.tobytes()).decode(),
        "dim": None if vector is None else len(vector),
        "model_version": "m2",
        "space_version": "m1",
        "computed_at": 1_760_000_000_000 if status != "cold_start" else None,
        "feature_version": 3,
        "staleness_ms": 10,
        "status": status,
    }


def test_split_keeps_order_and_bounds_each_request() -> None:
    ids = [f"u{i}" for i in range(7)]
    assert split(ids, 3) == [["u0", "u1", "u2"], ["u3", "u4", "u5"], ["u6"]]
    assert split(ids, 7) == [ids]
    assert split([], 3) == []
    with pytest.raises(ValueError):
        split(ids, 0)


@pytest.mark.parametrize("user_id", ["u1", "a.b:c@d-e_f", ".", "x" * 128])
def test_valid_user_ids(user_id: str) -> None:
    assert check_user_id(user_id) == user_id


@pytest.mark.parametrize("user_id", ["", "a b", "x" * 129, "ü", "a/b"])
def test_invalid_user_ids_fail_locally(user_id: str) -> None:
    with pytest.raises(InvalidRequest, match="invalid user_id") as caught:
        check_user_id(user_id)
    assert caught.value.code == "invalid_user_id"


def test_dot_segments_are_escaped_in_the_path() -> None:
    assert get_path("u1") == "/v1/users/u1/embedding"
    assert get_path("..") == "/v1/users/%2E%2E/embedding"
    assert get_path("a..b") == "/v1/users/a..b/embedding"


@pytest.mark.parametrize(
    ("url", "target"),
    [
        ("http://127.0.0.1:8000", Target("http", "http://127.0.0.1:8000", False)),
        ("https://api.example/base/", Target("http", "https://api.example/base", True)),
        ("grpc://127.0.0.1:50051", Target("grpc", "127.0.0.1:50051", False)),
        ("grpcs://embeddings:443", Target("grpc", "embeddings:443", True)),
    ],
)
def test_the_scheme_picks_the_transport(url: str, target: Target) -> None:
    assert Target.parse(url) == target


@pytest.mark.parametrize("url", ["127.0.0.1:8000", "ftp://x", "grpc://x:1/path", "http://"])
def test_unsupported_urls_say_what_to_use(url: str) -> None:
    with pytest.raises(ValueError, match="grpc://host:port"):
        Target.parse(url)


def test_options_are_checked() -> None:
    with pytest.raises(ValueError, match="timeout"):
        ClientOptions(timeout=0)
    with pytest.raises(ValueError, match="model_version"):
        ClientOptions(model_version="../x")
    with pytest.raises(ValueError, match="precision"):
        ClientOptions(precision="int8")  # type: ignore[arg-type]


def test_http_answers_decode_to_float32_arrays() -> None:
    rows = [
        answer("a", "fresh", VECTORS[0]),
        answer("b", "version_mismatch", None),
        answer("c", "cold_start", VECTORS[1]),
    ]
    got = decode_answers(rows, "<f2")
    assert [e.status for e in got] == ["fresh", "version_mismatch", "cold_start"]
    assert got[0].vector is not None and got[0].vector.dtype == np.float32
    assert got[0].vector.tolist() == VECTORS[0].astype(np.float32).tolist()
    assert got[1].vector is None and got[1].dim is None and not got[1].found
    assert got[2].computed_at is None and got[2].dim == 3
    assert (got[0].model_version, got[0].space_version, got[0].feature_version) == ("m2", "m1", 3)


def test_an_unknown_status_is_a_server_error() -> None:
    with pytest.raises(ServerError, match="unknown status"):
        decode_answers([answer("a", "hot", VECTORS[0])], "<f2")


def test_grpc_messages_decode_like_http_answers() -> None:
    messages = [
        pb.Embedding(
            user_id="a",
            status=pb.STATUS_FRESH,
            vector=VECTORS[0].tobytes(),
            encoding=pb.ENCODING_FLOAT16,
            dim=3,
            model_version="m2",
            space_version="m1",
            computed_at=1_760_000_000_000,
            feature_version=3,
            staleness_ms=10,
        ),
        pb.Embedding(user_id="b", status=pb.STATUS_NOT_FOUND),
    ]
    got = decode_messages(messages)
    http = decode_answers([answer("a", "fresh", VECTORS[0])], "<f2")[0]
    assert got[0].vector is not None and http.vector is not None
    assert got[0].vector.tolist() == http.vector.tolist()
    assert (got[0].computed_at, got[0].staleness_ms) == (http.computed_at, http.staleness_ms)
    assert (got[1].status, got[1].vector, got[1].model_version) == ("not_found", None, None)
    assert got[1].computed_at is None
    with pytest.raises(ServerError):
        decode_messages([pb.Embedding(user_id="c", status=9)])  # type: ignore[arg-type]


def test_batch_matrix_has_zero_rows_for_users_without_vectors() -> None:
    rows = [answer("a", "fresh", VECTORS[0]), answer("b", "not_found", None)]
    batch = Batch(decode_answers(rows, "<f2"))
    assert len(batch) == 2 and batch.statuses == ["fresh", "not_found"]
    assert batch.found.tolist() == [True, False]
    assert batch.matrix().tolist() == [VECTORS[0].astype(np.float32).tolist(), [0.0, 0.0, 0.0]]
    assert isinstance(batch[:1], Batch) and batch[1].user_id == "b"
    assert Batch([Embedding("x", "not_found", None, None, None)]).matrix(dim=4).shape == (1, 4)
    with pytest.raises(ValueError, match="dim="):
        Batch([]).matrix()


def test_a_batch_answer_as_a_single_get() -> None:
    fresh = Embedding("a", "fresh", VECTORS[0].astype(np.float32), "m1", "m1")
    assert single(fresh, None) is fresh
    with pytest.raises(NotFound, match="no embedding of 'b' in space 'm0'"):
        single(Embedding("b", "not_found", None, None, None), "m0")
    expected = re.escape("is in space 'm1' (model 'm2'), not the requested 'm0'")
    with pytest.raises(VersionMismatch, match=expected):
        single(Embedding("c", "version_mismatch", None, "m2", "m1"), "m0")


# -- several models ---------------------------------------------------------------------


def test_the_default_model_is_the_servers() -> None:
    assert DEFAULT_MODEL == SERVER_DEFAULT_MODEL


def test_users_per_request_bound_the_answers() -> None:
    assert [users_per_request(1000, m) for m in (1, 2, 3)] == [1000, 500, 333]
    assert users_per_request(2, 3) == 1  # one user still goes (the server says if too many)


def test_a_calls_model_and_pin_follow_the_clients() -> None:
    plain, pinned = ClientOptions(), ClientOptions(model_version="d1")
    clicks = ClientOptions(model="clicks", model_version="c1")
    assert plain.query(None, None) == Query()  # the default model, unnamed: as before
    assert plain.query("clicks", "c2") == Query(("clicks",), (("clicks", "c2"),))
    assert pinned.query(None, None) == Query((), (("default", "d1"),))
    assert pinned.query(None, "d2") == Query((), (("default", "d2"),))
    assert pinned.query("default", None) == Query(("default",), (("default", "d1"),))
    assert pinned.query("clicks", None) == Query(("clicks",))  # the pin is the default's
    assert clicks.query(None, None) == Query(("clicks",), (("clicks", "c1"),))
    assert clicks.query("default", None) == Query(("default",))
    both = clicks.models_query(["default", "clicks"], {"default": "d1"})
    assert both == Query(("default", "clicks"), (("default", "d1"), ("clicks", "c1")))
    assert both.names == ("default", "clicks") and both.pin("clicks") == "c1"
    own = clicks.models_query(["clicks"], {"clicks": "c9"})
    assert own.pin("clicks") == "c9"  # the call's pin first
    assert Query().names == ("default",) and Query().pin() is None
    with pytest.raises(ValueError, match="model="):
        ClientOptions(model="no.dots")
    with pytest.raises(InvalidRequest, match="non-empty"):
        plain.models_query("clicks", None)  # a string is not a list of models


def test_http_requests_name_models_only_when_the_call_does() -> None:
    requests = _Requests(None, "float16")
    assert requests.query(Query()) == {"encoding": "base64_float16"}
    assert requests.query(Query((), (("default", "d1"),))) == {
        "encoding": "base64_float16",
        "model_version": "d1",
    }
    assert requests.query(Query(("clicks",), (("clicks", "c1"),))) == {
        "encoding": "base64_float16",
        "model": "clicks",
        "model_version": "c1",
    }
    body = orjson.loads(requests.batch_body(["u1"], Query((), (("default", "d1"),))))
    assert body == {"user_ids": ["u1"], "encoding": "base64_float16", "model_version": "d1"}
    body = orjson.loads(requests.batch_body(["u1"], Query(("a", "b"), (("b", "b1"),))))
    assert body == {
        "user_ids": ["u1"],
        "encoding": "base64_float16",
        "models": ["a", "b"],
        "model_versions": {"b": "b1"},
    }
    assert "models" not in orjson.loads(requests.batch_body(["u1"], Query()))


def test_grpc_requests_name_models_only_when_the_call_does() -> None:
    f16 = pb.ENCODING_FLOAT16
    assert get_request("u1", Query(), f16) == pb.GetEmbeddingRequest(user_id="u1", encoding=f16)
    named = get_request("u1", Query(("clicks",), (("clicks", "c1"),)), f16)
    assert (named.model, named.model_version) == ("clicks", "c1")
    unnamed = batch_request(["u1"], Query((), (("default", "d1"),)), f16)
    assert (list(unnamed.models), unnamed.model_version) == ([], "d1")
    several = batch_request(["u1", "u2"], Query(("a", "b"), (("b", "b1"),)), f16)
    assert list(several.models) == ["a", "b"] and dict(several.model_versions) == {"b": "b1"}
    assert several.model_version == "" and list(several.user_ids) == ["u1", "u2"]


def test_answers_say_their_model() -> None:
    row = {**answer("a", "fresh", VECTORS[0]), "model": "clicks"}
    assert [e.model for e in decode_answers([row, answer("b", "fresh", VECTORS[1])], "<f2")] == [
        "clicks",
        "default",
    ]
    messages = [pb.Embedding(user_id="a", status=pb.STATUS_NOT_FOUND, model="clicks")]
    messages.append(pb.Embedding(user_id="b", status=pb.STATUS_NOT_FOUND))
    assert [e.model for e in decode_messages(messages)] == ["clicks", "default"]


def test_model_listings_decode_alike_over_both_transports() -> None:
    http = decode_models(
        {
            "models": [
                {
                    "name": "default",
                    "version": "v2",
                    "space_version": "v1",
                    "dim": 64,
                    "dtype": "float16",
                    "input_schema_hash": "abc",
                    "cold_start": "available",
                },
                {
                    "name": "clicks",
                    "version": None,
                    "space_version": None,
                    "dim": None,
                    "dtype": "float16",
                    "input_schema_hash": None,
                    "cold_start": "unavailable",
                },
            ]
        }
    )
    grpc = decode_grpc_models(
        pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name="default",
                    version="v2",
                    space_version="v1",
                    dim=64,
                    dtype="float16",
                    input_schema_hash="abc",
                    cold_start=pb.COLD_START_AVAILABLE,
                ),
                pb.ModelInfo(name="clicks", dtype="float16", cold_start=pb.COLD_START_UNAVAILABLE),
            ]
        )
    )
    assert http == grpc
    assert http[0] == ModelInfo("default", "v2", "v1", 64, "float16", "abc", "available")
    with pytest.raises(ServerError, match="cold_start"):
        decode_models({"models": [{"name": "x", "cold_start": "maybe"}]})
    with pytest.raises(ServerError, match="cold_start"):
        decode_grpc_models(pb.ListModelsResponse(models=[pb.ModelInfo(name="x")]))


def test_answers_of_several_models_must_be_user_major() -> None:
    def e(user_id: str, model: str) -> Embedding:
        return Embedding(user_id, "not_found", None, None, None, model=model)

    good = [e("u1", "a"), e("u1", "b"), e("u2", "a"), e("u2", "b")]
    batches = ModelBatches.from_answers(["u1", "u2"], ["a", "b"], good)
    assert [x.user_id for x in batches["b"]] == ["u1", "u2"]
    with pytest.raises(KeyError):
        batches["c"]
    with pytest.raises(ServerError, match="in 'a' was expected"):
        ModelBatches.from_answers(["u1", "u2"], ["a", "b"], [good[1], good[0], *good[2:]])
    with pytest.raises(ServerError, match="3 answers for 2 users x 2 models"):
        ModelBatches.from_answers(["u1", "u2"], ["a", "b"], good[:3])


def test_a_named_models_batch_answer_as_a_single_get_says_its_model() -> None:
    with pytest.raises(NotFound, match="no 'clicks' embedding of 'b' in space 'c0'"):
        single(Embedding("b", "not_found", None, None, None, model="clicks"), "c0")
    expected = re.escape("the 'clicks' embedding of 'c' is in space 'c1'")
    with pytest.raises(VersionMismatch, match=expected):
        single(Embedding("c", "version_mismatch", None, "c2", "c1", model="clicks"), "c0")
