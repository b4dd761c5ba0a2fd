"""Orthogonal Procrustes alignment of a new embedding space onto its parent's.

Retraining rotates the embedding space arbitrarily; downstream rankers trained on
the parent's space would read nonsense. The orthogonal R minimizing
||X R - Y||_F (X = new, Y = parent embeddings of the same users) is U V^T from the
SVD of X^T Y; being orthogonal it keeps norms and angles, so it only removes the
arbitrary rotation, not what the new model learned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from service.tensors import InputSchema, assemble

if TYPE_CHECKING:
    from models.registry import ModelArtifact
    from service.features import FeatureState

FloatArray = npt.NDArray[np.floating]


@dataclass(frozen=True, slots=True)
class FittedAlignment:
    rotation: npt.NDArray[np.float64]  # [d, d], parent ~= new @ rotation
    sample_size: int
    mean_cosine_before: float
    mean_cosine_after: float


def mean_cosine(a: FloatArray, b: FloatArray) -> float:
    """Mean row-wise cosine similarity."""
    num = np.einsum("nd,nd->n", a, b)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-12)))


def procrustes(new: FloatArray, parent: FloatArray) -> FittedAlignment:
    """Fit the orthogonal map from ``new`` [n, d] onto ``parent`` [n, d]."""
    if new.shape != parent.shape:
        raise ValueError(
            f"cannot align embeddings of shape {new.shape} onto {parent.shape}: "
            "an orthogonal map needs the same dimension and the same users"
        )
    x = np.asarray(new, dtype=np.float64)
    y = np.asarray(parent, dtype=np.float64)
    u, _, vt = np.linalg.svd(x.T @ y)
    rotation = u @ vt
    return FittedAlignment(
        rotation=rotation,
        sample_size=int(x.shape[0]),
        mean_cosine_before=mean_cosine(x, y),
        mean_cosine_after=mean_cosine(x @ rotation, y),
    )


def fit_to_parent(
    parent: ModelArtifact,
    onnx_bytes: bytes,
    schema: InputSchema,
    states: Sequence[FeatureState],
    now_ms: int,
) -> FittedAlignment:
    """Embed the same users with both models (each with its own schema) and fit R."""
    from service.runtime import OnnxModelRuntime

    new_runtime = OnnxModelRuntime(onnx_bytes, version="new", schema=schema, prefer_gpu=False)
    old_runtime = OnnxModelRuntime.from_artifact(parent, prefer_gpu=False)
    new = new_runtime.infer(assemble(states, now_ms, schema))
    old = old_runtime.infer(assemble(states, now_ms, old_runtime.schema))
    return procrustes(new, old)
