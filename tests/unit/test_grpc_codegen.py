"""The committed gRPC code is what `make proto` generates from the committed .proto."""

from __future__ import annotations

import pytest

from service.api.grpc_codegen import GENERATED, ROOT, stale_files


def test_generated_grpc_code_is_current() -> None:
    pytest.importorskip("grpc_tools", reason="grpcio-tools (the dev extra) generates the code")
    assert all((ROOT / path).is_file() for path in GENERATED)
    assert stale_files() == [], "run `make proto` and commit the result"
