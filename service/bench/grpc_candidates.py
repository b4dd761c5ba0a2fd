"""The gRPC servers ``userembed bench grpc`` compares, each run as its own process.

``python -m service.bench.grpc_candidates NAME PORT`` builds the read path as
``userembed serve`` does (settings from the environment, the configured store, the
registry's cold starts, :meth:`EmbeddingReader.from_settings`) and serves it with:

* ``aio-messages``: grpc.aio with generated messages in and out (the server before
  issue 20: each batch answer built as a message, then copied into the response);
* ``aio-bytes``: the production server (:func:`start_grpc_server`): grpc.aio, generic
  handlers on raw bytes, :class:`WireReads`;
* ``sync-pool``: grpcio's synchronous server, a thread pool handing each call to the
  event loop that owns the reader (``run_coroutine_threadsafe``);
* ``grpclib``: grpclib (pure-Python HTTP/2 on asyncio) with a pass-through codec, if
  installed;
* ``aio-constant``: not a candidate but grpc.aio's ceiling: a prepared answer to every
  call, nothing read or checked.

Every candidate checks API keys, sets the request id and error code trailers and
observes the same metrics, so they do the same work per call.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Final

import grpc

from service.api.cold_start import RegistryColdStart
from service.api.frontend import KeyChecker
from service.api.grpc_reads import GRPC_CODE, to_message
from service.api.grpc_service import (
    ERROR_CODE_METADATA,
    GRPC_LATENCY,
    SERVICE_NAME,
    call_metadata,
    read_service,
    server_options,
    start_grpc_server,
)
from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.api.reads import EmbeddingReader, ReadError
from service.api.server import install_stop_handlers, run_loop
from service.bench.grpc_messages import MessagesService
from service.metrics import API_IN_FLIGHT
from service.settings import Settings
from service.store.connect import open_checked_store

Serving = Callable[[EmbeddingReader, Settings, int], AbstractAsyncContextManager[None]]
_GET: Final = f"/{SERVICE_NAME}/GetEmbedding"
_BATCH: Final = f"/{SERVICE_NAME}/BatchGetEmbeddings"
_HOST: Final = "127.0.0.1"


# --- aio-messages, aio-bytes: grpc.aio ------------------------------------------------


@asynccontextmanager
async def _aio_messages(reader: EmbeddingReader, settings: Settings, port: int) -> Any:
    handlers = MessagesService(reader, settings).handlers()
    server, _ = await start_grpc_server(reader, settings, _HOST, port, handlers=handlers)
    yield
    await server.stop(grace=1.0)


@asynccontextmanager
async def _aio_bytes(reader: EmbeddingReader, settings: Settings, port: int) -> Any:
    server, _ = await start_grpc_server(reader, settings, _HOST, port)
    yield
    await server.stop(grace=1.0)


# --- sync-pool: grpcio's threaded server over the loop's reader ------------------------


class _Observed:
    """What every candidate does around a call: in-flight gauge and latency histogram."""

    def __init__(self, method: str) -> None:
        self._method = method
        self._started = time.perf_counter()
        self.code = "INTERNAL"
        API_IN_FLIGHT.inc()

    def done(self) -> None:
        API_IN_FLIGHT.dec()
        GRPC_LATENCY.observe(self._method, self.code, time.perf_counter() - self._started)


def _sync_handler(
    method: str,
    read: Callable[[bytes], Coroutine[Any, Any, bytes]],
    keys: KeyChecker,
    loop: asyncio.AbstractEventLoop,
) -> grpc.RpcMethodHandler:
    def handle(data: bytes, context: grpc.ServicerContext) -> bytes:
        observed = _Observed(method)
        request_id, refused = call_metadata(keys, context.invocation_metadata())
        trailer = [("x-request-id", request_id)]
        context.set_trailing_metadata(trailer)
        try:
            if refused is not None:
                raise refused
            answer = asyncio.run_coroutine_threadsafe(read(data), loop).result()
            observed.code = "OK"
            return answer
        except ReadError as exc:
            code = GRPC_CODE.get(exc.code, grpc.StatusCode.INTERNAL)
            observed.code = code.name
            context.set_trailing_metadata([*trailer, (ERROR_CODE_METADATA, exc.code)])
            context.abort(code, exc.message)
            raise  # abort raises
        finally:
            observed.done()

    return grpc.unary_unary_rpc_method_handler(handle)


@asynccontextmanager
async def _sync_pool(reader: EmbeddingReader, settings: Settings, port: int) -> Any:
    service = read_service(reader, settings)
    reads, keys = service.reads, service.keys
    loop = asyncio.get_running_loop()
    methods = {
        "GetEmbedding": _sync_handler(_GET, reads.get, keys, loop),
        "BatchGetEmbeddings": _sync_handler(_BATCH, reads.batch_get, keys, loop),
    }
    pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="grpc-sync")
    server = grpc.server(pool, options=server_options(settings))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, methods),))
    if server.add_insecure_port(f"{_HOST}:{port}") == 0:
        raise OSError(f"could not bind gRPC on {_HOST}:{port}")
    server.start()
    yield
    await asyncio.to_thread(lambda: server.stop(grace=1.0).wait())
    pool.shutdown()


# --- grpclib: pure-Python HTTP/2 on the same loop --------------------------------------


@asynccontextmanager
async def _grpclib(reader: EmbeddingReader, settings: Settings, port: int) -> Any:
    from grpclib.const import Cardinality, Handler, Status
    from grpclib.encoding.base import CodecBase
    from grpclib.server import Server, Stream

    class PassThrough(CodecBase):  # type: ignore[misc,unused-ignore]  # Any without grpclib
        """Messages stay bytes: :class:`WireReads` parses and encodes."""

        __content_subtype__ = "proto"

        def encode(self, message: Any, message_type: Any) -> bytes:
            return bytes(message)

        def decode(self, data: bytes, message_type: Any) -> Any:
            return data

    service = read_service(reader, settings)
    reads, keys = service.reads, service.keys

    def handler(method: str, read: Callable[[bytes], Awaitable[bytes]]) -> Handler:
        async def handle(stream: Stream[bytes, bytes]) -> None:
            observed = _Observed(method)
            try:
                data = await stream.recv_message()
                request_id, refused = call_metadata(keys, (stream.metadata or {}).items())
                trailer = [("x-request-id", request_id)]
                try:
                    if refused is not None:
                        raise refused
                    answer = await read(data or b"")
                except ReadError as exc:
                    code = GRPC_CODE.get(exc.code, grpc.StatusCode.INTERNAL)
                    observed.code = code.name
                    await stream.send_trailing_metadata(
                        status=Status(code.value[0]),
                        status_message=exc.message,
                        metadata=[*trailer, (ERROR_CODE_METADATA, exc.code)],
                    )
                    return
                await stream.send_message(answer)
                await stream.send_trailing_metadata(metadata=trailer)
                observed.code = "OK"
            finally:
                observed.done()

        return Handler(handle, Cardinality.UNARY_UNARY, bytes, bytes)

    class Mapping:
        def __mapping__(self) -> dict[str, Handler]:
            return {_GET: handler(_GET, reads.get), _BATCH: handler(_BATCH, reads.batch_get)}

    server = Server([Mapping()], codec=PassThrough())
    await server.start(_HOST, port)
    yield
    server.close()
    await server.wait_closed()


# --- aio-constant: grpc.aio's own ceiling, a reference row -----------------------------


@asynccontextmanager
async def _aio_constant(reader: EmbeddingReader, settings: Settings, port: int) -> Any:
    """Answers every call with one prepared embedding (a batch: as many as it asks for):
    no metadata, no store, no encoding. What grpc.aio itself costs a call: a ceiling,
    not a candidate."""
    one = to_message(await reader.get("u0"), pb.ENCODING_FLOAT16, "float16")
    single: bytes = one.SerializeToString()
    batches: dict[int, bytes] = {}

    async def get(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return single

    async def batch_get(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        n = len(pb.BatchGetEmbeddingsRequest.FromString(request).user_ids)
        if n not in batches:
            response = pb.BatchGetEmbeddingsResponse(embeddings=[one] * n)
            batches[n] = response.SerializeToString()
        return batches[n]

    methods = {
        "GetEmbedding": grpc.unary_unary_rpc_method_handler(get),
        "BatchGetEmbeddings": grpc.unary_unary_rpc_method_handler(batch_get),
    }
    handlers = grpc.method_handlers_generic_handler(SERVICE_NAME, methods)
    server, _ = await start_grpc_server(reader, settings, _HOST, port, handlers=handlers)
    yield
    await server.stop(grace=1.0)


CANDIDATES: Final[dict[str, Serving]] = {
    "aio-messages": _aio_messages,
    "aio-bytes": _aio_bytes,
    "sync-pool": _sync_pool,
    "grpclib": _grpclib,
    "aio-constant": _aio_constant,
}


def available(names: Iterable[str]) -> list[str]:
    """``names`` less the candidates whose library is not installed (grpclib is optional)."""
    import importlib.util

    return [n for n in names if n != "grpclib" or importlib.util.find_spec("grpclib")]


async def serve_candidate(name: str, port: int) -> None:
    """Serve ``name`` on ``port`` over the configured store until SIGINT/SIGTERM."""
    settings = Settings()
    store = await open_checked_store(settings)
    cold_start = RegistryColdStart(settings.registry_path)
    cold_start()
    reader = EmbeddingReader.from_settings(store, settings, cold_start)
    stop = asyncio.Event()
    flusher = asyncio.create_task(reader.run(stop), name="refresh-flusher")
    install_stop_handlers(stop.set)
    try:
        async with CANDIDATES[name](reader, settings, port):
            gc.collect()
            gc.freeze()  # as `userembed serve` does
            await stop.wait()
    finally:
        stop.set()
        await flusher
        await store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("candidate", choices=sorted(CANDIDATES))
    parser.add_argument("port", type=int)
    args = parser.parse_args()
    run_loop(serve_candidate(args.candidate, args.port))


if __name__ == "__main__":
    main()
