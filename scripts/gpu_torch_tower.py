"""The served user tower on CUDA through torch: route (b) of docs/gpu.md.

Same architecture and input schema as the committed default model (the manifest's
tower config), freshly initialized: speed does not depend on the weights' values.
Every row is labelled with its engine; the torch rows are torch, not ONNX Runtime.
ONNX Runtime rows come from the same tower exported to ONNX, on the provider this
onnxruntime gives (the CPU when it has no CUDA). Inputs are real assembled users
(the worker's own tensor assembly), and each row's output is checked against a
float64 reference: ``rel_err`` = ||out - ref|| / ||ref||.

    python scripts/gpu_torch_tower.py --device cuda --json var/gpu-check/tower.json
    python scripts/gpu_torch_tower.py --device cpu --batches 8,32 --seconds 0.2  # dry run
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file from anywhere
    sys.path.insert(0, str(REPO))

from models.default import DEFAULT_REGISTRY, DEFAULT_VERSION  # noqa: E402
from models.export import export_user_tower  # noqa: E402
from models.registry import load_artifact  # noqa: E402
from models.user_tower import TowerConfig, UserTower, to_torch  # noqa: E402
from service.bench.worker import synthetic_states  # noqa: E402
from service.core.clock import now_ms  # noqa: E402
from service.core.tensors import Tensors, assemble  # noqa: E402
from service.worker.runtime import CUDA, OnnxModelRuntime  # noqa: E402

REFERENCE_ROWS = 256


@dataclass(frozen=True, slots=True)
class TowerRow:
    engine: str
    precision: str
    batch: int
    users_per_s: float
    ms_per_batch: float
    rel_err: float


def served_tower() -> UserTower:
    """A tower of the default model's architecture and schema (weights seeded, not trained)."""
    manifest = load_artifact(DEFAULT_REGISTRY, DEFAULT_VERSION).manifest
    sizes = dict(manifest.details.get("tower", {}))  # type: ignore[call-overload]
    sizes["mlp"] = tuple(sizes.get("mlp", TowerConfig().mlp))
    sizes["dropout"] = 0.0
    torch.manual_seed(0)
    return UserTower(manifest.schema, TowerConfig(**sizes)).eval()


def sample_users(tower: UserTower, users: int) -> Tensors:
    states = list(synthetic_states(users, 30).values())
    return assemble(states, now_ms(), tower.schema)


def tile(source: Tensors, size: int) -> Tensors:
    rows = np.arange(size) % next(iter(source.values())).shape[0]
    return {name: value[rows] for name, value in source.items()}


def rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    rows = min(len(out), len(ref))
    diff = np.linalg.norm(out[:rows].astype(np.float64) - ref[:rows])
    return float(diff / np.linalg.norm(ref[:rows]))


def time_call(fn: Callable[[], object], sync: Callable[[], None], seconds: float) -> float:
    """Median seconds per call: warmed up, then 5 repeats of enough calls to fill ``seconds``."""
    for _ in range(3):
        fn()
    sync()
    started = time.perf_counter()
    fn()
    sync()
    calls = max(1, int(seconds / 5 / max(time.perf_counter() - started, 1e-6)))
    per_call = []
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        per_call.append((time.perf_counter() - started) / calls)
    return statistics.median(per_call)


def _half_inputs(inputs: list[Tensor]) -> list[Tensor]:
    return [t.half() if t.is_floating_point() else t for t in inputs]


def torch_rows(
    tower: UserTower,
    sample: Tensors,
    ref: np.ndarray,
    batches: list[int],
    device: torch.device,
    seconds: float,
) -> list[TowerRow]:
    on_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    models = {"fp32": tower.to(device), "fp16": copy.deepcopy(tower).half().to(device)}
    rows: list[TowerRow] = []
    for batch in batches:
        host = to_torch(dict(tile(sample, batch)))
        for precision, model in models.items():
            prep = _half_inputs if precision == "fp16" else (lambda ts: ts)
            inputs = prep([t.to(device) for t in host])

            def eager(model: UserTower = model, inputs: list[Tensor] = inputs) -> Tensor:
                with torch.inference_mode():
                    out: Tensor = model(*inputs)
                    return out

            seconds_per = time_call(eager, sync, seconds)
            out = eager().float().cpu().numpy()
            rows.append(
                TowerRow(
                    f"torch eager ({device.type})",
                    precision,
                    batch,
                    batch / seconds_per,
                    1e3 * seconds_per,
                    rel_err(out, ref),
                )
            )
            if on_cuda:
                try:
                    rows += _graph_rows(model, host, prep, precision, batch, ref, seconds)
                except RuntimeError as exc:  # a capture failure is a finding, not a crash
                    print(f"torch cuda-graph {precision} batch {batch}: {exc}", file=sys.stderr)
    return rows


def _graph_rows(
    model: UserTower,
    host: list[Tensor],
    prep: Callable[[list[Tensor]], list[Tensor]],
    precision: str,
    batch: int,
    ref: np.ndarray,
    seconds: float,
) -> list[TowerRow]:
    """CUDA-graph replay, inputs resident on the device, and with the host copies
    (pinned host inputs in, host output out) that a serving worker pays."""
    static = prep([t.cuda() for t in host])
    pinned = [t.pin_memory() for t in prep(host)]
    stream = torch.cuda.Stream()  # type: ignore[no-untyped-call]
    stream.wait_stream(torch.cuda.current_stream())
    # no_grad rather than inference_mode: the static tensors stay plain tensors that
    # the copies below may update in place outside any mode
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3):  # warm up outside the capture (allocator, kernel selection)
            model(*static)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        static_out = model(*static)
    host_out = torch.empty(static_out.shape, dtype=static_out.dtype, pin_memory=True)

    def replay() -> None:
        graph.replay()

    def replay_with_copies() -> None:
        for dst, src in zip(static, pinned, strict=True):
            dst.copy_(src, non_blocking=True)
        graph.replay()
        host_out.copy_(static_out, non_blocking=True)

    rows = []
    for engine, fn in (
        ("torch cuda-graph", replay),
        ("torch cuda-graph + host copies", replay_with_copies),
    ):
        seconds_per = time_call(fn, torch.cuda.synchronize, seconds)
        fn()
        torch.cuda.synchronize()
        out = static_out.float().cpu().numpy()
        rows.append(
            TowerRow(
                engine, precision, batch, batch / seconds_per, 1e3 * seconds_per, rel_err(out, ref)
            )
        )
    return rows


def ort_rows(
    tower: UserTower,
    sample: Tensors,
    ref: np.ndarray,
    batches: list[int],
    seconds: float,
    gpu: bool,
) -> tuple[list[TowerRow], str]:
    """ONNX Runtime on the same tower, exported; CUDA when asked for and available."""
    exported = export_user_tower(tower.cpu().float().eval(), tile(sample, 64), fp16=True)
    rows: list[TowerRow] = []
    notes = exported.fp16_note
    with tempfile.TemporaryDirectory() as tmp:
        fp16_path = None
        if exported.fp16_bytes is not None:
            fp16_path = Path(tmp) / "fp16.onnx"
            fp16_path.write_bytes(exported.fp16_bytes)
        for precision in ("fp32", "fp16"):
            try:
                runtime = OnnxModelRuntime(
                    exported.onnx_bytes,
                    version="tower-bench",
                    schema=tower.schema,
                    prefer_gpu=gpu,
                    precision="fp16" if precision == "fp16" else "fp32",
                    fp16_model=fp16_path if precision == "fp16" else None,
                )
            except Exception as exc:  # e.g. the CPU EP lacks an fp16 kernel
                notes += f" onnxruntime {precision}: {type(exc).__name__}: {exc}"
                continue
            if gpu and runtime.provider != CUDA:
                return rows, f"onnxruntime has no CUDA provider here ({runtime.provider})"
            for batch in batches:
                tensors = tile(sample, batch)

                def infer(run: OnnxModelRuntime = runtime, t: Tensors = tensors) -> object:
                    return run.infer(t)

                seconds_per = time_call(infer, lambda: None, seconds)
                rows.append(
                    TowerRow(
                        f"onnxruntime ({runtime.provider})",
                        runtime.precision,
                        batch,
                        batch / seconds_per,
                        1e3 * seconds_per,
                        rel_err(runtime.infer(tensors), ref),
                    )
                )
    return rows, notes.strip()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    parser.add_argument("--batches", default="256,1024,4096,8192")
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--users", type=int, default=2048, help="distinct users, tiled")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--no-ort", action="store_true", help="torch rows only")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_torch_tower: --device cuda but torch sees no CUDA device", file=sys.stderr)
        return 2
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda" if use_cuda else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    tower = served_tower()
    sample = sample_users(tower, args.users)
    with torch.no_grad():
        reference = tile(sample, REFERENCE_ROWS)
        ref = copy.deepcopy(tower).double()(
            *[t.double() if t.is_floating_point() else t for t in to_torch(dict(reference))]
        )
    ref_np = ref.numpy()
    rows = torch_rows(tower, sample, ref_np, batches, device, args.seconds)
    note = "skipped (--no-ort)"
    if not args.no_ort:
        more, note = ort_rows(tower, sample, ref_np, batches, args.seconds, gpu=use_cuda)
        rows += more
    gpu_name = torch.cuda.get_device_name(0) if use_cuda else "none"
    print(
        f"user tower (default model's architecture), torch {torch.__version__} on {device.type}"
        f" ({gpu_name}); torch rows are torch, not ONNX Runtime"
    )
    print(f"{'engine':<34} {'prec':<5} {'batch':>6} {'users/s':>12} {'ms/batch':>9} {'rel_err':>8}")
    for r in rows:
        print(
            f"{r.engine:<34} {r.precision:<5} {r.batch:>6} {r.users_per_s:>12,.0f}"
            f" {r.ms_per_batch:>9.3f} {r.rel_err:>8.1e}"
        )
    if note:
        print(f"onnxruntime: {note}")
    if args.json:
        document = {
            "bench": "tower",
            "label": "torch rows are torch, not ONNX Runtime",
            "device": device.type,
            "gpu": gpu_name,
            "torch": torch.__version__,
            "ort_note": note,
            "rows": [asdict(r) for r in rows],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(document, indent=1) + "\n")
    bad = [r for r in rows if not np.isfinite(r.rel_err) or r.rel_err > 5e-2]
    for r in bad:
        print(f"gpu_torch_tower: {r.engine} {r.precision} batch {r.batch}: rel_err {r.rel_err:.2e}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
