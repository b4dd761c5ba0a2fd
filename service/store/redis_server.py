"""Throwaway redis-servers on free loopback ports, for tests and benchmarks: one node,
or a real Redis Cluster (primaries with replicas, joined by ``redis-cli --cluster create``).

Nothing is persisted; every process is stopped by PID when the context exits.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def free_cluster_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    while True:
        port = free_port()
        if port + 10000 > 65535:
            continue
        try:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        return port


def _binary(name: str) -> str:
    binary = shutil.which(name)
    if binary is None:
        raise RuntimeError(f"{name} is not installed (apt-get install redis-server)")
    return binary


class PortTaken(RuntimeError):
    """The port chosen for a redis-server was taken by someone else before it bound it
    (a free port is only free when it is looked at)."""


def _start_on_a_free_port(
    workdir: Path,
    pick: Callable[[], int] = free_port,
    extra: Sequence[str] = (),
    start_timeout_s: float = 10.0,
    attempts: int = 5,
) -> tuple[int, subprocess.Popen[bytes]]:
    """A redis-server on a port from ``pick``: another one if that port was taken first."""
    for _ in range(attempts - 1):
        port = pick()
        try:
            return port, _start_server(port, workdir, extra, start_timeout_s)
        except PortTaken:
            continue
    port = pick()
    return port, _start_server(port, workdir, extra, start_timeout_s)


def _start_server(
    port: int, workdir: Path, extra: Sequence[str] = (), start_timeout_s: float = 10.0
) -> subprocess.Popen[bytes]:
    log = workdir / f"redis-{port}.log"  # redis logs there, not to stderr
    process = subprocess.Popen(
        [
            _binary("redis-server"),
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
            "--loglevel",
            "warning",
            "--logfile",
            str(log),
            *extra,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        _wait_until_listening(port, process, start_timeout_s, log)
    except BaseException:
        stop_process(process)
        raise
    return process


@contextmanager
def private_redis(port: int | None = None, start_timeout_s: float = 10.0) -> Iterator[str]:
    """Start ``redis-server`` (on ``port``, default a free one) and yield its URL; raise
    RuntimeError if it is not installed."""
    with tempfile.TemporaryDirectory(prefix="userembed-redis-") as workdir:
        if port is None:
            port, process = _start_on_a_free_port(Path(workdir), start_timeout_s=start_timeout_s)
        else:
            process = _start_server(port, Path(workdir), start_timeout_s=start_timeout_s)
        try:
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            stop_process(process)


@dataclass
class LocalCluster:
    """A running local Redis Cluster: its nodes by port, and the URL to reach it."""

    ports: list[int]
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """``redis+cluster://`` with every node as a seed."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def cli(self, *args: str, timeout_s: float = 120.0) -> str:
        """Run ``redis-cli`` with ``args`` and return what it printed; raise on failure."""
        done = subprocess.run(
            [_binary("redis-cli"), *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def node_info(self, port: int) -> list[dict[str, str]]:
        """CLUSTER NODES as seen from ``port``: id, address, flags, master and slots."""
        nodes = []
        for line in self.cli("-p", str(port), "cluster", "nodes", timeout_s=5).splitlines():
            parts = line.split()
            if len(parts) >= 8:
                nodes.append(
                    {
                        "id": parts[0],
                        "port": parts[1].split("@")[0].rsplit(":", 1)[1],
                        "flags": parts[2],
                        "master": parts[3],
                        "slots": " ".join(parts[8:]),
                    }
                )
        return nodes

    def primaries(self) -> list[int]:
        """Ports of the live primaries that own slots, as a live node sees them."""
        for port in self.live_ports():
            try:
                nodes = self.node_info(port)
            except (RuntimeError, subprocess.TimeoutExpired):
                continue
            return sorted(
                int(n["port"])
                for n in nodes
                if "master" in n["flags"] and "fail" not in n["flags"] and n["slots"]
            )
        return []

    def _replicas_in_sync(self) -> bool:
        """Every live replica has finished its sync with its primary (link up)."""
        for port in self.live_ports():
            info = self.cli("-p", str(port), "info", "replication", timeout_s=5)
            if "role:slave" in info and "master_link_status:up" not in info:
                return False
        return True

    def live_ports(self) -> list[int]:
        return [p for p, proc in self.processes.items() if proc.poll() is None]

    def kill(self, port: int) -> None:
        """SIGKILL one node (a crash, not a shutdown)."""
        process = self.processes[port]
        process.kill()
        process.wait()

    def wait_healthy(self, timeout_s: float = 60.0) -> None:
        """Until every live node reports cluster_state:ok with all 16384 slots served and
        every live replica is in sync with its primary."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                infos = [
                    self.cli("-p", str(p), "cluster", "info", timeout_s=5)
                    for p in self.live_ports()
                ]
            except (RuntimeError, subprocess.TimeoutExpired):
                infos = []
            if (
                infos
                and all("cluster_state:ok" in i and "cluster_slots_ok:16384" in i for i in infos)
                and self._replicas_in_sync()
            ):
                return
            time.sleep(0.1)
        raise RuntimeError(f"the local Redis Cluster did not become healthy in {timeout_s}s")


@contextmanager
def private_redis_cluster(
    primaries: int = 3, replicas: int = 1, node_timeout_ms: int = 1000
) -> Iterator[LocalCluster]:
    """Start ``primaries * (1 + replicas)`` cluster-enabled redis-servers on free loopback
    ports, join them with ``redis-cli --cluster create`` and yield the running cluster."""
    cluster = LocalCluster([])
    with tempfile.TemporaryDirectory(prefix="userembed-cluster-") as workdir, ExitStack() as stack:
        for node in range(primaries * (1 + replicas)):
            node_dir = Path(workdir) / f"node{node}"
            node_dir.mkdir()
            port, process = _start_on_a_free_port(
                node_dir,
                free_cluster_port,
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                ],
            )
            stack.callback(stop_process, process)
            cluster.ports.append(port)
            cluster.processes[port] = process
        cluster.cli(
            "--cluster",
            "create",
            *(f"127.0.0.1:{p}" for p in cluster.ports),
            "--cluster-replicas",
            str(replicas),
            "--cluster-yes",
        )
        cluster.wait_healthy()
        yield cluster


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within ``grace_s``."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_until_listening(
    port: int, process: subprocess.Popen[bytes], timeout_s: float, log: Path
) -> None:
    """Until ``process`` answers PING on ``port``; :class:`PortTaken` if it exited because
    the port was in use, RuntimeError with its log for any other exit or a timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            err = process.stderr.read().decode() if process.stderr else ""
            err += log.read_text(errors="replace") if log.exists() else ""
            error = PortTaken if "Address already in use" in err else RuntimeError
            raise error(
                f"redis-server on port {port} exited with {process.returncode}: {err.strip()}"
            )
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"redis-server did not answer on port {port} within {timeout_s}s")
