#!/usr/bin/env bash
# The GPU check of docs/gpu.md, from a bare host: install the carried wheels, report
# what ONNX Runtime sees, start a redis-server, run `userembed bench worker` (CUDA
# fp16/fp32 and a CPU baseline, batch 256..8192, one and several worker processes),
# the torch route (scripts/gpu_torch_tower.py) and `userembed bench-model`, then
# collect the numbers in OUT_DIR/summary.md and summary.json.
#
#   scripts/gpu_check.sh OUT_DIR [--dry-run] [--parts DIR] [--kit DIR] [--steps a,b,...]
#
# --dry-run   everything but CUDA: the CPU provider, tiny sizes (the test of this script)
# --parts DIR onnxruntime-gpu parts + SHA256SUMS (default /tmp/userembed-gpu/parts)
# --kit DIR   deps/*.whl and redis/ from scripts/gpu_wheels.sh (default var/gpu-wheels/kit)
# --steps     a subset of: env install providers redis worker-<provider>-<precision>
#             tower bench-model (summary always runs); default: all, in that order
#
# Sizes (environment): GPU_CHECK_BATCHES, GPU_CHECK_PROCESSES, GPU_CHECK_USERS,
# GPU_CHECK_EVENTS, GPU_CHECK_WORKER_RUNS ("cuda:fp16 cuda:fp32 cpu:fp32"),
# GPU_CHECK_SECONDS (tower and bench-model, per measurement), GPU_CHECK_DEADLINE_S
# (the whole run; a step that would start past it is skipped), GPU_CHECK_PYTHON.
#
# Each step's output goes to OUT_DIR/<step>.txt, a timestamped line per step to
# OUT_DIR/log.txt. A failed step is recorded and the next one runs; the exit status
# is non-zero if any step failed.
set -euo pipefail

usage() { sed -n '2,22p' "$0" >&2; exit 2; }
[[ $# -ge 1 && $1 != -* ]] || usage
OUT_DIR=$1
shift
DRY_RUN=0
PARTS=/tmp/userembed-gpu/parts
KIT=
STEPS=
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) DRY_RUN=1 ;;
        --parts) PARTS=$2; shift ;;
        --kit) KIT=$2; shift ;;
        --steps) STEPS=$2; shift ;;
        *) usage ;;
    esac
    shift
done

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
KIT=${KIT:-$REPO/var/gpu-wheels/kit}
if [[ -x $REPO/.venv/bin/python ]]; then
    PY=${GPU_CHECK_PYTHON:-$REPO/.venv/bin/python}  # a dev machine
else
    PY=${GPU_CHECK_PYTHON:-python3}  # the GPU host: the image's python3 holds torch
fi
CORES=$(nproc)
if ((DRY_RUN)); then
    BATCHES=${GPU_CHECK_BATCHES:-16,64}
    PROCESSES=${GPU_CHECK_PROCESSES:-1,2}
    USERS=${GPU_CHECK_USERS:-256}
    EVENTS=${GPU_CHECK_EVENTS:-5}
    WORKER_RUNS=${GPU_CHECK_WORKER_RUNS:-cpu:fp16 cpu:fp32}
    SECONDS_PER=${GPU_CHECK_SECONDS:-0.2}
    DEVICE=cpu
    WORK=${GPU_CHECK_WORK:-$OUT_DIR/work}
    THREADS=1
else
    BATCHES=${GPU_CHECK_BATCHES:-256,1024,4096,8192}
    PROCESSES=${GPU_CHECK_PROCESSES:-1,4}
    USERS=${GPU_CHECK_USERS:-65536}  # 8 batches of 8192
    EVENTS=${GPU_CHECK_EVENTS:-30}
    WORKER_RUNS=${GPU_CHECK_WORKER_RUNS:-cuda:fp16 cuda:fp32 cpu:fp32}
    SECONDS_PER=${GPU_CHECK_SECONDS:-1}
    DEVICE=cuda
    WORK=${GPU_CHECK_WORK:-/tmp/userembed-gpu}
    THREADS=0  # ONNX Runtime's own choice (cores minus one on the CPU, one on CUDA)
fi
DEADLINE_S=${GPU_CHECK_DEADLINE_S:-450}
SITE=$WORK/site
STARTED=$SECONDS
FAILED=()
mkdir -p "$WORK"
: >"$OUT_DIR/log.txt"
: >"$OUT_DIR/steps.tsv"
# the carried packages first (they shadow the image's onnxruntime), then the project
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

log() { printf '%s %s\n' "$(date -u +%FT%TZ)" "$*" | tee -a "$OUT_DIR/log.txt" >&2; }
wanted() { [[ -z $STEPS || ,$STEPS, == *,$1,* ]]; }

# env.sh carries what the install and redis steps found (LD_LIBRARY_PATH, REDIS_URL) to
# the later steps, and to a second run within /tmp's lifetime that skips those steps.
if wanted install; then
    rm -f "$WORK/env.sh"
elif [[ -f $WORK/env.sh ]]; then
    # shellcheck disable=SC1091
    source "$WORK/env.sh"
fi

# step NAME TIMEOUT_S FUNCTION [ARGS]: run in a subshell with errexit on, output to
# NAME.txt, status to steps.tsv; a failure is recorded and the script goes on.
step() {
    local name=$1 limit=$2 left rc started
    shift 2
    wanted "$name" || return 0
    left=$((DEADLINE_S - (SECONDS - STARTED)))
    if ((left < 20)); then
        log "step=$name status=skipped reason=deadline left_s=$left"
        printf '%s\tskipped\t-\t0\n' "$name" >>"$OUT_DIR/steps.tsv"
        FAILED+=("$name")
        return 0
    fi
    ((limit <= left - 15)) || limit=$((left - 15))
    log "step=$name status=start timeout_s=$limit"
    started=$SECONDS
    STEP_TIMEOUT=$limit
    set +e
    (
        set -euo pipefail
        "$@"
    ) >"$OUT_DIR/$name.txt" 2>&1
    rc=$?
    set -e
    if [[ -f $WORK/env.sh ]]; then
        # shellcheck disable=SC1091  # written by the install step
        source "$WORK/env.sh"
    fi
    if ((rc == 0)); then
        log "step=$name status=ok seconds=$((SECONDS - started))"
        printf '%s\tok\t0\t%d\n' "$name" $((SECONDS - started)) >>"$OUT_DIR/steps.tsv"
    else
        log "step=$name status=failed rc=$rc seconds=$((SECONDS - started)) (see $name.txt)"
        printf '%s\tfailed\t%d\t%d\n' "$name" "$rc" $((SECONDS - started)) >>"$OUT_DIR/steps.tsv"
        tail -n 5 "$OUT_DIR/$name.txt" | sed 's/^/    /' | tee -a "$OUT_DIR/log.txt" >&2
        FAILED+=("$name")
    fi
}

step_env() {
    date -u
    uname -a
    echo "cores: $CORES  dry_run: $DRY_RUN  python: $PY"
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit \
            --format=csv
    else
        echo "nvidia-smi: not on PATH"
    fi
    "$PY" - <<'EOF'
import sys
print("python", sys.version.split()[0], sys.executable)
try:
    import torch
    cuda = torch.cuda.is_available()
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", cuda,
          torch.cuda.get_device_name(0) if cuda else "")
except ImportError as exc:
    print("torch: not importable:", exc)
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.__file__)
print("available providers", ort.get_available_providers())
EOF
}

# Reassemble the onnxruntime-gpu wheel from its parts (sha256-checked, part by part and
# whole), install it and the carried dependencies with pip --target, and put the image's
# CUDA libraries (its nvidia-* packages) on LD_LIBRARY_PATH for ONNX Runtime.
step_install() {
    local wheels=$WORK/wheels first whole found=()
    mkdir -p "$wheels" "$SITE"
    if compgen -G "$PARTS/*.part-*" >/dev/null; then
        [[ -f $PARTS/SHA256SUMS ]] || { echo "no $PARTS/SHA256SUMS"; return 1; }
        (cd "$PARTS" && grep '\.part-' SHA256SUMS | sha256sum -c --strict)
        for first in "$PARTS"/*.part-00; do
            whole=$(basename "${first%.part-00}")
            local expected have
            expected=$(grep '\.part-' "$PARTS/SHA256SUMS" | grep -c " $whole.part-")
            have=$(find "$PARTS" -name "$whole.part-*" | wc -l)
            ((have == expected)) || { echo "$whole: $have of $expected parts in $PARTS"; return 1; }
            cat "$PARTS/$whole".part-* >"$wheels/$whole"
            (cd "$wheels" && grep " $whole\$" "$PARTS/SHA256SUMS" | sha256sum -c --strict)
        done
    else
        echo "no wheel parts in $PARTS"
    fi
    if [[ -f $KIT/deps/SHA256SUMS ]]; then
        (cd "$KIT/deps" && sha256sum -c --strict SHA256SUMS)
    fi
    shopt -s nullglob
    found=("$wheels"/*.whl "$KIT"/deps/*.whl)
    shopt -u nullglob
    if ((${#found[@]})); then
        printf 'installing %s\n' "${found[@]##*/}"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --disable-pip-version-check --target "$SITE" "${found[@]}"
        ls "$SITE"
    else
        echo "nothing to install"
    fi
    local libs
    libs=$("$PY" - <<'EOF'
import os, sys
dirs = []
for root in sys.path:
    base = os.path.join(root, "nvidia")
    for here, _, files in os.walk(base):
        if any(f.startswith("lib") and ".so" in f for f in files) and here not in dirs:
            dirs.append(here)
print(":".join(dirs))
EOF
)
    echo "CUDA libraries from the image's nvidia-* packages: ${libs:-none}"
    if [[ -n $libs ]]; then
        printf 'export LD_LIBRARY_PATH=%q\n' "$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
            >"$WORK/env.sh"
    fi
    "$PY" -c 'import service.cli, service.bench.worker, redis, pydantic_settings, onnxruntime as o
print("imports ok; onnxruntime", o.__version__, "from", o.__file__)'
}

# What ONNX Runtime gives a real session of the default model (the CUDA provider can be
# listed as available and still fail to load its libraries).
step_providers() {
    DRY_RUN=$DRY_RUN "$PY" - <<'EOF'
import os
import onnxruntime as ort
from models.default import DEFAULT_REGISTRY, DEFAULT_VERSION
from models.registry import load_artifact
print("onnxruntime", ort.__version__, "device", ort.get_device())
print("available providers", ort.get_available_providers())
artifact = load_artifact(DEFAULT_REGISTRY, DEFAULT_VERSION)
wanted = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider")
          if p in ort.get_available_providers()]
session = ort.InferenceSession(str(artifact.model_path), providers=wanted)
print("session providers", session.get_providers())
if os.environ["DRY_RUN"] != "1" and session.get_providers()[0] != "CUDAExecutionProvider":
    raise SystemExit("no CUDA provider in a real session: the GPU route (a) is out; route (b) runs")
EOF
}

# A redis-server of the kit (carried: the image has none), else one on PATH.
step_redis() {
    local server port
    if [[ -x $KIT/redis/redis-server ]]; then
        server=$KIT/redis/redis-server
    elif command -v redis-server >/dev/null; then
        server=$(command -v redis-server)
    else
        echo "no redis-server: carry one (scripts/gpu_wheels.sh redis KIT) or install it"
        return 1
    fi
    echo "redis-server: $server"
    "$server" --version
    port=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    mkdir -p "$WORK/redis"
    "$server" --bind 127.0.0.1 --port "$port" --save '' --appendonly no --dir "$WORK/redis" \
        --maxmemory 0 --loglevel warning --logfile "$WORK/redis/redis.log" &
    echo $! >"$WORK/redis.pid"
    "$PY" - "$port" <<'EOF'
import sys, time
import redis
client = redis.Redis(port=int(sys.argv[1]))
for _ in range(100):
    try:
        client.ping()
        break
    except redis.ConnectionError:
        time.sleep(0.1)
else:
    raise SystemExit("redis-server did not answer in 10 s")
print("redis", client.info()["redis_version"], "on port", sys.argv[1])
EOF
    touch "$WORK/env.sh"
    sed -i '/REDIS_URL=/d' "$WORK/env.sh"
    echo "export REDIS_URL=redis://127.0.0.1:$port/0" >>"$WORK/env.sh"
}

step_worker() {  # PROVIDER PRECISION
    [[ -n ${REDIS_URL:-} ]] || { echo "no redis-server (the redis step failed)"; return 1; }
    timeout -k 10 "$STEP_TIMEOUT" "$PY" -m service.cli bench worker \
        --provider "$1" --precision "$2" --batches "$BATCHES" --processes "$PROCESSES" \
        --users "$USERS" --events-per-user "$EVENTS" --threads "$THREADS" \
        --redis-url "$REDIS_URL" --json "$OUT_DIR/worker-$1-$2.json"
}

step_tower() {
    local threads=()
    ((DRY_RUN)) && threads=(--threads 1 --users 64)
    timeout -k 10 "$STEP_TIMEOUT" "$PY" "$REPO/scripts/gpu_torch_tower.py" --device "$DEVICE" \
        --batches "$BATCHES" --seconds "$SECONDS_PER" --json "$OUT_DIR/tower.json" "${threads[@]}"
}

step_bench_model() {
    echo "(bench-model has no GPU option: ONNX Runtime CPU vs torch eager CPU, $CORES threads)"
    timeout -k 10 "$STEP_TIMEOUT" "$PY" -m service.cli bench-model --batches "$BATCHES" \
        --seconds "$SECONDS_PER" --threads "$([[ $DRY_RUN == 1 ]] && echo 1 || echo "$CORES")"
}

cleanup() {
    if [[ -f $WORK/redis.pid ]]; then
        kill "$(cat "$WORK/redis.pid")" 2>/dev/null || true
        rm -f "$WORK/redis.pid"
    fi
}
trap cleanup EXIT

summarize() {
    "$PY" - "$OUT_DIR" "$DRY_RUN" <<'EOF'
import json, sys
from pathlib import Path

out, dry_run = Path(sys.argv[1]), sys.argv[2] == "1"
steps = []
for line in (out / "steps.tsv").read_text().splitlines():
    name, status, rc, seconds = line.split("\t")
    steps.append({"step": name, "status": status, "rc": rc, "seconds": int(seconds)})
worker = []
for path in sorted(out.glob("worker-*.json")):
    doc = json.loads(path.read_text())
    for row in doc["rows"]:
        worker.append({"provider": doc["provider"], "precision": doc["precision"],
                       "batch": row["batch"], "processes": row["processes"], "mode": row["mode"],
                       "embeddings_per_s": row["embeddings_per_s"], "stage_ms": row["stage_ms"]})
tower = json.loads((out / "tower.json").read_text()) if (out / "tower.json").exists() else None
summary = {"dry_run": dry_run, "steps": steps, "worker": worker,
           "tower": tower["rows"] if tower else [], "tower_meta":
           {k: v for k, v in (tower or {}).items() if k != "rows"},
           "failed": [s["step"] for s in steps if s["status"] != "ok"]}
(out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
lines = ["# GPU check" + (" (dry run: CPU provider, tiny sizes)" if dry_run else ""), "",
         "| step | status | seconds |", "| --- | --- | ---: |"]
lines += [f"| {s['step']} | {s['status']} | {s['seconds']} |" for s in steps]
lines += ["", "## userembed bench worker (embeddings/s, real Redis)", "",
          "| provider | precision | batch | processes | mode | emb/s | infer ms/batch |",
          "| --- | --- | ---: | ---: | --- | ---: | ---: |"]
for r in worker:
    infer = f"{r['stage_ms']['infer']:.2f}" if "infer" in r["stage_ms"] else "-"
    provider = r["provider"].replace("ExecutionProvider", "")
    lines.append(f"| {provider} | {r['precision']} | {r['batch']} | {r['processes']} "
                 f"| {r['mode']} | {r['embeddings_per_s']:,.0f} | {infer} |")
if tower:
    lines += ["", f"## user tower alone ({tower['label']}; {tower['device']}, {tower['gpu']})", "",
              "| engine | precision | batch | users/s | ms/batch | rel_err |",
              "| --- | --- | ---: | ---: | ---: | ---: |"]
    lines += [f"| {r['engine']} | {r['precision']} | {r['batch']} | {r['users_per_s']:,.0f} "
              f"| {r['ms_per_batch']:.3f} | {r['rel_err']:.1e} |" for r in tower["rows"]]
    if tower.get("ort_note"):
        lines += ["", f"onnxruntime: {tower['ort_note']}"]
lines += ["", "failed: " + (", ".join(summary["failed"]) or "none")]
(out / "summary.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
EOF
}

log "gpu_check start out=$OUT_DIR dry_run=$DRY_RUN python=$PY batches=$BATCHES processes=$PROCESSES users=$USERS runs='$WORKER_RUNS' deadline_s=$DEADLINE_S"
step env 60 step_env
step install 180 step_install
step providers 60 step_providers
step redis 30 step_redis
# Most wanted first: the ONNX Runtime CUDA numbers, then the torch route, then baselines.
first_run=${WORKER_RUNS%% *}
step "worker-${first_run/:/-}" 200 step_worker "${first_run%%:*}" "${first_run##*:}"
step tower 120 step_tower
for run in ${WORKER_RUNS#"$first_run"}; do
    step "worker-${run/:/-}" 200 step_worker "${run%%:*}" "${run##*:}"
done
step bench-model 90 step_bench_model
log "step=summary status=start"
if summarize >"$OUT_DIR/summary.txt" 2>&1; then
    log "step=summary status=ok"
    cat "$OUT_DIR/summary.md"
else
    log "step=summary status=failed (see summary.txt)"
    FAILED+=(summary)
fi
log "gpu_check done seconds=$((SECONDS - STARTED)) failed=${FAILED[*]:-none}"
((${#FAILED[@]} == 0))
