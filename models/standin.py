"""A small, untrained stand-in user model, built directly as an ONNX graph.

It lets the whole pipeline run before the trained SUM model exists, without torch:
embeddings of the id, category and type of the user's recent events, pooled with
a recency weight, plus a projection of the decayed counters, through a two-layer
MLP and L2-normalized. Weights are seeded, so the same seed gives the same model.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from models.registry import ModelArtifact, load_artifact, publish
from service.core.features import FeatureState
from service.core.tensors import InputSchema, assemble
from service.worker.alignment_fit import fit_to_parent
from service.worker.runtime import OnnxModelRuntime

OPSET = 17
_ONNX_TYPES = {"int64": TensorProto.INT64, "float32": TensorProto.FLOAT}


def build_standin(
    schema: InputSchema, *, output_dim: int = 128, width: int = 32, seed: int = 0
) -> bytes:
    """Serialized ONNX model mapping the schema's inputs to 'embedding' [batch, output_dim]."""
    rng = np.random.default_rng(seed)

    def weights(name: str, *shape: int, scale: float) -> onnx.TensorProto:
        return numpy_helper.from_array(
            (rng.standard_normal(shape) * scale).astype(np.float32), name
        )

    initializers = [
        weights("item_table", schema.item_buckets, width, scale=0.5),
        weights("category_table", schema.category_buckets, width, scale=0.5),
        weights("type_table", schema.num_event_types + 1, width, scale=0.5),
        weights("counter_proj", schema.num_counters, width, scale=0.3),
        weights("w1", width, 2 * width, scale=1 / np.sqrt(width)),
        weights("b1", 2 * width, scale=0.1),
        weights("w2", 2 * width, output_dim, scale=1 / np.sqrt(2 * width)),
        numpy_helper.from_array(np.array(2.0, dtype=np.float32), "recency_tau"),
        numpy_helper.from_array(np.array(1e-6, dtype=np.float32), "eps"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
        numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2"),
    ]
    node = helper.make_node
    nodes = [
        node("Gather", ["item_table", "item_ids"], ["item_vec"]),
        node("Gather", ["category_table", "category_ids"], ["category_vec"]),
        node("Gather", ["type_table", "event_types"], ["type_vec"]),
        node("Add", ["item_vec", "category_vec"], ["ic_vec"]),
        node("Add", ["ic_vec", "type_vec"], ["event_vec"]),
        # recency weight exp(-log1p(age_h) / tau), zero on padding
        node("Neg", ["ages"], ["neg_ages"]),
        node("Div", ["neg_ages", "recency_tau"], ["scaled_ages"]),
        node("Exp", ["scaled_ages"], ["recency"]),
        node("Mul", ["recency", "mask"], ["weight"]),
        node("Unsqueeze", ["weight", "axis2"], ["weight3"]),
        node("Mul", ["event_vec", "weight3"], ["weighted"]),
        node("ReduceSum", ["weighted", "axis1"], ["pooled_sum"], keepdims=0),
        node("ReduceSum", ["weight", "axis1"], ["weight_sum"], keepdims=1),
        node("Add", ["weight_sum", "eps"], ["weight_norm"]),
        node("Div", ["pooled_sum", "weight_norm"], ["pooled"]),
        node("MatMul", ["counters", "counter_proj"], ["dense"]),
        node("Add", ["pooled", "dense"], ["user_vec"]),
        node("MatMul", ["user_vec", "w1"], ["h1_lin"]),
        node("Add", ["h1_lin", "b1"], ["h1_bias"]),
        node("Relu", ["h1_bias"], ["h1"]),
        node("MatMul", ["h1", "w2"], ["raw"]),
        node("Mul", ["raw", "raw"], ["raw_sq"]),
        node("ReduceSum", ["raw_sq", "axis1"], ["raw_ss"], keepdims=1),
        node("Add", ["raw_ss", "eps"], ["raw_ss_eps"]),
        node("Sqrt", ["raw_ss_eps"], ["raw_norm"]),
        node("Div", ["raw", "raw_norm"], ["embedding"]),
    ]
    inputs = [
        helper.make_tensor_value_info(name, _ONNX_TYPES[dtype], shape)
        for name, (dtype, shape) in schema.inputs().items()
    ]
    output = helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", output_dim])
    graph = helper.make_graph(nodes, "userembed_standin", inputs, [output], initializers)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="userembed"
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    serialized: bytes = model.SerializeToString()
    return serialized


def publish_standin(
    root: Path,
    *,
    version: str = "standin-1",
    history_length: int = 50,
    seed: int = 0,
    parent_version: str | None = None,
    alignment_states: Sequence[FeatureState] | None = None,
    make_current: bool = True,
    output_dim: int = 128,
) -> ModelArtifact:
    """Build the stand-in, compute its cold-start embedding, and publish it (as CURRENT
    by default; aligned onto ``parent_version`` when ``alignment_states`` are given)."""
    schema = InputSchema(history_length=history_length)
    onnx_bytes = build_standin(schema, output_dim=output_dim, seed=seed)
    runtime = OnnxModelRuntime(onnx_bytes, version=version, schema=schema, prefer_gpu=False)
    # The stand-in has no population to average over: its cold start is the model's
    # answer for a user with no history at all.
    cold_start = runtime.infer(assemble([FeatureState.empty()], 0, schema))[0]
    alignment = None
    if parent_version is not None and alignment_states is not None:
        alignment = fit_to_parent(
            load_artifact(root, parent_version),
            onnx_bytes,
            schema,
            alignment_states,
            max((st.last_event_ms for st in alignment_states), default=0),
        )
    return publish(
        root,
        version=version,
        onnx_bytes=onnx_bytes,
        schema=schema,
        output_dim=runtime.output_dim,
        cold_start_embedding=cold_start.tolist(),
        kind="standin",
        parent_version=parent_version,
        alignment=alignment,
        make_current=make_current,
    )
