#!/usr/bin/env bash
# What the GPU host (no network) needs, fetched here on the networked dev machine:
# the onnxruntime-gpu wheel split into parts that each fit one device command, the
# project's dependencies the host's image lacks, and a redis-server with its libraries.
# docs/gpu.md says how the parts travel and how scripts/gpu_check.sh puts them together.
#
#   scripts/gpu_wheels.sh [DEST]                  everything into DEST (default var/gpu-wheels)
#   scripts/gpu_wheels.sh split WHEEL PARTS [SIZE] split WHEEL into PARTS/ (SIZE as split -b: 50M)
#   scripts/gpu_wheels.sh redis KIT               copy redis-server and its libraries to KIT/redis
#   scripts/gpu_wheels.sh deps KIT                download the missing dependencies to KIT/deps
#   scripts/gpu_wheels.sh commands [DEST]         print the device command sequence for DEST
#
# DEST layout: wheels/ (the whole wheel, stays here), parts/ (WHEEL.part-NN + SHA256SUMS,
# one part per device command), kit/ (deps/*.whl, redis/: carried with the benchmark run).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${GPU_WHEELS_PYTHON:-$REPO/.venv/bin/python}
ORT_GPU=${ORT_GPU:-onnxruntime-gpu==1.31.1}
PART_MIB=${PART_MIB:-50}  # + the ~4 MiB working tree stays under the 64 MiB a command carries

# The project's runtime dependencies (transitively) that the nvidia-h200 image does not
# hold (KINDS.md's package list, 2026-11-17), plus typing-extensions, which pydantic
# needs newer than an image may have. The versions are this machine's .venv's, so the
# host runs what the tests here ran.
DEPS=(annotated-types confluent-kafka fastapi grpcio-health-checking grpcio-reflection
    hiredis httptools msgspec opentelemetry-api orjson pydantic pydantic-core
    pydantic-settings python-dotenv redis starlette typing-extensions typing-inspection
    uvicorn watchfiles websockets)

PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
    --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64)

say() { printf '%s gpu_wheels: %s\n' "$(date -u +%FT%TZ)" "$*" >&2; }

pip_download() {  # DIR SPEC...: cp312 manylinux binaries only, no dependency resolution
    local dir=$1
    shift
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" -d "$dir" "$@"
}

split_wheel() {  # WHEEL PARTS_DIR [SIZE]
    local wheel=$1 parts=$2 size=${3:-${PART_MIB}M} name
    name=$(basename "$wheel")
    mkdir -p "$parts"
    rm -f "$parts/$name".part-* "$parts/SHA256SUMS"
    split -d -a 2 -b "$size" "$wheel" "$parts/$name.part-"
    (cd "$parts" && sha256sum "$name".part-* >SHA256SUMS)
    (cd "$(dirname "$wheel")" && sha256sum "$name") >>"$parts/SHA256SUMS"
    say "split $name ($(stat -c %s "$wheel") bytes) into $(find "$parts" -name "$name.part-*" | wc -l) parts of <= $size"
}

redis_kit() {  # KIT: redis-server, redis-cli and every library they link but glibc's own
    local kit=$1 binary lib
    mkdir -p "$kit/redis/lib"
    for binary in redis-server redis-cli; do
        command -v "$binary" >/dev/null || { say "$binary not found (apt-get install redis-server)"; return 1; }
        cp -L "$(command -v "$binary")" "$kit/redis/$binary.bin"
        # the wrapper finds the carried libraries wherever the kit lands
        # shellcheck disable=SC2016  # expanded by the wrapper, not here
        printf '#!/bin/sh\nd=$(dirname "$0")\nLD_LIBRARY_PATH="$d/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$d/%s.bin" "$@"\n' \
            "$binary" >"$kit/redis/$binary"
        chmod +x "$kit/redis/$binary"
        for lib in $(ldd "$(command -v "$binary")" | awk '/=> \//{print $3}'); do
            case $(basename "$lib") in
                libc.so.* | libm.so.* | libdl.so.* | librt.so.* | libpthread.so.* | ld-linux*) ;;
                *) cp -Ln "$lib" "$kit/redis/lib/" ;;
            esac
        done
    done
    "$kit/redis/redis-server" --version >&2
}

deps_kit() {  # KIT
    local kit=$1 specs=() name version
    mkdir -p "$kit/deps"
    for name in "${DEPS[@]}"; do
        version=$("$PY" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$name")
        specs+=("$name==$version")
    done
    pip_download "$kit/deps" "${specs[@]}"
    (cd "$kit/deps" && sha256sum ./*.whl >SHA256SUMS)
    say "deps: $(find "$kit/deps" -name '*.whl' | wc -l) wheels, $(du -sh "$kit/deps" | cut -f1)"
}

commands() {  # DEST: the device calls, in order, each within 30 s of the last
    local dest=${1:-var/gpu-wheels} part k=0
    dest=${dest%/}
    echo "# device calls, one right after the other (/tmp survives 30 s between calls):"
    for part in "$dest"/parts/*.part-*; do
        k=$((k + 1))
        printf 'run %d: carry=["%s/parts/SHA256SUMS", "%s"]\n' "$k" "$dest" "$part"
        printf '  command: mkdir -p /tmp/userembed-gpu/parts && cp %s/parts/* /tmp/userembed-gpu/parts/ && ls -l /tmp/userembed-gpu/parts\n' "$dest"
    done
    k=$((k + 1))
    printf 'run %d: carry=["%s/kit"], timeout_s=480\n' "$k" "$dest"
    # shellcheck disable=SC2016  # $OUT and $rc are the device machine's
    printf '  command: bash scripts/gpu_check.sh /tmp/gpu-check --parts /tmp/userembed-gpu/parts --kit %s/kit; rc=$?; tar -C /tmp -czf $OUT/gpu-check.tar.gz gpu-check; cp /tmp/gpu-check/summary.md /tmp/gpu-check/log.txt $OUT/; exit $rc\n' "$dest"
}

all() {  # DEST
    local dest=${1:-$REPO/var/gpu-wheels} wheel
    mkdir -p "$dest/wheels"
    say "downloading $ORT_GPU (about 256 MB)"
    pip_download "$dest/wheels" "$ORT_GPU"
    wheel=$(find "$dest/wheels" -name 'onnxruntime_gpu-*.whl' | sort | tail -1)
    split_wheel "$wheel" "$dest/parts"
    deps_kit "$dest/kit"
    redis_kit "$dest/kit"
    say "kit: $(du -sh "$dest/kit" | cut -f1); parts: $(du -sh "$dest/parts" | cut -f1)"
    commands "${dest#"$REPO"/}"
}

case ${1:-} in
    split) split_wheel "$2" "$3" "${4:-${PART_MIB}M}" ;;
    redis) redis_kit "$2" ;;
    deps) deps_kit "$2" ;;
    commands) commands "${2:-var/gpu-wheels}" ;;
    -h | --help) sed -n '2,14p' "$0" ;;
    *) all "${1:-$REPO/var/gpu-wheels}" ;;
esac
