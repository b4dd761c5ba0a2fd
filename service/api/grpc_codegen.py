"""Generate (or check) the committed Python code of the gRPC contract.

``python -m service.api.grpc_codegen`` (``make proto``) regenerates
``service/api/proto/userembed/v1/embeddings_pb2{.py,.pyi,_grpc.py}`` with grpcio-tools;
``--check`` fails when the committed files differ from a fresh generation. The
proto is compiled relative to the repository root, so the generated modules import
each other as ``service.api.proto.userembed.v1``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Final

ROOT: Final = Path(__file__).resolve().parent.parent.parent
PROTO: Final = Path("service/api/proto/userembed/v1/embeddings.proto")
GENERATED: Final = tuple(
    PROTO.with_name(PROTO.stem + suffix) for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
)


def generate(out_root: Path) -> list[Path]:
    """Write the generated files under ``out_root`` (mirroring the repository layout)."""
    from grpc_tools import protoc  # dev dependency (grpcio-tools), imported on use

    args = [
        "grpc_tools.protoc",
        f"--proto_path={ROOT}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_root / path for path in GENERATED]


def stale_files() -> list[Path]:
    """Committed generated files that differ from a fresh generation (or are missing)."""
    with tempfile.TemporaryDirectory(prefix="userembed-proto-") as tmp:
        fresh = generate(Path(tmp))
        return [
            path
            for path, new in zip(GENERATED, fresh, strict=True)
            if not (ROOT / path).is_file() or (ROOT / path).read_bytes() != new.read_bytes()
        ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only check the committed files")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            names = ", ".join(map(str, stale))
            sys.exit(f"generated gRPC code is out of date: {names}; run `make proto`")
        print("generated gRPC code is current")
        return
    for path in generate(ROOT):
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
