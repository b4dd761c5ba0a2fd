"""Export the user tower alone to ONNX, check it, and prove it computes what torch computes.

The exported graph takes exactly the worker's ``assemble`` tensors (named as in
``InputSchema.inputs``) with a dynamic batch axis and returns ``embedding``
[batch, output_dim]. Parity is measured on held-out users and bounded; the fp16
variant (for GPU serving) is optional and checked against the fp32 graph.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Final

import numpy as np
import numpy.typing as npt
import onnx
import torch
from torch import Tensor, nn

from models.user_tower import INPUT_NAMES, UserTower, to_torch
from service.core.tensors import Tensors
from service.worker.runtime import OnnxModelRuntime

OPSET: Final = 17
OUTPUT_NAME: Final = "embedding"
PARITY_TOLERANCE: Final = 1e-4  # fp32 ORT vs torch eager on unit vectors
FP16_TOLERANCE: Final = 5e-2


class ExportError(RuntimeError):
    """The exported graph is invalid or does not match torch."""


@dataclass(frozen=True, slots=True)
class ExportedTower:
    onnx_bytes: bytes
    output_dim: int
    parity_max_abs_diff: float
    parity_rows: int
    fp16_bytes: bytes | None = None
    fp16_max_abs_diff: float | None = None
    fp16_note: str = ""


class _Fp16Tower(nn.Module):
    """fp16 weights and activations; fp32 at the boundary so the schema is unchanged."""

    def __init__(self, tower: UserTower) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, *inputs: Tensor) -> Tensor:
        cast = [t.half() if t.is_floating_point() else t for t in inputs]
        out: Tensor = self.tower(*cast).float()
        return out


def _to_onnx(module: nn.Module, example: list[Tensor]) -> bytes:
    buffer = io.BytesIO()
    axes = {name: {0: "batch"} for name in (*INPUT_NAMES, OUTPUT_NAME)}
    with warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, which needs
        # onnxscript; this graph is plain ops, which the TorchScript path handles well.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            tuple(example),
            buffer,  # type: ignore[arg-type]  # file-likes work; the stub says paths
            dynamo=False,
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=OPSET,
            do_constant_folding=True,
        )
    model = onnx.load_model_from_string(buffer.getvalue())
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported graph fails the ONNX checker: {exc}") from None
    serialized: bytes = model.SerializeToString()
    return serialized


@torch.no_grad()
def torch_embed(tower: UserTower, tensors: Tensors) -> npt.NDArray[np.float32]:
    tower.eval()
    out: npt.NDArray[np.float32] = tower(*to_torch(dict(tensors))).numpy()
    return out


def export_user_tower(tower: UserTower, held_out: Tensors, *, fp16: bool = False) -> ExportedTower:
    """ONNX bytes of ``tower`` plus parity against torch on ``held_out`` (assembled users)."""
    tower = tower.eval()
    example = to_torch(dict(held_out))
    onnx_bytes = _to_onnx(tower, [t[:2] for t in example])
    runtime = OnnxModelRuntime(onnx_bytes, version="export", schema=tower.schema, prefer_gpu=False)
    expected = torch_embed(tower, held_out)
    diff = float(np.max(np.abs(runtime.infer(held_out) - expected))) if len(expected) else 0.0
    if not diff <= PARITY_TOLERANCE:
        raise ExportError(
            f"ONNX Runtime and torch disagree by {diff:.2e} (bound {PARITY_TOLERANCE:.0e})"
        )
    result = ExportedTower(
        onnx_bytes=onnx_bytes,
        output_dim=tower.config.output_dim,
        parity_max_abs_diff=diff,
        parity_rows=len(expected),
    )
    return _with_fp16(result, tower, held_out, expected) if fp16 else result


def _with_fp16(
    result: ExportedTower, tower: UserTower, held_out: Tensors, expected: npt.NDArray[np.float32]
) -> ExportedTower:
    """Add the fp16 graph; its parity is measured where this ORT build can run it."""
    import copy

    half = _Fp16Tower(copy.deepcopy(tower).half()).eval()
    example = to_torch(dict(held_out))
    try:
        fp16_bytes = _to_onnx(half, [t[:2] for t in example])
    except Exception as exc:  # any exporter failure means "no fp16 variant"
        return _replace(result, fp16_note=f"fp16 export failed: {exc}")
    try:
        runtime = OnnxModelRuntime(fp16_bytes, version="fp16", schema=tower.schema, prefer_gpu=True)
        diff = float(np.max(np.abs(runtime.infer(held_out) - expected)))
    except Exception as exc:  # the CPU EP lacks some fp16 kernels
        return _replace(
            result, fp16_bytes=fp16_bytes, fp16_note=f"fp16 parity not measured here: {exc}"
        )
    if not diff <= FP16_TOLERANCE:
        raise ExportError(f"fp16 graph differs from torch fp32 by {diff:.2e}")
    return _replace(result, fp16_bytes=fp16_bytes, fp16_max_abs_diff=diff)


def _replace(result: ExportedTower, **changes: object) -> ExportedTower:
    from dataclasses import replace

    return replace(result, **changes)  # type: ignore[arg-type]


def cold_start_embedding(embeddings: npt.NDArray[np.float32]) -> list[float]:
    """Mean embedding of recent users, re-normalized (the served vectors are unit length)."""
    mean = embeddings.mean(axis=0)
    unit = (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
    return [float(x) for x in unit]
