"""The model a worker serves: a verified, warmed-up runtime plus the map into its space.

A retrained version that carries alignment.npy is served in its parent's space
(recursively, see :func:`models.registry.served_space`), so rankers trained on the
old space keep working; every record names both the model and the space.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.registry import load_artifact, served_space
from service.core.features import FeatureState
from service.core.tensors import Tensors, assemble
from service.worker.runtime import ModelRuntime, OnnxModelRuntime, Precision

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ServingModel:
    runtime: ModelRuntime
    space_version: str
    to_space: npt.NDArray[np.float32] | None = None  # [d, d]: served = inferred @ to_space
    normalized: bool = True

    @property
    def version(self) -> str:
        return self.runtime.version

    def embed(self, tensors: Tensors) -> npt.NDArray[np.float32]:
        """[batch, d] float32 embeddings, expressed in ``space_version``."""
        vectors = self.runtime.infer(tensors)
        return vectors if self.to_space is None else vectors @ self.to_space

    @classmethod
    def unaligned(cls, runtime: ModelRuntime, normalized: bool = True) -> ServingModel:
        return cls(runtime=runtime, space_version=runtime.version, normalized=normalized)


def warm_up(model: ServingModel, batch_sizes: Sequence[int]) -> None:
    """Run the model once per batch size, so the first real batch pays no allocation
    or kernel-selection cost (and a broken graph fails here, not on live traffic)."""
    for size in batch_sizes:
        tensors = assemble([FeatureState.empty()] * size, 0, model.runtime.schema)
        out = model.embed(tensors)
        if out.shape != (size, model.runtime.output_dim) or not np.isfinite(out).all():
            raise ValueError(
                f"model {model.version}: warm-up gave {out.shape} (finite={np.isfinite(out).all()})"
            )


def load_serving_model(
    root: Path,
    version: str | None = None,
    *,
    precision: Precision = "auto",
    intra_op_threads: int = 0,
    warm_up_batches: Sequence[int] = (1,),
) -> ServingModel:
    """Verify ``version`` (default: CURRENT), build its runtime and space map, warm it up.

    Raises :class:`models.registry.RegistryError` (or ValueError / an ONNX Runtime
    error) for an artifact that must not be served.
    """
    artifact = load_artifact(root, version)
    runtime = OnnxModelRuntime.from_artifact(
        artifact, precision=precision, intra_op_threads=intra_op_threads
    )
    space, to_space = served_space(root, artifact)
    model = ServingModel(runtime, space, to_space, artifact.manifest.normalized)
    warm_up(model, warm_up_batches)
    log.info(
        "event=model_ready version=%s space=%s provider=%s precision=%s",
        model.version,
        model.space_version,
        runtime.provider,
        runtime.precision,
    )
    return model
