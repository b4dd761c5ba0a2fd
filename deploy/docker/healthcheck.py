"""Container HEALTHCHECK of the one userembed image, whatever role it runs.

Healthy means ready: ``userembed serve`` answers GET /readyz on USEREMBED_API_PORT
(store answers, a model is published); ``ingest`` and ``worker`` answer it on
USEREMBED_METRICS_PORT (the worker once its model is loaded and warmed up).
Exit status 0 when either port says 200, 1 otherwise (Docker's contract).
Standard library only: the runtime image has no curl.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def ready(port: str, timeout_s: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=timeout_s) as r:
            return bool(r.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def main() -> int:
    ports = (
        os.environ.get("USEREMBED_API_PORT", "8000"),
        os.environ.get("USEREMBED_METRICS_PORT", "9400"),
    )
    return 0 if any(ready(port) for port in ports) else 1


if __name__ == "__main__":
    sys.exit(main())
