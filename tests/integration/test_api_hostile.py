"""Hostile clients against the real protocol stack: uvicorn with the API's httptools
protocol on a real port (raw sockets where the behaviour is the protocol's), and the gRPC
server on another. Slow heads and bodies, huge declared or streamed bodies, huge headers,
deep JSON, duplicate credentials, oversized gRPC messages: each is answered in the error
envelope (or closed), at once or within the server's own timeouts, and the server keeps
serving.

The server's timeouts are set to 0.5 s here; the tests wait at most a few seconds for
what it does (never a latency threshold of their own)."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import numpy as np
import orjson
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.app import create_app
from service.api.cold_start import ColdStart
from service.api.grpc_service import start_grpc_server
from service.api.proto.userembed.v1 import embeddings_pb2 as pb
from service.api.proto.userembed.v1 import embeddings_pb2_grpc as pb_grpc
from service.api.reads import EmbeddingReader
from service.api.server import EmbeddedServer, http_config
from service.ingest.updater import InProcessEventSource
from service.settings import Settings
from service.store.memory import MemoryStore
from service.store.redis_server import free_port

COLD = ColdStart(np.full(8, 0.5, dtype=np.float32), "m1")
KEY = b"Authorization: Bearer k1\r\n"
WAIT_S = 5.0  # how long a test waits for what the server does in 0.5 s
SETTINGS = Settings(
    api_keys=["k1"],
    api_head_timeout_s=0.5,
    api_body_timeout_s=0.5,
    batch_get_max_ids=20,
    api_events_max=5,
)
LIMIT = SETTINGS.api_max_body_bytes


@dataclass
class Live:
    port: int
    url: str


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    """The API served by uvicorn in a thread (its own event loop) on a free port."""
    port = free_port()
    holder: dict[str, EmbeddedServer] = {}
    ready = threading.Event()

    async def serve() -> None:
        app = create_app(MemoryStore(), SETTINGS, lambda: COLD, event_sink=InProcessEventSource())
        server = holder["server"] = EmbeddedServer(http_config(app, "127.0.0.1", port))
        ready.set()
        await server.serve()

    thread = threading.Thread(target=asyncio.run, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(10)
    deadline = time.monotonic() + 10
    while not holder["server"].started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield Live(port, f"http://127.0.0.1:{port}")
    holder["server"].should_exit = True
    thread.join(10)


def connect(live: Live) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", live.port))
    sock.settimeout(WAIT_S)
    return sock


def read_until_closed(sock: socket.socket) -> tuple[bytes, bool]:
    """(everything the server sent, whether it closed the connection) within WAIT_S."""
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return received, False
    except ConnectionResetError:
        return received, True
    return received, True


def exchange(live: Live, data: bytes) -> tuple[int, dict[str, str], bytes, bool]:
    """Send ``data`` on a new connection: (status, headers, body, closed by the server)."""
    with connect(live) as sock:
        if data:
            sock.sendall(data)
        received, closed = read_until_closed(sock)
    return (*parse_response(received), closed)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One whole response (by its Content-Length) from a kept-alive connection."""
    received = b""
    while b"\r\n\r\n" not in received:
        received += sock.recv(65536)
    status, headers, body = parse_response(received)
    while len(body) < int(headers["content-length"]):
        body += sock.recv(65536)
    return status, headers, body


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    if not raw:
        return 0, {}, b""
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines)}
    return int(status_line.split()[1]), headers, body


def error_of(body: bytes) -> dict[str, Any]:
    error: dict[str, Any] = orjson.loads(body)["error"]
    assert set(error) <= {"code", "message", "details"}, error
    return error


def post(path: str, body: bytes, *headers: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n".encode()
        + KEY
        + b"".join(headers)
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )


def chunked(body: bytes, size: int = 65536) -> bytes:
    parts = [
        f"{len(body[i : i + size]):x}\r\n".encode() + body[i : i + size] + b"\r\n"
        for i in range(0, len(body), size)
    ]
    return b"".join(parts) + b"0\r\n\r\n"


GET = b"GET /v1/users/u1/embedding HTTP/1.1\r\nHost: t\r\n" + KEY


# --- the request head -------------------------------------------------------------


def test_a_half_sent_head_is_answered_408_and_closed(live: Live) -> None:
    status, _, body, closed = exchange(live, b"GET /v1/users/u1/embedding HTTP/1.1\r\nHost: t")
    assert (status, closed) == (408, True)
    assert error_of(body)["code"] == "request_timeout"


def test_slowloris_heads_are_all_closed(live: Live) -> None:
    """40 connections, each sending its head a few bytes at a time and never finishing:
    every one is closed by the head timeout (counted from the head's first byte, not
    reset by each byte)."""
    socks = [connect(live) for _ in range(40)]
    try:
        for sock in socks:
            sock.sendall(b"GET /v1/users/u1/embedding HTTP/1.1\r\n")
        closed = [False] * len(socks)
        deadline = time.monotonic() + WAIT_S
        while not all(closed) and time.monotonic() < deadline:
            for i, sock in enumerate(socks):
                if closed[i]:
                    continue
                try:
                    sock.sendall(b"X-a: b\r\n")
                    sock.settimeout(0.01)
                    closed[i] = sock.recv(65536).startswith(b"HTTP/1.1 408") or closed[i]
                except TimeoutError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    closed[i] = True
            time.sleep(0.05)
        assert all(closed), f"{closed.count(False)} of {len(socks)} still open"
    finally:
        for sock in socks:
            sock.close()


def test_a_connection_that_sends_nothing_is_closed_silently(live: Live) -> None:
    assert exchange(live, b"") == (0, {}, b"", True)


def test_blank_lines_do_not_keep_a_connection_open(live: Live) -> None:
    """Leading CRLFs (which the parser skips) neither start a head nor reset a timer."""
    with connect(live) as sock:
        sock.sendall(GET + b"\r\n")
        assert read_response(sock)[0] == 200
        deadline = time.monotonic() + WAIT_S
        closed = False
        while not closed and time.monotonic() < deadline:
            try:
                sock.sendall(b"\r\n")
                sock.settimeout(0.05)
                closed = sock.recv(65536) == b""
            except TimeoutError:
                pass
            except (BrokenPipeError, ConnectionResetError):
                closed = True
        assert closed


def test_a_huge_header_is_431_and_closed(live: Live) -> None:
    big = GET + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    status, _, body, closed = exchange(live, big)
    assert (status, closed) == (431, True)
    assert error_of(body) == {
        "code": "headers_too_large",
        "message": "request line and headers over 16384 bytes",
    }


def test_a_header_trickled_past_the_limit_is_431_before_it_completes(live: Live) -> None:
    """httptools buffers a header until it ends: the bytes of an unfinished head count."""
    with connect(live) as sock:
        sock.sendall(GET + b"X-Big: ")
        for _ in range(12):  # 12 x 2 KiB: the limit is 16 KiB
            sock.sendall(b"a" * 2048)
            time.sleep(0.01)
        received, closed = read_until_closed(sock)
    status, _, body = parse_response(received)
    assert (status, closed) == (431, True)
    assert error_of(body)["code"] == "headers_too_large"


def test_many_headers_within_the_limit_are_served(live: Live) -> None:
    headers = b"".join(f"X-H{i}: {'v' * 50}\r\n".encode() for i in range(100))  # ~6 KiB
    status, _, _, _ = exchange(live, GET + headers + b"Connection: close\r\n\r\n")
    assert status == 200


def test_garbage_is_a_400_in_the_envelope(live: Live) -> None:
    status, headers, body, closed = exchange(live, b"\x00\x01NOT HTTP\r\n\r\n")
    assert (status, closed) == (400, True)
    assert headers["content-type"] == "application/json"
    assert error_of(body)["code"] == "invalid_request"


# --- keep-alive and split requests still work --------------------------------------


def test_keep_alive_and_requests_split_across_packets_are_served(live: Live) -> None:
    with connect(live) as sock:
        for _ in range(3):
            sock.sendall(GET + b"\r\n")
            assert read_response(sock)[0] == 200
            time.sleep(0.1)  # idle between requests, under keep-alive and the timeouts
        head, body = post("/v1/embeddings:batchGet", b'{"user_ids": ["u1", "u2"]}').split(
            b"\r\n\r\n"
        )
        for part in (head[:20], head[20:] + b"\r\n\r\n", body[:5], body[5:]):
            sock.sendall(part)
            time.sleep(0.05)
        status, _, answer = read_response(sock)
    assert status == 200
    assert [e["user_id"] for e in orjson.loads(answer)["embeddings"]] == ["u1", "u2"]


# --- bodies ------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/embeddings:batchGet", "/v1/events"])
def test_a_declared_oversized_body_is_413_at_once(live: Live, path: str) -> None:
    """Content-Length far over the limit and no body sent: 413 before any of it is read
    (not a 408 once the body timeout passes), and the connection closed."""
    head = post(path, b"").replace(b"Content-Length: 0", b"Content-Length: 100000000")
    status, headers, body, closed = exchange(live, head)
    assert (status, closed) == (413, True)
    assert headers["connection"] == "close"
    assert error_of(body) == {
        "code": "request_too_large",
        "message": f"request body over {LIMIT} bytes",
    }


@pytest.mark.parametrize("path", ["/v1/embeddings:batchGet", "/v1/events"])
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_20_mb_body_is_413_and_the_client_reads_it(live: Live, path: str, framing: str) -> None:
    """The whole body sent at once: refused by its length (or, chunked, as soon as it
    passes the limit); the client can send it all and then read the answer (the server
    half-closes and drains instead of resetting the connection)."""
    body = b"[" + b"1," * 10_000_000 + b"1]"
    if framing == "chunked":
        request = (
            f"POST {path} HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n".encode()
            + KEY
            + b"\r\n"
            + chunked(body)
        )
    else:
        request = post(path, body)
    with connect(live) as sock:
        sock.sendall(request)  # the server drains what it refused: no broken pipe
        received, closed = read_until_closed(sock)
    status, _, answer = parse_response(received)
    assert (status, closed) == (413, True)
    assert error_of(answer)["code"] == "request_too_large"


def test_a_half_sent_body_is_answered_408_and_closed(live: Live) -> None:
    head = post("/v1/events", b"").replace(b"Content-Length: 0", b"Content-Length: 100")
    status, _, body, closed = exchange(live, head + b'[{"event_id": ')
    assert (status, closed) == (408, True)
    assert error_of(body)["code"] == "request_timeout"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (
            "/v1/embeddings:batchGet",
            b'{"user_ids": ["u1"], "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
        ),
        ("/v1/embeddings:batchGet", b"[" * 100_000 + b"]" * 100_000),
        ("/v1/events", b"[" * 100_000 + b"]" * 100_000),
        ("/v1/events", b'[{"event_id": "e", "x": ' + b"{" * 50_000),
    ],
)
def test_deep_json_is_400_with_a_reason(live: Live, path: str, body: bytes) -> None:
    status, headers, answer, _ = exchange(live, post(path, body, b"Connection: close\r\n"))
    assert status == 400
    assert headers["content-type"] == "application/json"
    error = error_of(answer)
    assert error["code"] == "invalid_request"
    assert "levels deep; at most 32 levels are accepted" in error["message"]


def test_the_server_still_serves_after_all_that(live: Live) -> None:
    status, _, _, _ = exchange(live, GET + b"Connection: close\r\n\r\n")
    assert status == 200


# --- credentials -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ([("Authorization", "Bearer k1")], 200),
        ([("Authorization", "Bearer nope"), ("Authorization", "Bearer k1")], 400),
        ([("Authorization", "Bearer k1"), ("Authorization", "Bearer k1")], 400),
        ([("Authorization", "Bearer k1, Bearer k1")], 401),
        ([("Authorization", "Bearer k1 k1")], 401),
        ([("Authorization", "Bearer")], 401),
        ([("Authorization", "Basic k1")], 401),
        ([("Authorization", "k1")], 401),
        ([], 401),
    ],
)
async def test_exactly_one_valid_authorization_header_passes(
    live: Live, headers: list[tuple[str, str]], status: int
) -> None:
    async with httpx.AsyncClient(base_url=live.url) as client:
        get = await client.get("/v1/users/u1/embedding", headers=headers)
        batch = await client.post(
            "/v1/embeddings:batchGet", json={"user_ids": ["u1"]}, headers=headers
        )
    assert (get.status_code, batch.status_code) == (status, status)
    if status != 200:
        assert get.json()["error"]["code"] in {"invalid_request", "unauthenticated"}


# --- gRPC --------------------------------------------------------------------------


@dataclass
class Grpc:
    stub: pb_grpc.EmbeddingsStub
    store: MemoryStore


@pytest.fixture
async def grpc_api() -> AsyncIterator[Grpc]:
    settings = Settings(
        api_keys=["k1"],
        batch_get_max_ids=200,
        api_max_body_bytes=64 * 1024,
        api_grpc_max_send_bytes=4096,
    )
    store = MemoryStore()
    reader = EmbeddingReader.from_settings(store, settings, lambda: COLD)
    server, port = await start_grpc_server(reader, settings, "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Grpc(pb_grpc.EmbeddingsStub(channel), store)
    finally:
        await channel.close()
        await server.stop(grace=None)


AUTH = (("authorization", "Bearer k1"),)


async def test_grpc_messages_over_the_limits_are_resource_exhausted(grpc_api: Grpc) -> None:
    """A request over the receive limit and an answer over the send limit fail that call
    with RESOURCE_EXHAUSTED; the server answers the next one."""
    big = pb.BatchGetEmbeddingsRequest(user_ids=[f"user-{i:0120d}" for i in range(3000)])
    assert big.ByteSize() > 200 * 512  # over max(api_max_body_bytes, 512 per id allowed)
    with pytest.raises(grpc.aio.AioRpcError) as too_big:
        await grpc_api.stub.BatchGetEmbeddings(big, metadata=AUTH)
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    many = pb.BatchGetEmbeddingsRequest(user_ids=[f"u{i}" for i in range(200)])
    with pytest.raises(grpc.aio.AioRpcError) as answer_too_big:
        await grpc_api.stub.BatchGetEmbeddings(many, metadata=AUTH)
    assert answer_too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

    small = await grpc_api.stub.BatchGetEmbeddings(
        pb.BatchGetEmbeddingsRequest(user_ids=["u1", "u2"]), metadata=AUTH
    )
    assert [e.user_id for e in small.embeddings] == ["u1", "u2"]


@pytest.mark.parametrize(
    ("metadata", "code"),
    [
        ((("authorization", "Bearer nope"), ("authorization", "Bearer k1")), "INVALID_ARGUMENT"),
        ((("authorization", "Bearer k1"), ("authorization", "Bearer k1")), "INVALID_ARGUMENT"),
        ((("authorization", "Bearer k1 k1"),), "UNAUTHENTICATED"),
        ((("authorization", "Basic k1"),), "UNAUTHENTICATED"),
        ((), "UNAUTHENTICATED"),
        (AUTH, "OK"),
    ],
)
async def test_grpc_needs_exactly_one_valid_authorization(
    grpc_api: Grpc, metadata: tuple[tuple[str, str], ...], code: str
) -> None:
    try:
        await grpc_api.stub.GetEmbedding(pb.GetEmbeddingRequest(user_id="u1"), metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        assert exc.code().name == code
    else:
        assert code == "OK"


async def test_grpc_health_with_keys_needs_exactly_one_authorization() -> None:
    settings = Settings(api_keys=["k1"], api_auth_ops=True)
    reader = EmbeddingReader.from_settings(MemoryStore(), settings, lambda: COLD)
    server, port = await start_grpc_server(reader, settings, "127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    health = health_pb2_grpc.HealthStub(channel)
    codes = []
    try:
        for metadata in (AUTH, (("authorization", "Bearer nope"), *AUTH), (*AUTH, *AUTH)):
            try:
                await health.Check(health_pb2.HealthCheckRequest(), metadata=metadata)
                codes.append("OK")
            except grpc.aio.AioRpcError as exc:
                codes.append(exc.code().name)
    finally:
        await channel.close()
        await server.stop(grace=None)
    assert codes == ["OK", "UNAUTHENTICATED", "UNAUTHENTICATED"]
