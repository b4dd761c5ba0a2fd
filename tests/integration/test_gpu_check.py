"""The GPU check's dry run: scripts/gpu_check.sh on the CPU provider, tiny sizes.

Everything the GPU run does but CUDA: a wheel split by scripts/gpu_wheels.sh into
parts, reassembled, sha256-checked and installed; the carried redis-server (the
host's image has none); `userembed bench worker` per precision, batch and process
count; the torch-route tower script; `userembed bench-model`; the summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECK = REPO / "scripts" / "gpu_check.sh"
WHEELS = REPO / "scripts" / "gpu_wheels.sh"
PROBE = "gpucheck_probe-0.1-py3-none-any.whl"
STEPS = [
    "env",
    "install",
    "providers",
    "redis",
    "worker-cpu-fp16",
    "tower",
    "worker-cpu-fp32",
    "bench-model",
]

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def _probe_wheel(directory: Path) -> Path:
    """A tiny pure-Python wheel, several parts long at 4 KiB a part."""
    path = directory / PROBE
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as wheel:
        wheel.writestr("gpucheck_probe/__init__.py", "VALUE = 42\n" + "# padding\n" * 1500)
        info = "gpucheck_probe-0.1.dist-info"
        wheel.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: gpucheck-probe\nVersion: 0.1\n"
        )
        wheel.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        wheel.writestr(f"{info}/RECORD", "")
    return path


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture
def kit(tmp_path: Path) -> tuple[Path, Path]:
    """(parts dir, kit dir) as scripts/gpu_wheels.sh makes them, for the probe wheel."""
    parts, kit = tmp_path / "parts", tmp_path / "kit"
    split = _run([str(WHEELS), "split", str(_probe_wheel(tmp_path)), str(parts), "4K"], 60)
    assert split.returncode == 0, split.stderr
    redis = _run([str(WHEELS), "redis", str(kit)], 60)
    assert redis.returncode == 0, redis.stderr
    return parts, kit


def _check(out: Path, parts: Path, kit: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GPU_CHECK_WORK": str(out.parent / "work")}
    args = [str(CHECK), str(out), "--dry-run", "--parts", str(parts), "--kit", str(kit), *extra]
    return subprocess.run(args, capture_output=True, text=True, timeout=400, cwd=REPO, env=env)


def test_the_dry_run_runs_every_step_and_summarizes_every_combination(
    tmp_path: Path, kit: tuple[Path, Path]
) -> None:
    parts, kit_dir = kit
    out = tmp_path / "out"
    result = _check(out, parts, kit_dir)
    assert result.returncode == 0, result.stderr[-3000:]

    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    assert [(name, status) for name, status, *_ in steps] == [(s, "ok") for s in STEPS]
    log = (out / "log.txt").read_text()
    for name in STEPS:
        assert f"step={name} status=start" in log and f"step={name} status=ok" in log
        assert (out / f"{name}.txt").stat().st_size > 0
    assert "gpu_check done" in log and "failed=none" in log

    # the parts were checked one by one and whole, then installed where PYTHONPATH looks
    install = (out / "install.txt").read_text()
    assert install.count(": OK") == len(list(parts.glob("*.part-*"))) + 1
    assert (tmp_path / "work" / "site" / "gpucheck_probe" / "__init__.py").exists()
    redis = (out / "redis.txt").read_text()  # the carried server, not the one on PATH
    assert f"redis-server: {kit_dir / 'redis' / 'redis-server'}" in redis and "on port" in redis

    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["failed"] == []
    worker = summary["worker"]
    assert {r["provider"] for r in worker} == {"CPUExecutionProvider"}
    pipelined = {
        (r["precision"], r["batch"], r["processes"]): r["embeddings_per_s"]
        for r in worker
        if r["mode"] == "pipelined"
    }
    combinations = {(p, b, n) for p in ("fp16", "fp32") for b in (16, 64) for n in (1, 2)}
    assert set(pipelined) == combinations
    assert all(rate > 0 for rate in pipelined.values())
    single = {(r["precision"], r["batch"], r["mode"]) for r in worker if r["processes"] == 1}
    assert single == {
        (p, b, m)
        for p in ("fp16", "fp32")
        for b in (16, 64)
        for m in ("pipelined", "sequential", "model only")
    }
    assert all(r["embeddings_per_s"] > 0 for r in worker)

    tower = summary["tower"]
    engines = {(r["engine"], r["precision"], r["batch"]) for r in tower}
    for batch in (16, 64):
        for precision in ("fp32", "fp16"):
            assert ("torch eager (cpu)", precision, batch) in engines
            assert ("onnxruntime (CPUExecutionProvider)", precision, batch) in engines
    assert all(r["users_per_s"] > 0 for r in tower)
    # fp32 agrees with the float64 reference to float32 rounding, fp16 to half precision
    assert all(r["rel_err"] < (1e-5 if r["precision"] == "fp32" else 1e-2) for r in tower)
    assert "torch, not ONNX Runtime" in summary["tower_meta"]["label"]

    table = (out / "summary.md").read_text()
    assert table.count("| CPU | fp16 |") == 8 and table.count("| CPU | fp32 |") == 8
    assert "failed: none" in table


def test_a_corrupt_part_fails_its_step_and_the_next_steps_still_run(
    tmp_path: Path, kit: tuple[Path, Path]
) -> None:
    parts, kit_dir = kit
    part = sorted(parts.glob("*.part-*"))[1]
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF
    part.write_bytes(bytes(data))
    out = tmp_path / "out"
    result = _check(out, parts, kit_dir, "--steps", "install,redis")
    assert result.returncode != 0
    steps = [line.split("\t")[:2] for line in (out / "steps.tsv").read_text().splitlines()]
    assert steps == [["install", "failed"], ["redis", "ok"]]
    assert f"{part.name}: FAILED" in (out / "install.txt").read_text()
    assert not (tmp_path / "work" / "site" / "gpucheck_probe").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["failed"] == ["install"] and summary["worker"] == []
    assert "failed: install" in (out / "summary.md").read_text()
