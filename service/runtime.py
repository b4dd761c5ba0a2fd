"""The model-runtime seam and its ONNX Runtime implementation (CUDA when present, else CPU)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.tensors import InputSchema, Tensors

if TYPE_CHECKING:
    from models.registry import ModelArtifact

log = logging.getLogger(__name__)

CUDA: Final = "CUDAExecutionProvider"
CPU: Final = "CPUExecutionProvider"


class ModelRuntime(Protocol):
    """Runs one model version on a batch of assembled tensors."""

    @property
    def version(self) -> str: ...

    @property
    def provider(self) -> str:
        """The execution provider actually in use (e.g. CUDAExecutionProvider)."""

    @property
    def output_dim(self) -> int: ...

    @property
    def schema(self) -> InputSchema: ...

    def infer(self, inputs: Tensors) -> npt.NDArray[np.float32]:
        """[batch, output_dim] float32 embeddings."""


def choose_providers(prefer_gpu: bool = True) -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always as the fallback."""
    available = ort.get_available_providers()
    return [CUDA, CPU] if prefer_gpu and CUDA in available else [CPU]


class OnnxModelRuntime:
    """ONNX Runtime session over a model file, reporting the provider it really got."""

    def __init__(
        self,
        model: Path | bytes,
        *,
        version: str,
        schema: InputSchema,
        prefer_gpu: bool = True,
        intra_op_threads: int = 0,
    ) -> None:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads
        source = str(model) if isinstance(model, Path) else model
        self._session = ort.InferenceSession(
            source, sess_options=options, providers=choose_providers(prefer_gpu)
        )
        self._version = version
        self._schema = schema
        self._provider: str = self._session.get_providers()[0]
        self._input_names = [i.name for i in self._session.get_inputs()]
        missing = set(self._input_names) - set(schema.inputs())
        if missing:
            raise ValueError(f"model {version} wants inputs {sorted(missing)} not in its schema")
        output = self._session.get_outputs()[0]
        self._output_name = output.name
        self._output_dim = int(output.shape[-1])
        log.info("event=model_loaded version=%s provider=%s", version, self._provider)

    @property
    def version(self) -> str:
        return self._version

    @property
    def provider(self) -> str:
        return self._provider

    @property
    def output_dim(self) -> int:
        return self._output_dim

    @property
    def schema(self) -> InputSchema:
        return self._schema

    def infer(self, inputs: Tensors) -> npt.NDArray[np.float32]:
        feeds = {name: inputs[name] for name in self._input_names}
        (output,) = self._session.run([self._output_name], feeds)
        return np.asarray(output, dtype=np.float32)

    @classmethod
    def from_artifact(
        cls, artifact: ModelArtifact, *, prefer_gpu: bool = True, intra_op_threads: int = 0
    ) -> OnnxModelRuntime:
        return cls(
            artifact.model_path,
            version=artifact.version,
            schema=artifact.manifest.schema,
            prefer_gpu=prefer_gpu,
            intra_op_threads=intra_op_threads,
        )
