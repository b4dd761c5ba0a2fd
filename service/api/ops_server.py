"""Operations endpoint of the non-HTTP roles (ingest, worker) and of the parent of
``serve --workers N``: /metrics, /healthz, /readyz.

A small threaded HTTP server beside the role's event loop, so a probe is
answered even while the loop is busy. /readyz is 200 once ``ready()`` says so
(the worker: model loaded and warmed up), 503 before.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)


def _handler(
    ready: Callable[[], bool], registry: CollectorRegistry
) -> type[BaseHTTPRequestHandler]:
    class OpsHandler(BaseHTTPRequestHandler):
        timeout = 5.0  # a socket read stalled this long ends the connection (and its thread)

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._answer(200, generate_latest(registry), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._answer(200, b'{"status":"ok"}\n', "application/json")
            elif path == "/readyz":
                is_ready = ready()
                body = b'{"status":"ready"}\n' if is_ready else b'{"status":"starting"}\n'
                self._answer(200 if is_ready else 503, body, "application/json")
            else:
                self._answer(404, b'{"error":"not found"}\n', "application/json")

        def _answer(self, status: int, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            return  # probes every few seconds would drown the role's own logs

    return OpsHandler


def serve_ops(
    host: str, port: int, ready: Callable[[], bool], registry: CollectorRegistry = REGISTRY
) -> ThreadingHTTPServer:
    """Start the endpoint on a daemon thread; returns the server (``shutdown()`` stops it).
    /metrics renders ``registry`` (the process's own metrics by default)."""
    server = ThreadingHTTPServer((host, port), _handler(ready, registry))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="ops-http", daemon=True).start()
    log.info("event=ops_serving addr=%s:%d paths=/metrics,/healthz,/readyz", host, port)
    return server
