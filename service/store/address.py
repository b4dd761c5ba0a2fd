"""Where the store lives: a ``redis://`` node or a ``redis+cluster://`` cluster.

``redis://[user:pass@]host:port/db`` (``rediss://`` for TLS, ``unix://`` for a socket)
is one node; ``redis+cluster://[user:pass@]host1:port1,host2:port2`` (``rediss+cluster://``
for TLS) is a Redis Cluster seeded from any of its nodes. The topology is said in the
URL, never guessed; a mismatch is found at start-up and told in one sentence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import parse_qs, unquote

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

CLUSTER_SCHEMES: Final = ("redis+cluster://", "rediss+cluster://")
NODE_SCHEMES: Final = ("redis://", "rediss://", "unix://")
# TLS options a cluster URL may carry as query parameters (as redis:// URLs do).
_TLS_OPTIONS: Final = ("ssl_ca_certs", "ssl_cert_reqs", "ssl_certfile", "ssl_keyfile")
MAX_CONNECTIONS_PER_NODE: Final = 1024


@dataclass(frozen=True, slots=True)
class RedisAddress:
    url: str
    cluster: bool
    nodes: tuple[tuple[str, int], ...] = ()
    tls: bool = False
    username: str | None = None
    password: str | None = None
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, url: str) -> RedisAddress:
        """Parse ``url``; ValueError with the fix when it cannot name a store."""
        if url.startswith(NODE_SCHEMES):
            return cls(url, cluster=False)
        if not url.startswith(CLUSTER_SCHEMES):
            raise ValueError(
                f"unsupported redis_url {redact(url)!r}: use redis://host:port/db, rediss://, "
                "unix://, redis+cluster://host:port[,host:port...], rediss+cluster:// or memory://"
            )
        scheme, rest = url.split("://", 1)
        rest, _, query = rest.partition("?")
        netloc, _, path = rest.partition("/")
        if path not in ("", "0"):
            raise ValueError(
                f"a Redis Cluster has only database 0: drop '/{path}' from {redact(url)!r}"
            )
        userinfo, _, hosts = netloc.rpartition("@")
        username, _, password = userinfo.partition(":")
        nodes = []
        for node in filter(None, hosts.split(",")):
            host, _, port = node.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"cluster node {node!r} in {redact(url)!r} is not host:port")
            nodes.append((host.strip("[]"), int(port)))
        if not nodes:
            raise ValueError(f"{redact(url)!r} names no node: redis+cluster://host:port[,...]")
        params = parse_qs(query)
        unknown = sorted(set(params) - set(_TLS_OPTIONS))
        if unknown:
            raise ValueError(f"unsupported options {unknown} in {redact(url)!r}: {_TLS_OPTIONS}")
        return cls(
            url,
            cluster=True,
            nodes=tuple(nodes),
            tls=scheme == "rediss+cluster",
            username=unquote(username) or None,
            password=unquote(password) or None,
            options=tuple((k, v[-1]) for k, v in sorted(params.items())),
        )

    @property
    def shown(self) -> str:
        """The URL without its password, fit for logs and errors."""
        return redact(self.url)

    def is_cluster_sentence(self) -> str:
        host = self.url.split("://", 1)[1].rpartition("@")[2].split("/")[0]
        scheme = "rediss+cluster" if self.url.startswith("rediss://") else "redis+cluster"
        return (
            f"{self.shown} is a node of a Redis Cluster (it answers for some slots only): "
            f"set USEREMBED_REDIS_URL={scheme}://{host}[,host:port...]"
        )

    def not_cluster_sentence(self) -> str:
        host, port = self.nodes[0]
        return (
            f"{self.shown} names a Redis Cluster but {host}:{port} is not in cluster mode: "
            f"set USEREMBED_REDIS_URL=redis://{host}:{port}/0"
        )


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, hosts = rest.partition("@") if "@" in rest.split("/", 1)[0] else ("", "", rest)
    if not at or ":" not in userinfo:
        return url
    return f"{scheme}{sep}{userinfo.split(':', 1)[0]}:***@{hosts}"


def connect(address: RedisAddress, timeout_s: float) -> aioredis.Redis | RedisCluster:
    """A client for ``address`` with every call bounded by ``timeout_s`` and one quick
    retry (a cluster client also follows MOVED/ASK and reloads the topology)."""
    retry = Retry(ExponentialBackoff(cap=timeout_s / 4, base=0.002), retries=1)
    if not address.cluster:
        return aioredis.Redis.from_url(
            address.url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=retry,
            decode_responses=False,
        )
    options = dict(address.options)
    return RedisCluster(
        startup_nodes=[ClusterNode(host, port) for host, port in address.nodes],
        username=address.username,
        password=address.password,
        ssl=address.tls,
        ssl_ca_certs=options.get("ssl_ca_certs"),
        ssl_cert_reqs=options.get("ssl_cert_reqs", "required"),
        ssl_certfile=options.get("ssl_certfile"),
        ssl_keyfile=options.get("ssl_keyfile"),
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=timeout_s / 4, base=0.002), retries=2),
        max_connections=MAX_CONNECTIONS_PER_NODE,
        decode_responses=False,
    )
