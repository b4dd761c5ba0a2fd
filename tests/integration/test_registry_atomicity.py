"""A reader polling the registry while versions are published never sees half a version."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from models.registry import RegistryError, list_versions, load_artifact, publish
from models.standin import build_standin
from service.core.tensors import InputSchema

SCHEMA = InputSchema(history_length=4, item_buckets=2_003, category_buckets=11)


def test_reader_never_loads_a_partial_version(tmp_path: Path) -> None:
    versions = 25
    onnx_bytes = [build_standin(SCHEMA, output_dim=8, seed=i) for i in range(versions)]
    stop = threading.Event()
    seen: set[str] = set()
    failures: list[str] = []

    def read() -> None:
        while not stop.is_set():
            try:
                artifact = load_artifact(tmp_path)
            except RegistryError as exc:
                if "is empty" not in str(exc):
                    failures.append(str(exc))
                continue
            seen.add(artifact.version)
            for version in list_versions(tmp_path):  # every listed version is complete
                try:
                    load_artifact(tmp_path, version)
                except RegistryError as exc:
                    failures.append(str(exc))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i, data in enumerate(onnx_bytes):
            publish(
                tmp_path,
                version=f"v{i}",
                onnx_bytes=data,
                schema=SCHEMA,
                output_dim=8,
                cold_start_embedding=[0.0] * 8,
            )
    finally:
        stop.set()
        reader.join()
    assert failures == []
    assert len(seen) >= 2
    assert list_versions(tmp_path) == [f"v{i}" for i in range(versions)]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".") and p.is_dir()]


def test_a_crash_before_the_rename_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    publish(
        tmp_path,
        version="v0",
        onnx_bytes=build_standin(SCHEMA, output_dim=8),
        schema=SCHEMA,
        output_dim=8,
        cold_start_embedding=[0.0] * 8,
    )

    def crash(self: Path, target: Path) -> Path:
        raise OSError("disk full")

    monkeypatch.setattr(Path, "rename", crash)
    with pytest.raises(OSError, match="disk full"):
        publish(
            tmp_path,
            version="v1",
            onnx_bytes=build_standin(SCHEMA, output_dim=8, seed=1),
            schema=SCHEMA,
            output_dim=8,
            cold_start_embedding=[0.0] * 8,
        )
    monkeypatch.undo()
    assert list_versions(tmp_path) == ["v0"]
    assert load_artifact(tmp_path).version == "v0"
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == ["v0"]
