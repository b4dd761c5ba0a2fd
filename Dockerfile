# syntax=docker/dockerfile:1.7
#
# One image for every role of userembed; the command picks it:
#   docker run userembed:0.1.0 serve     # read API: HTTP 8000 (/healthz /readyz /metrics), gRPC 50051
#   docker run -e USEREMBED_API_WORKERS=4 userembed:0.1.0 serve   # 4 server processes on those ports
#   docker run userembed:0.1.0 ingest    # Kafka -> feature states; /metrics /healthz /readyz on 9400
#   docker run userembed:0.1.0 worker    # embedding worker; /metrics /healthz /readyz on 9400
#   docker run userembed:0.1.0 init-registry --from /opt/userembed/models   # seed an empty registry
#
# Targets:
#   cpu (default, the last stage)   slim Python base, onnxruntime (CPU)
#   gpu                             NVIDIA CUDA + cuDNN runtime base, onnxruntime-gpu
#
#   docker build --target cpu -t userembed:0.1.0 .
#   docker build --target gpu -t userembed-gpu:0.1.0 .
#
# Models: the registry directory named by the MODEL_REGISTRY build arg (default: the
# committed, trained sum-default-1 in models/artifacts) is baked read-only into
# /opt/userembed/models, and USEREMBED_REGISTRY_PATH points there. To serve models
# published after the build, mount a registry volume and set USEREMBED_REGISTRY_PATH
# to it (docker-compose.yml and the prod overlay do): `init-registry` seeds it from
# the baked copy when it is empty and the worker hot-swaps whatever is published later.
# Or set USEREMBED_REGISTRY_URL=s3://bucket/prefix (the objectstore extra is installed):
# worker and serve mirror the bucket into USEREMBED_REGISTRY_PATH (docs/registry.md).
#
# Reproducible: base images pinned by tag (pin digests in your registry mirror),
# Python dependencies pinned by deploy/docker/constraints.txt, bytecode compiled
# with hash-based invalidation, no package caches. Small: build tools and pip stay in
# the build stages; the final stages copy only the virtualenv.

ARG PYTHON_IMAGE=python:3.11.11-slim-bookworm
# onnxruntime-gpu 1.31 is built against CUDA 13 and cuDNN 9 (its [cuda] extra requires
# nvidia-cuda-runtime~=13.0); the host needs an NVIDIA driver that supports CUDA 13.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------- build (CPU) --
FROM ${PYTHON_IMAGE} AS build-cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
RUN python -m venv /opt/venv
COPY deploy/docker/constraints.txt /tmp/constraints.txt
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
RUN /opt/venv/bin/pip install --no-compile -c /tmp/constraints.txt '.[objectstore]' \
 && /opt/venv/bin/pip uninstall -y pip setuptools wheel \
 && /opt/venv/bin/python -m compileall -q --invalidation-mode unchecked-hash /opt/venv/lib

# ---------------------------------------------------------------- build (GPU) --
FROM ${CUDA_IMAGE} AS build-gpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
RUN python3 -m venv /opt/venv
COPY deploy/docker/constraints.txt /tmp/constraints.txt
COPY pyproject.toml README.md ./
COPY service ./service
COPY models ./models
# onnxruntime-gpu replaces onnxruntime (both provide the `onnxruntime` module).
RUN /opt/venv/bin/pip install --no-compile -c /tmp/constraints.txt '.[objectstore]' \
 && /opt/venv/bin/pip uninstall -y onnxruntime \
 && /opt/venv/bin/pip install --no-compile -c /tmp/constraints.txt onnxruntime-gpu \
 && /opt/venv/bin/pip uninstall -y pip setuptools wheel \
 && /opt/venv/bin/python -m compileall -q --invalidation-mode unchecked-hash /opt/venv/lib

# ---------------------------------------------------------------- runtime (GPU) --
FROM ${CUDA_IMAGE} AS gpu
ARG MODEL_REGISTRY=models/artifacts
ENV DEBIAN_FRONTEND=noninteractive
# The interpreter the virtualenv was built with; nothing else (no compilers, no pip).
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 userembed \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin userembed \
 && mkdir -p /var/lib/userembed/registry \
 && chown 10001:10001 /var/lib/userembed/registry
COPY --from=build-gpu /opt/venv /opt/venv
COPY ${MODEL_REGISTRY} /opt/userembed/models
COPY deploy/docker/healthcheck.py /opt/userembed/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    USEREMBED_API_HOST=0.0.0.0 \
    USEREMBED_REGISTRY_PATH=/opt/userembed/models
USER 10001:10001
WORKDIR /var/lib/userembed
EXPOSE 8000 50051 9400
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
  CMD ["python", "/opt/userembed/healthcheck.py"]
ENTRYPOINT ["userembed"]
CMD ["worker"]

# ---------------------------------------------------------------- runtime (CPU) --
FROM ${PYTHON_IMAGE} AS cpu
ARG MODEL_REGISTRY=models/artifacts
RUN groupadd --system --gid 10001 userembed \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin userembed \
 && mkdir -p /var/lib/userembed/registry \
 && chown 10001:10001 /var/lib/userembed/registry
COPY --from=build-cpu /opt/venv /opt/venv
COPY ${MODEL_REGISTRY} /opt/userembed/models
COPY deploy/docker/healthcheck.py /opt/userembed/healthcheck.py
# USEREMBED_API_WORKERS: server processes of `serve` sharing its ports (docs/serving.md);
# set it to the container's CPU limit (0 = every core the container may run on).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    USEREMBED_API_HOST=0.0.0.0 \
    USEREMBED_API_WORKERS=1 \
    USEREMBED_REGISTRY_PATH=/opt/userembed/models
USER 10001:10001
WORKDIR /var/lib/userembed
EXPOSE 8000 50051 9400
HEALTHCHECK --interval=10s --timeout=3s --start-period=30s --retries=3 \
  CMD ["python", "/opt/userembed/healthcheck.py"]
ENTRYPOINT ["userembed"]
CMD ["serve"]
