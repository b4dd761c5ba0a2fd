from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from models.alignment import mean_cosine, procrustes
from models.dataset import Dataset
from models.default import DEFAULT_VERSION, ensure_default_model
from models.export import export_user_tower, torch_embed
from models.registry import (
    ALIGNMENT_FILE,
    MANIFEST_FILE,
    RegistryError,
    current_version,
    install,
    load_artifact,
    publish,
)
from models.standin import publish_standin
from models.train import TrainResult
from service.core.tensors import InputSchema
from service.worker.runtime import OnnxModelRuntime
from tests.unit.models.conftest import publish_trained


def test_export_parity_checker_and_dynamic_batch(
    tiny_trained: TrainResult, tiny_data: Dataset
) -> None:
    tower = tiny_trained.model.user_tower
    exported = export_user_tower(tower, tiny_data.test.features)
    assert exported.parity_max_abs_diff <= 1e-4 and exported.parity_rows == len(tiny_data.test)
    model = onnx.load_model_from_string(exported.onnx_bytes)
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == list(tiny_data.schema.inputs())
    runtime = OnnxModelRuntime(
        exported.onnx_bytes, version="t", schema=tiny_data.schema, prefer_gpu=False
    )
    for batch in (1, 7):
        tensors = {k: v[:batch] for k, v in tiny_data.test.features.items()}
        out = runtime.infer(tensors)
        assert out.shape == (batch, tower.config.output_dim)
        np.testing.assert_allclose(out, torch_embed(tower, tensors), atol=1e-4)


def test_manifest_records_what_serving_needs(
    tmp_path: Path, tiny_trained: TrainResult, tiny_data: Dataset
) -> None:
    artifact = publish_trained(tmp_path, tiny_trained, tiny_data, "sum-1", details={"note": "x"})
    manifest = json.loads((artifact.directory / MANIFEST_FILE).read_text())
    for field in (
        "version",
        "parent_version",
        "input_schema",
        "input_schema_hash",
        "output_dim",
        "sha256",
        "cold_start_embedding",
        "training_metrics",
        "created_at",
    ):
        assert field in manifest
    assert artifact.manifest.schema == tiny_data.schema
    assert OnnxModelRuntime.from_artifact(artifact).output_dim == artifact.manifest.output_dim


def test_sha_mismatch_is_refused(
    tmp_path: Path, tiny_trained: TrainResult, tiny_data: Dataset
) -> None:
    artifact = publish_trained(tmp_path, tiny_trained, tiny_data, "sum-1")
    data = bytearray(artifact.model_path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.model_path.write_bytes(bytes(data))
    with pytest.raises(RegistryError, match=r"sha256 of model\.onnx"):
        load_artifact(tmp_path)


def test_schema_mismatch_is_refused(
    tmp_path: Path, tiny_trained: TrainResult, tiny_data: Dataset
) -> None:
    publish_trained(tmp_path, tiny_trained, tiny_data, "sum-1")
    other = InputSchema(history_length=50)
    with pytest.raises(RegistryError, match="differs from the expected"):
        load_artifact(tmp_path, expected_schema=other)
    assert load_artifact(tmp_path, expected_schema=tiny_data.schema).version == "sum-1"
    # a manifest that lies about the graph's inputs (consistently re-hashed) is refused too
    exported = export_user_tower(tiny_trained.model.user_tower, tiny_data.test.features)
    with pytest.raises(RegistryError, match="graph does not match its schema"):
        publish(
            tmp_path,
            version="liar",
            onnx_bytes=exported.onnx_bytes,
            schema=other,
            output_dim=exported.output_dim,
            cold_start_embedding=[0.0] * exported.output_dim,
        )


def test_procrustes_recovers_a_known_rotation() -> None:
    rng = np.random.default_rng(0)
    parent = rng.standard_normal((300, 16))
    rotation, _ = np.linalg.qr(rng.standard_normal((16, 16)))
    new = parent @ rotation.T + 0.01 * rng.standard_normal((300, 16))  # new = parent rotated
    fitted = procrustes(new, parent)
    np.testing.assert_allclose(fitted.rotation, rotation, atol=1e-2)
    assert fitted.mean_cosine_after > 0.999 > fitted.mean_cosine_before
    assert abs(mean_cosine(new @ fitted.rotation, parent) - fitted.mean_cosine_after) < 1e-9
    with pytest.raises(ValueError, match="same dimension"):
        procrustes(new[:, :8], parent)


def test_publish_with_parent_stores_the_alignment(
    tmp_path: Path, tiny_trained: TrainResult, tiny_data: Dataset
) -> None:
    publish_trained(tmp_path, tiny_trained, tiny_data, "sum-1")
    states = tiny_data.test.states
    child = publish_trained(
        tmp_path,
        tiny_trained,
        tiny_data,
        "sum-2",
        parent_version="sum-1",
        alignment_states=states,
        alignment_now_ms=int(tiny_data.test.times.max()),
    )
    alignment = child.manifest.alignment
    assert alignment is not None and alignment.parent_version == "sum-1"
    assert alignment.sample_size == len(states)
    # same weights: the spaces already agree and the fitted map is the identity
    assert alignment.mean_cosine_before > 0.999 and alignment.mean_cosine_after > 0.999
    matrix = child.alignment_matrix()
    assert matrix is not None
    np.testing.assert_allclose(matrix, np.eye(matrix.shape[0]), atol=1e-3)
    (child.directory / ALIGNMENT_FILE).write_bytes(b"tampered")
    with pytest.raises(RegistryError, match=r"alignment\.npy is missing or its sha256"):
        load_artifact(tmp_path, "sum-2")


def test_older_manifests_and_the_standin_still_load(tmp_path: Path) -> None:
    artifact = publish_standin(tmp_path, history_length=3)
    manifest = json.loads((artifact.directory / MANIFEST_FILE).read_text())
    for newer in ("alignment", "details", "files"):
        manifest.pop(newer)
    (artifact.directory / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert load_artifact(tmp_path).manifest.alignment is None


def test_ensure_default_model_installs_once(tmp_path: Path) -> None:
    registry = tmp_path / "registry"
    artifact = ensure_default_model(registry, history_length=50)
    assert artifact.version == DEFAULT_VERSION == current_version(registry)
    assert artifact.manifest.kind == "sum" and artifact.manifest.output_dim == 128
    publish_standin(registry, history_length=3, version="standin-9")
    assert ensure_default_model(registry, history_length=50).version == "standin-9"
    # installing is idempotent and verified
    assert install(registry, artifact, make_current=False).version == DEFAULT_VERSION
