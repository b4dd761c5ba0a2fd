"""Fitting a new version's alignment: embed the same users with both ONNX models, then
Procrustes. It needs inference, so it lives with the runtime, not in the registry."""

from __future__ import annotations

from collections.abc import Sequence

from models.alignment import FittedAlignment, procrustes
from models.registry import ModelArtifact
from service.core.features import FeatureState
from service.core.tensors import InputSchema, assemble
from service.worker.runtime import OnnxModelRuntime


def fit_to_parent(
    parent: ModelArtifact,
    onnx_bytes: bytes,
    schema: InputSchema,
    states: Sequence[FeatureState],
    now_ms: int,
) -> FittedAlignment:
    """Embed ``states`` with the new graph and the parent (each with its own schema) and
    fit the orthogonal map from the new space onto the parent's."""
    new_runtime = OnnxModelRuntime(onnx_bytes, version="new", schema=schema, prefer_gpu=False)
    old_runtime = OnnxModelRuntime.from_artifact(parent, prefer_gpu=False)
    new = new_runtime.infer(assemble(states, now_ms, schema))
    old = old_runtime.infer(assemble(states, now_ms, old_runtime.schema))
    return procrustes(new, old)
