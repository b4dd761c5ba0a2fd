"""User-tower inference throughput: ONNX Runtime vs torch eager, same inputs, same run.

Speed does not depend on the weights' values, so ``bench-model`` can measure a
freshly initialized tower of the default size; ``train --report`` measures the
trained one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from models.examples import Examples
from models.export import export_user_tower
from models.user_tower import UserTower, to_torch
from service.core.tensors import Tensors
from service.worker.runtime import OnnxModelRuntime


@dataclass(frozen=True, slots=True)
class BenchRow:
    engine: str
    batch: int
    users_per_s: float
    ms_per_batch: float


def _rate(fn: Callable[[], object], batch: int, seconds: float) -> tuple[float, float]:
    fn()  # warm-up (allocations, ORT graph preparation)
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return calls * batch / elapsed, 1000 * elapsed / calls


def _batch(source: Tensors, size: int) -> Tensors:
    rows = np.arange(size) % next(iter(source.values())).shape[0]
    return {name: value[rows] for name, value in source.items()}


def bench_tower(
    tower: UserTower,
    sample: Tensors,
    batches: Sequence[int] = (1, 64, 512),
    seconds: float = 2.0,
    threads: int = 2,
) -> list[BenchRow]:
    """users/s for ORT (CPU provider) and torch eager at each batch size."""
    torch.set_num_threads(threads)
    tower = tower.eval()
    exported = export_user_tower(tower, _batch(sample, 8))
    runtime = OnnxModelRuntime(
        exported.onnx_bytes,
        version="bench",
        schema=tower.schema,
        prefer_gpu=False,
        intra_op_threads=threads,
    )
    rows: list[BenchRow] = []
    for size in batches:
        tensors = _batch(sample, size)
        inputs = to_torch(dict(tensors))

        def eager(inputs: list[torch.Tensor] = inputs) -> object:
            with torch.inference_mode():
                return tower(*inputs)

        for engine, fn in (
            (f"onnxruntime ({runtime.provider})", lambda t=tensors: runtime.infer(t)),
            ("torch eager (CPU)", eager),
        ):
            rate, ms = _rate(fn, size, seconds)
            rows.append(BenchRow(engine, size, rate, ms))
    return rows


def format_bench(rows: list[BenchRow]) -> str:
    lines = [f"{'engine':<38} {'batch':>5} {'users/s':>10} {'ms/batch':>9}"]
    lines += [
        f"{r.engine:<38} {r.batch:>5} {r.users_per_s:>10.0f} {r.ms_per_batch:>9.3f}" for r in rows
    ]
    return "\n".join(lines)


def sample_tensors(examples: Examples, rows: int = 512) -> Tensors:
    """Real assembled users from held-out data (bench and parity inputs)."""
    take = min(rows, len(examples))
    return {name: value[:take] for name, value in examples.features.items()}
