"""Orthogonal Procrustes alignment of a new embedding space onto its parent's.

Retraining rotates the embedding space arbitrarily; downstream rankers trained on
the parent's space would read nonsense. The orthogonal R minimizing
||X R - Y||_F (X = new, Y = parent embeddings of the same users) is U V^T from the
SVD of X^T Y; being orthogonal it keeps norms and angles, so it only removes the
arbitrary rotation, not what the new model learned.

Pure math: embedding the sample users with both models is the caller's business
(:func:`service.worker.alignment_fit.fit_to_parent`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

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
