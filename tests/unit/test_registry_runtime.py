from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from models.registry import (
    FP16_MODEL_FILE,
    MANIFEST_FILE,
    MODEL_FILE,
    ModelArtifact,
    RegistryError,
    current_version,
    load_artifact,
    publish,
)
from models.standin import build_standin, publish_standin
from service.core.features import FeatureState, apply_events
from service.core.tensors import InputSchema, assemble
from service.worker.runtime import CPU, CUDA, OnnxModelRuntime, to_fp16
from tests.helpers import BASE_TS, event, log_of


def test_published_model_is_current_and_verified(standin: ModelArtifact) -> None:
    root = standin.model_path.parent.parent
    assert current_version(root) == "standin-1"
    loaded = load_artifact(root)
    assert loaded.manifest.sha256 == standin.manifest.sha256
    assert loaded.manifest.schema.history_length == 20


def preferred_provider() -> str:
    """What the runtime must pick on this host: CUDA where this onnxruntime has it."""
    available = ort.get_available_providers()
    return next(p for p in (CUDA, CPU) if p in available)


def test_runtime_runs_on_the_preferred_provider_and_outputs_unit_vectors(
    standin: ModelArtifact,
) -> None:
    runtime = OnnxModelRuntime.from_artifact(standin)
    assert runtime.provider == preferred_provider()  # CPU on CI machines, CUDA on a GPU host
    assert runtime.precision == ("fp16" if runtime.provider == CUDA else "fp32")
    histories = [log_of([event(item_id=i, ts=BASE_TS)]) for i in range(1, 4)]
    states = [FeatureState.empty()] + [
        apply_events(FeatureState.empty(), history, 20)[0] for history in histories
    ]
    out = runtime.infer(assemble(states, BASE_TS, runtime.schema))
    assert out.shape == (4, runtime.output_dim) and out.dtype == np.float32
    tolerance = 2e-3 if runtime.precision == "fp16" else 1e-4
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=tolerance)
    assert not np.allclose(out[1], out[2])  # different histories, different users


def test_cold_start_is_the_model_on_an_empty_history(standin: ModelArtifact) -> None:
    runtime = OnnxModelRuntime.from_artifact(standin, precision="fp32")  # as it was computed
    empty = runtime.infer(assemble([FeatureState.empty()], BASE_TS, runtime.schema))[0]
    np.testing.assert_allclose(standin.manifest.cold_start_embedding, empty, atol=1e-6)


def test_same_seed_same_model() -> None:
    schema = InputSchema(history_length=3, item_buckets=11, category_buckets=5)
    assert build_standin(schema, seed=1) == build_standin(schema, seed=1)
    assert build_standin(schema, seed=1) != build_standin(schema, seed=2)


def test_empty_registry_says_so(tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="is empty: publish a model first"):
        load_artifact(tmp_path)


def test_corrupted_model_file_is_refused(tmp_path: Path) -> None:
    artifact = publish_standin(tmp_path, history_length=3)
    with artifact.model_path.open("r+b") as handle:
        handle.seek(100)
        handle.write(b"\xff\xff\xff")
    with pytest.raises(RegistryError, match="refusing a corrupted artifact"):
        load_artifact(tmp_path)


def test_schema_that_does_not_match_its_hash_is_refused(tmp_path: Path) -> None:
    publish_standin(tmp_path, history_length=3)
    manifest_path = tmp_path / "standin-1" / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["input_schema"]["history_length"] = 4
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(RegistryError, match="input schema does not match its hash"):
        load_artifact(tmp_path)


def test_malformed_manifest_and_missing_files_are_refused(tmp_path: Path) -> None:
    publish_standin(tmp_path, history_length=3)
    (tmp_path / "standin-1" / MANIFEST_FILE).write_text("{")
    with pytest.raises(RegistryError, match="malformed"):
        load_artifact(tmp_path)
    publish_standin(tmp_path, version="standin-2", history_length=3)
    (tmp_path / "standin-2" / MODEL_FILE).unlink()
    with pytest.raises(RegistryError, match="missing"):
        load_artifact(tmp_path)


def test_versions_are_immutable_and_names_checked(tmp_path: Path) -> None:
    publish_standin(tmp_path, history_length=3)
    with pytest.raises(RegistryError, match="already exists"):
        publish_standin(tmp_path, history_length=3)
    with pytest.raises(RegistryError, match="invalid model version"):
        publish(
            tmp_path,
            version="../escape",
            onnx_bytes=b"",
            schema=InputSchema(),
            output_dim=1,
            cold_start_embedding=[0.0],
        )


def users_tensors(schema: InputSchema, n: int = 16) -> dict[str, np.ndarray]:
    events = [event(f"u{i % n}", ts=BASE_TS + i, item_id=i) for i in range(4 * n)]
    states = {}
    for e in log_of(events):
        prior = states.get(e.event.user_id, FeatureState.empty())
        states[e.event.user_id] = apply_events(prior, [e], schema.history_length)[0]
    return assemble(list(states.values()), BASE_TS + 10_000, schema)


def test_io_binding_gives_the_same_embeddings_as_plain_runs(standin: ModelArtifact) -> None:
    plain = OnnxModelRuntime.from_artifact(standin, io_binding=False)
    bound = OnnxModelRuntime.from_artifact(standin, io_binding=True)
    tensors = users_tensors(plain.schema)
    np.testing.assert_array_equal(bound.infer(tensors), plain.infer(tensors))


def test_the_fp16_variant_stays_close_to_fp32(standin: ModelArtifact, tmp_path: Path) -> None:
    fp32 = OnnxModelRuntime.from_artifact(standin, precision="fp32")
    converted = OnnxModelRuntime.from_artifact(standin, precision="fp16")
    assert (fp32.precision, converted.precision) == ("fp32", "fp16")
    tensors = users_tensors(fp32.schema)
    np.testing.assert_allclose(converted.infer(tensors), fp32.infer(tensors), atol=5e-3)
    # an artifact that ships its own fp16 graph is served with it
    schema = standin.manifest.schema
    shipped = publish(
        tmp_path,
        version="with-fp16",
        onnx_bytes=standin.model_path.read_bytes(),
        schema=schema,
        output_dim=standin.manifest.output_dim,
        cold_start_embedding=standin.manifest.cold_start_embedding,
        extra_files={FP16_MODEL_FILE: to_fp16(build_standin(schema, seed=4))},
    )
    assert shipped.fp16_model_path is not None
    own = OnnxModelRuntime.from_artifact(shipped, precision="fp16")
    other_weights = OnnxModelRuntime(build_standin(schema, seed=4), version="x", schema=schema)
    np.testing.assert_allclose(own.infer(tensors), other_weights.infer(tensors), atol=5e-3)
    auto = "fp16" if preferred_provider() == CUDA else "fp32"
    assert OnnxModelRuntime.from_artifact(shipped).precision == auto
