"""The gRPC servicer before issue 20, kept as the benchmark's ``aio-messages`` candidate
and as the reference the production server is checked against
(tests/integration/test_grpc_wire_parity.py).

It registered the generated classes as (de)serializers and built every answer of a
batch as an ``Embedding`` message, then copied them into the response;
:func:`encoding_costs` times that against :class:`WireReads`' in place, in process,
where the network's noise does not reach.
"""

from __future__ import annotations

import timeit
from collections.abc import Sequence
from typing import Final

import grpc
import numpy as np

from service.api.frontend import KeyChecker
from service.api.grpc_reads import WireReads, request_dtype, to_message
from service.api.grpc_service import SERVICE_NAME, EmbeddingsService
from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.api.reads import (
    DEFAULT_ONLY,
    Answer,
    EmbeddingReader,
    parse_model,
    parse_models,
    parse_pin,
    parse_pins,
)
from service.core.clock import now_ms
from service.core.embeddings import EmbeddingDtype, EmbeddingRecord
from service.settings import Settings
from service.store.memory import MemoryStore

_GET: Final = f"/{SERVICE_NAME}/GetEmbedding"
_BATCH: Final = f"/{SERVICE_NAME}/BatchGetEmbeddings"
_MODELS: Final = f"/{SERVICE_NAME}/ListModels"

_STATUS: Final = {
    "fresh": pb.STATUS_FRESH,
    "stale": pb.STATUS_STALE,
    "cold_start": pb.STATUS_COLD_START,
    "not_found": pb.STATUS_NOT_FOUND,
    "version_mismatch": pb.STATUS_VERSION_MISMATCH,
}
_COLD_START: Final = {
    "available": pb.COLD_START_AVAILABLE,
    "unavailable": pb.COLD_START_UNAVAILABLE,
    "disabled": pb.COLD_START_DISABLED,
}


def _message(
    answer: Answer, encoding: pb.Encoding, dtype: EmbeddingDtype, named: bool = False
) -> pb.Embedding:
    """The old ``to_message``."""
    message = pb.Embedding(
        user_id=answer.user_id,
        status=_STATUS[answer.status],
        vector=answer.packed(dtype),
        encoding=encoding or pb.ENCODING_FLOAT32,
        dim=answer.dim or 0,
        model_version=answer.model_version or "",
        space_version=answer.space_version or "",
    )
    if answer.computed_at is not None:
        message.computed_at = answer.computed_at
    if answer.feature_version is not None:
        message.feature_version = answer.feature_version
    if answer.staleness_ms is not None:
        message.staleness_ms = answer.staleness_ms
    if named:
        message.model = answer.model
    return message


class MessagesService(EmbeddingsService):
    """The old servicer's reads: generated messages in and out, a batch's embeddings
    built as messages and copied into the response."""

    def __init__(self, reader: EmbeddingReader, settings: Settings) -> None:
        super().__init__(WireReads(reader), KeyChecker(settings.resolved_api_keys()))
        self._reader = reader
        self._dtype = settings.embedding_dtype
        self._cold_start_disabled = settings.cold_start_404

    def handlers(self) -> grpc.GenericRpcHandler:
        methods = {
            "GetEmbedding": grpc.unary_unary_rpc_method_handler(
                self.get_message,
                request_deserializer=pb.GetEmbeddingRequest.FromString,
                response_serializer=pb.Embedding.SerializeToString,
            ),
            "BatchGetEmbeddings": grpc.unary_unary_rpc_method_handler(
                self.batch_get_messages,
                request_deserializer=pb.BatchGetEmbeddingsRequest.FromString,
                response_serializer=pb.BatchGetEmbeddingsResponse.SerializeToString,
            ),
            "ListModels": grpc.unary_unary_rpc_method_handler(
                self.list_models_messages,
                request_deserializer=pb.ListModelsRequest.FromString,
                response_serializer=pb.ListModelsResponse.SerializeToString,
            ),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, methods)

    async def get_message(
        self, request: pb.GetEmbeddingRequest, context: grpc.aio.ServicerContext
    ) -> pb.Embedding:
        return await self._call(_GET, context, self._get, request)

    async def batch_get_messages(
        self, request: pb.BatchGetEmbeddingsRequest, context: grpc.aio.ServicerContext
    ) -> pb.BatchGetEmbeddingsResponse:
        return await self._call(_BATCH, context, self._batch_get, request)

    async def list_models_messages(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        return await self._call(_MODELS, context, self._list_models, request)

    async def _get(self, request: pb.GetEmbeddingRequest) -> pb.Embedding:
        dtype = request_dtype(request.encoding)
        model = parse_model(request.model)
        answer = await self._reader.get(request.user_id, parse_pin(request.model_version), model)
        return _message(answer, request.encoding, dtype, bool(request.model))

    async def _batch_get(
        self, request: pb.BatchGetEmbeddingsRequest
    ) -> pb.BatchGetEmbeddingsResponse:
        dtype = request_dtype(request.encoding)
        named = len(request.models) > 0
        answers = await self._reader.batch_get(
            list(request.user_ids),
            parse_pin(request.model_version),
            models=parse_models(request.models) if named else DEFAULT_ONLY,
            pins=parse_pins(request.model_versions),
        )
        return pb.BatchGetEmbeddingsResponse(
            embeddings=[_message(a, request.encoding, dtype, named) for a in answers]
        )

    async def _list_models(self, request: pb.ListModelsRequest) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[
                pb.ModelInfo(
                    name=state.name,
                    version=state.version or "",
                    space_version=state.space_version or "",
                    dim=state.dim or 0,
                    dtype=self._dtype,
                    input_schema_hash=state.input_schema_hash or "",
                    cold_start=_COLD_START[state.cold_start_status(self._cold_start_disabled)],
                )
                for state in self._reader.models.states()
            ]
        )


async def sample_answers(n: int, dim: int = 128) -> list[Answer]:
    """``n`` fresh answers of the default model, read as the API reads them."""
    store = MemoryStore()
    vectors = np.random.default_rng(0).standard_normal((n, dim)).astype(np.float16)
    at = now_ms()
    records = {f"u{i}": EmbeddingRecord(v, "bench", "bench", at, 1) for i, v in enumerate(vectors)}
    await store.put_embeddings(records)
    reader = EmbeddingReader.from_settings(store, Settings(), lambda: None)
    return list(await reader.batch_get(list(records)))


def encoding_costs(answers: Sequence[Answer], number: int = 20) -> tuple[float, float]:
    """Microseconds to encode ``answers`` as one float16 ``BatchGetEmbeddingsResponse``:
    built as messages and copied in (before), and added in place (:class:`WireReads`);
    the best of 5 repeats of ``number``. Raises if the two encodings differ."""
    encoding = pb.ENCODING_FLOAT16

    def before() -> bytes:
        messages = [_message(a, encoding, "float16") for a in answers]
        data: bytes = pb.BatchGetEmbeddingsResponse(embeddings=messages).SerializeToString()
        return data

    def in_place() -> bytes:
        response = pb.BatchGetEmbeddingsResponse()
        for answer in answers:
            to_message(answer, encoding, "float16", False, response.embeddings.add)
        data: bytes = response.SerializeToString()
        return data

    if before() != in_place():
        raise AssertionError("the two encodings of the same answers differ")
    best = [
        min(timeit.repeat(f, number=number, repeat=5)) / number * 1e6 for f in (before, in_place)
    ]
    return best[0], best[1]
