"""The model-runtime seam and its ONNX Runtime implementation (CUDA when present, else CPU).

On CUDA the session runs the fp16 variant of the graph (converted at load time,
inputs and outputs kept float32) and binds inputs and outputs through I/O binding;
on the CPU it runs the fp32 graph with one intra-op thread per usable core but one
(the worker's fetch and write stages overlap inference on that core).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal, Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from service.core.tensors import InputSchema, Tensors

if TYPE_CHECKING:
    from models.registry import ModelArtifact

log = logging.getLogger(__name__)

CUDA: Final = "CUDAExecutionProvider"
CPU: Final = "CPUExecutionProvider"

Precision = Literal["auto", "fp32", "fp16"]


class ModelRuntime(Protocol):
    """Runs one model version on a batch of assembled tensors."""

    @property
    def version(self) -> str: ...

    @property
    def provider(self) -> str:
        """The execution provider actually in use (e.g. CUDAExecutionProvider)."""

    @property
    def precision(self) -> str:
        """fp32 or fp16: the graph actually running."""

    @property
    def output_dim(self) -> int: ...

    @property
    def schema(self) -> InputSchema: ...

    def infer(self, inputs: Tensors) -> npt.NDArray[np.float32]:
        """[batch, output_dim] float32 embeddings."""


def usable_cores() -> int:
    """Cores this process may run on (affinity aware where the OS says)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def to_fp16(model: bytes) -> bytes:
    """The fp16 variant of an fp32 ONNX graph, with float32 inputs and outputs kept."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    converted = convert_float_to_float16(onnx.load_from_string(model), keep_io_types=True)
    return bytes(converted.SerializeToString())


def choose_providers(prefer_gpu: bool = True) -> list[str]:
    """CUDA first when this onnxruntime build has it, CPU always as the fallback."""
    available = ort.get_available_providers()
    return [CUDA, CPU] if prefer_gpu and CUDA in available else [CPU]


class OnnxModelRuntime:
    """ONNX Runtime session over a model file, reporting the provider it really got.

    ``precision``: auto = fp16 on CUDA, fp32 on the CPU; fp16 runs ``fp16_model`` when
    given, else the graph converted at load time. ``io_binding``: None = on with CUDA.
    ``intra_op_threads``: 0 = usable cores minus one on the CPU, 1 on CUDA.
    """

    def __init__(
        self,
        model: Path | bytes,
        *,
        version: str,
        schema: InputSchema,
        prefer_gpu: bool = True,
        intra_op_threads: int = 0,
        precision: Precision = "auto",
        io_binding: bool | None = None,
        fp16_model: Path | None = None,
    ) -> None:
        providers = choose_providers(prefer_gpu)
        on_cuda = providers[0] == CUDA
        graph = model.read_bytes() if isinstance(model, Path) else model
        self._precision: Literal["fp32", "fp16"] = "fp32"
        if precision == "fp16" or (precision == "auto" and on_cuda):
            # the artifact's own (parity-checked) fp16 export, else a load-time conversion
            graph = fp16_model.read_bytes() if fp16_model is not None else to_fp16(graph)
            self._precision = "fp16"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # On the CPU one core is left to the worker's overlapped fetch and write stages.
        cpu_threads = max(1, usable_cores() - 1)
        options.intra_op_num_threads = intra_op_threads or (1 if on_cuda else cpu_threads)
        options.inter_op_num_threads = 1
        self._session = ort.InferenceSession(graph, sess_options=options, providers=providers)
        self._version = version
        self._schema = schema
        self._provider: str = self._session.get_providers()[0]
        self._device = "cuda" if self._provider == CUDA else "cpu"
        self._io_binding = self._provider == CUDA if io_binding is None else io_binding
        self._input_names = [i.name for i in self._session.get_inputs()]
        missing = set(self._input_names) - set(schema.inputs())
        if missing:
            raise ValueError(f"model {version} wants inputs {sorted(missing)} not in its schema")
        output = self._session.get_outputs()[0]
        self._output_name = output.name
        self._output_dim = int(output.shape[-1])
        log.info(
            "event=model_loaded version=%s provider=%s precision=%s io_binding=%s threads=%d",
            version,
            self._provider,
            self._precision,
            self._io_binding,
            options.intra_op_num_threads,
        )

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

    @property
    def precision(self) -> str:
        return self._precision

    def infer(self, inputs: Tensors) -> npt.NDArray[np.float32]:
        if self._io_binding:
            return self._infer_bound(inputs)
        feeds = {name: inputs[name] for name in self._input_names}
        (output,) = self._session.run([self._output_name], feeds)
        return np.asarray(output, dtype=np.float32)

    def _infer_bound(self, inputs: Tensors) -> npt.NDArray[np.float32]:
        """One host-to-device copy per input, the output left on the device until read."""
        binding = self._session.io_binding()
        for name in self._input_names:
            value = ort.OrtValue.ortvalue_from_numpy(
                np.ascontiguousarray(inputs[name]), self._device, 0
            )
            binding.bind_ortvalue_input(name, value)
        binding.bind_output(self._output_name, self._device)
        self._session.run_with_iobinding(binding)
        (output,) = binding.copy_outputs_to_cpu()
        return np.asarray(output, dtype=np.float32)

    @classmethod
    def from_artifact(
        cls,
        artifact: ModelArtifact,
        *,
        prefer_gpu: bool = True,
        intra_op_threads: int = 0,
        precision: Precision = "auto",
        io_binding: bool | None = None,
    ) -> OnnxModelRuntime:
        return cls(
            artifact.model_path,
            version=artifact.version,
            schema=artifact.manifest.schema,
            prefer_gpu=prefer_gpu,
            intra_op_threads=intra_op_threads,
            precision=precision,
            io_binding=io_binding,
            fp16_model=artifact.fp16_model_path,
        )
