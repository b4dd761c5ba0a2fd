"""The client library next to what a ranker would write by hand with httpx: what
``userembed.AsyncClient`` costs per call and per batch.

Both sides send the same requests to the same server (the client's wire format:
``encoding=base64_float16``), over an ``httpx.AsyncClient`` pool of one connection per
task, and decode the answer with orjson and numpy into what a ranker uses: a float
vector, or the batch's ``(n, dim)`` matrix. So the difference is the client's own work
(options, deadline, retry and hedge wrappers, result objects, the float32 copy), not
the server's or the wire's. Same draws as the API rows of that level; each pair measured
in turns. Both sides share httpx's costs, its connection pool's included, which grow
with the connections it holds. Printed, never asserted.
"""

from __future__ import annotations

import binascii
from collections.abc import Sequence
from typing import Final

import httpx
import numpy as np
import orjson

from service.bench.loadgen import BenchRow, Request, Target, measure_in_turns, print_row, ratio
from userembed import AsyncClient, UserembedError
from userembed.http_transport import BATCH_PATH

CLIENT_TIMEOUT_S: Final = 10.0  # errors are errors, not a loaded machine's slow answers
_JSON: Final = {"content-type": "application/json"}


def client_get(client: AsyncClient) -> Request:
    async def get(user_id: str) -> bool:
        try:
            embedding = await client.get(user_id)
        except UserembedError:
            return False
        return embedding.status == "fresh"

    return get


def client_get_many(client: AsyncClient) -> Request:
    async def get_many(user_ids: list[str]) -> bool:
        try:
            batch = await client.get_many(user_ids)
        except UserembedError:
            return False
        return bool(batch.found.all()) and batch.matrix().shape[0] == len(user_ids)

    return get_many


def httpx_get(http: httpx.AsyncClient) -> Request:
    """GET, JSON, base64 float16 -> a float32 vector: the client's work, by hand."""

    async def get(user_id: str) -> bool:
        try:
            response = await http.get(f"/v1/users/{user_id}/embedding?encoding=base64_float16")
        except httpx.HTTPError:
            return False
        if response.status_code != 200:
            return False
        body = orjson.loads(response.content)
        vector = np.frombuffer(binascii.a2b_base64(body["embedding"]), "<f2").astype(np.float32)
        return body["status"] == "fresh" and vector.size > 0

    return get


def httpx_batch(http: httpx.AsyncClient) -> Request:
    """POST batchGet with base64 float16, decoded into one float16 ``(n, dim)`` matrix."""

    async def batch(user_ids: list[str]) -> bool:
        body = orjson.dumps({"user_ids": user_ids, "encoding": "base64_float16"})
        try:
            response = await http.post(BATCH_PATH, content=body, headers=_JSON)
        except httpx.HTTPError:
            return False
        if response.status_code != 200:
            return False
        rows = orjson.loads(response.content)["embeddings"]
        packed = b"".join(binascii.a2b_base64(r["embedding"]) for r in rows)
        matrix = np.frombuffer(packed, "<f2").reshape(len(rows), -1)
        return matrix.shape[0] == len(user_ids)

    return batch


async def client_section(
    url: str,
    c: int,
    draws: Sequence[Sequence[str]],
    groups: Sequence[Sequence[list[str]]] | None,
    duration_s: float,
    rounds: int,
    width: int,
) -> list[BenchRow]:
    """client-get vs httpx-get, and (with ``groups``) client-get_many-bN vs
    httpx-batch-bN, at ``c`` tasks, each pair in turns; printed with the client's
    overhead."""
    limits = httpx.Limits(max_connections=c, max_keepalive_connections=c)
    rows: list[BenchRow] = []
    async with (
        AsyncClient(url, timeout=CLIENT_TIMEOUT_S, max_connections=c) as client,
        httpx.AsyncClient(base_url=url, limits=limits, timeout=CLIENT_TIMEOUT_S) as http,
    ):
        pairs = [
            (
                Target("client-get", [client_get(client)] * c, draws),
                Target("httpx-get", [httpx_get(http)] * c, draws),
            ),
        ]
        if groups is not None:
            n = len(groups[0][0])
            pairs.append(
                (
                    Target(f"client-get_many-b{n}", [client_get_many(client)] * c, groups),
                    Target(f"httpx-batch-b{n}", [httpx_batch(http)] * c, groups),
                )
            )
        for pair in pairs:
            mine, base = await measure_in_turns(pair, duration_s, rounds)
            print_row(mine, width)
            print_row(base, width)
            # the loop is bound by the load generator: its time per call is 1 / (req/s)
            per_call_us = (1 / mine.rps - 1 / base.rps) * 1e6 if mine.rps and base.rps else 0
            print(
                f"  client overhead c={c}: {mine.target} vs {base.target}"
                f" p50 {(mine.p50_ms - base.p50_ms) * 1e3:+.0f} us"
                f" (x{ratio(mine.p50_ms, base.p50_ms)}), req/s x{ratio(mine.rps, base.rps)}"
                f" ({per_call_us:+.0f} us of load generator time per call)",
                flush=True,
            )
            rows += [mine, base]
    return rows
