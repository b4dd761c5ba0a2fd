"""Locust scenarios of downstream rankers reading embeddings.

Users are drawn from a Zipf distribution over ``u0..u{N-1}`` (a few users take most
reads, as in production). Two user classes:

* ``RankerHttpUser``: GET /v1/users/{id}/embedding (most requests) and
  POST /v1/embeddings:batchGet of ``LOADTEST_BATCH`` users, over HTTP/1.1 keep-alive;
* ``RankerGrpcUser``: GetEmbedding and BatchGetEmbeddings on ``LOADTEST_GRPC_TARGET``.

Environment: ``LOADTEST_USERS`` (10000), ``LOADTEST_ZIPF_S`` (1.1), ``LOADTEST_BATCH``
(100), ``LOADTEST_GRPC_TARGET`` (default: the --host's name, port 50051),
``LOADTEST_API_KEY`` (sent as a bearer key when set). Run headless with
``loadtests/run.sh``. Only the standard library and Locust are needed for HTTP (the
stock locust image works); the gRPC class also needs grpcio and this repository.
"""

from __future__ import annotations

import bisect
import itertools
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import urlsplit

from locust import FastHttpUser, User, constant, events, task

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo, for service.api.proto
try:
    import grpc
    import grpc.experimental.gevent as grpc_gevent

    from service.api.proto.userembed.v1 import embeddings_pb2 as pb
    from service.api.proto.userembed.v1 import embeddings_pb2_grpc as pb_grpc
except ImportError:  # HTTP only
    grpc = None
else:
    grpc_gevent.init_gevent()  # let grpc's blocking calls yield to other greenlets

USERS = int(os.environ.get("LOADTEST_USERS", "10000"))
ZIPF_S = float(os.environ.get("LOADTEST_ZIPF_S", "1.1"))
BATCH = int(os.environ.get("LOADTEST_BATCH", "100"))
GRPC_TARGET = os.environ.get("LOADTEST_GRPC_TARGET", "")
API_KEY = os.environ.get("LOADTEST_API_KEY", "")


class ZipfUsers:
    """User ids with P(rank k) ~ 1/k^s over ``u0..u{users-1}`` (u0 the most read)."""

    _cdf: ClassVar[list[float]] = []

    def __init__(self, users: int, s: float, seed: int) -> None:
        if len(ZipfUsers._cdf) != users:  # shared by every simulated user
            weights = [1.0 / k**s for k in range(1, users + 1)]
            total = sum(weights)
            ZipfUsers._cdf = [c / total for c in itertools.accumulate(weights)]
        self._random = random.Random(seed)

    def draw(self, n: int = 1) -> list[str]:
        cdf, last = ZipfUsers._cdf, len(ZipfUsers._cdf) - 1
        return [f"u{min(bisect.bisect(cdf, self._random.random()), last)}" for _ in range(n)]


class RankerHttpUser(FastHttpUser):
    """A ranker calling the HTTP API back to back (closed loop, no think time)."""

    weight = 3
    wait_time = constant(0)

    def on_start(self) -> None:
        self.users = ZipfUsers(USERS, ZIPF_S, seed=id(self) & 0xFFFF)
        self.headers = {"Authorization": f"Bearer {API_KEY}"} if API_KEY else {}

    @task(9)
    def get_embedding(self) -> None:
        (user_id,) = self.users.draw()
        self.client.get(
            f"/v1/users/{user_id}/embedding",
            headers=self.headers,
            name="GET /v1/users/{id}/embedding",
        )

    @task(1)
    def batch_get(self) -> None:
        self.client.post(
            "/v1/embeddings:batchGet",
            json={"user_ids": self.users.draw(BATCH)},
            headers=self.headers,
            name=f"POST /v1/embeddings:batchGet x{BATCH}",
        )


class RankerGrpcUser(User):
    """The same ranker over gRPC; each call is reported to Locust as a request."""

    weight = 1
    wait_time = constant(0)
    abstract = grpc is None  # not run where grpcio or service.api.proto is missing

    def on_start(self) -> None:
        self.users = ZipfUsers(USERS, ZIPF_S, seed=id(self) & 0xFFFF)
        target = GRPC_TARGET or f"{urlsplit(self.host or '').hostname or '127.0.0.1'}:50051"
        self.channel = grpc.insecure_channel(target)
        self.stub = pb_grpc.EmbeddingsStub(self.channel)
        self.metadata = (("authorization", f"Bearer {API_KEY}"),) if API_KEY else ()

    def on_stop(self) -> None:
        self.channel.close()

    def _call(self, name: str, method: Any, request: Any) -> None:
        started = time.perf_counter()
        exception: Exception | None = None
        length = 0
        try:
            length = method(request, metadata=self.metadata, timeout=5).ByteSize()
        except grpc.RpcError as exc:
            exception = exc
        events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=length,
            exception=exception,
            context={},
        )

    @task(9)
    def get_embedding(self) -> None:
        (user_id,) = self.users.draw()
        self._call("GetEmbedding", self.stub.GetEmbedding, pb.GetEmbeddingRequest(user_id=user_id))

    @task(1)
    def batch_get(self) -> None:
        request = pb.BatchGetEmbeddingsRequest(user_ids=self.users.draw(BATCH))
        self._call(f"BatchGetEmbeddings x{BATCH}", self.stub.BatchGetEmbeddings, request)
