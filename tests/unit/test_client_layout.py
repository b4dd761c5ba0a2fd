"""The client package stays a client: it imports nothing of the server but the generated
gRPC code, so a ranker's process loads no FastAPI, Redis or ONNX Runtime."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ALLOWED_SERVICE = "service.api.proto.userembed.v1"


def test_userembed_imports_only_the_generated_grpc_code_of_the_server() -> None:
    found = {}
    for path in sorted((ROOT / "userembed").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                if name.split(".")[0] in ("service", "models") and name != ALLOWED_SERVICE:
                    found[path.name] = name
    assert found == {}


def test_a_client_process_loads_no_server_dependency() -> None:
    code = (
        "import sys, userembed\n"
        "userembed.Client('http://127.0.0.1:1').close()\n"
        "userembed.Client('grpc://127.0.0.1:1').close()\n"
        "heavy = ('fastapi', 'starlette', 'redis', 'onnxruntime', 'confluent_kafka',"
        " 'service.api.reads', 'service.core', 'models')\n"
        "print(sorted(m for m in sys.modules if m.startswith(heavy)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
