"""/docs and /redoc work without internet: a real `userembed serve` references only its
own assets and serves them, and headless Chromium, with every host but loopback made
unresolvable, renders the operations from them."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models.registry import ModelArtifact
from service.store.redis_server import free_port
from tests.processes import userembed, wait_for

pytestmark = [pytest.mark.slow]

OPERATIONS = ("/v1/users/{user_id}/embedding", "/v1/embeddings:batchGet", "/v1/events")
ASSETS = {
    "docs": {
        "swagger-ui-bundle.js": ("text/javascript", b"SwaggerUIBundle"),
        "swagger-ui.css": ("text/css", b".swagger-ui"),
        "favicon.png": ("image/png", b"\x89PNG"),
    },
    "redoc": {
        "redoc.standalone.js": ("text/javascript", b"Redoc"),
        "favicon.png": ("image/png", b"\x89PNG"),
    },
}


@pytest.fixture(scope="module")
def api(standin: ModelArtifact) -> Iterator[str]:
    """`userembed serve` on the embedded store, with API keys (the docs stay open)."""
    port = free_port()
    env = {
        "USEREMBED_REDIS_URL": "memory://",
        "USEREMBED_REGISTRY_PATH": str(standin.directory.parent),
        "USEREMBED_API_EVENTS_ENABLED": "false",
        "USEREMBED_API_KEYS": '["secret"]',
    }
    with userembed("serve", "--port", str(port), "--grpc-port", "0", env=env) as process:
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: httpx.get(f"{url}/healthz").status_code == 200, 60, "serve up")
        yield url
        assert process.poll() is None, process.output()[-3000:]


@pytest.mark.parametrize("page", ["docs", "redoc"])
def test_pages_reference_only_local_assets_and_they_are_served(api: str, page: str) -> None:
    html = httpx.get(f"{api}/{page}").text
    assert "://" not in html  # no CDN, no fonts service, no favicon from elsewhere
    referenced = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sorted(referenced) == sorted(f"/docs/assets/{name}" for name in ASSETS[page])
    for name, (media_type, marker) in ASSETS[page].items():
        answer = httpx.get(f"{api}/docs/assets/{name}")  # no API key: the docs are open
        assert answer.status_code == 200, name
        assert answer.headers["content-type"].split(";")[0] == media_type
        assert marker in answer.content[:200_000]
    assert "url: '/openapi.json'" in html or 'spec-url="/openapi.json"' in html


def test_unknown_assets_are_404_in_the_envelope(api: str) -> None:
    answer = httpx.get(f"{api}/docs/assets/app.py")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "not_found"


def chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if found := shutil.which(name):
            return found
    if os.environ.get("CI"):
        pytest.fail("chromium is required in CI (.ci/run installs it)")
    pytest.skip("chromium is not installed (apt-get install chromium)")


@pytest.mark.parametrize("page", ["docs", "redoc"])
def test_headless_chromium_renders_the_operations_offline(
    api: str, page: str, tmp_path: Path
) -> None:
    rendered = subprocess.run(
        [
            chromium(),
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            f"--user-data-dir={tmp_path}",
            # an air-gapped cluster: nothing but loopback resolves
            "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
            "--virtual-time-budget=5000",
            "--dump-dom",
            f"{api}/{page}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    dom = rendered.stdout
    missing = [operation for operation in OPERATIONS if operation not in dom]
    assert missing == [], dom[-2000:]
    assert "Failed to load API definition" not in dom
