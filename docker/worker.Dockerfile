# sparq worker image (CUDA): a Ray worker node that runs trials, the float
# baseline and the final re-evaluation on its GPUs. It joins the head at
# $RAY_HEAD and blocks.
#
# Build from the repository root:
#
#   docker build -f docker/worker.Dockerfile -t sparq-worker .
#
# Base image: the same python:<version>-slim as the service image, not an
# nvidia/cuda one, on purpose:
# - Ray refuses a node or driver whose Python differs from the head's, down to
#   the patch version (RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=patch), and the
#   drivers run in the service image. Ubuntu-based CUDA images would need
#   another Python build (Ubuntu's own, or a PPA's) that matches it only by luck.
# - torch's CUDA wheels carry the CUDA runtime, cuDNN, cuBLAS and NCCL as
#   nvidia-* wheels, so a CUDA base image would only duplicate them. The host
#   needs the NVIDIA driver and the NVIDIA Container Toolkit; the toolkit
#   mounts the driver libraries (libcuda, libnvidia-ml) into the container.
#
# The default wheel source serves torch's CUDA build for Linux x86_64. To pick
# another CUDA variant (say, to match an older driver), pass a wheel source in
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL; no index is named in this file. The
# build fails if it ends up with a CPU-only torch, or any torch but 2.13.0.

ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim

ARG PIP_INDEX_URL=""
ARG PIP_EXTRA_INDEX_URL=""
ARG RAY_VERSION=2.60.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RAY_USAGE_STATS_ENABLED=0 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

RUN python -m venv /opt/venv

# 1. torch first, pinned, CUDA build. Empty build args are dropped (an empty
#    PIP_INDEX_URL would leave pip with no index at all).
RUN [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    pip install torch==2.13.0 \
 && python -c "import sys, torch; v = torch.__version__; ok = v.split('+')[0] == '2.13.0' and torch.version.cuda is not None; sys.exit(0 if ok else f'the worker image needs a CUDA build of torch 2.13.0, got {v} (CUDA {torch.version.cuda}); check PIP_INDEX_URL / PIP_EXTRA_INDEX_URL')"

# 2. the project (trials import workers.*); torch>=2.4 is already satisfied.
WORKDIR /opt/sparq
COPY pyproject.toml README.md ./
COPY service ./service
COPY search_spaces ./search_spaces
COPY workers ./workers
COPY dashboards ./dashboards
RUN [ -n "$PIP_INDEX_URL" ] || unset PIP_INDEX_URL; \
    [ -n "$PIP_EXTRA_INDEX_URL" ] || unset PIP_EXTRA_INDEX_URL; \
    pip install . "ray[default,tune]==${RAY_VERSION}" \
 && python -c "import sys, torch; v = torch.__version__; ok = v.split('+')[0] == '2.13.0' and torch.version.cuda is not None; sys.exit(0 if ok else f'installing the project replaced torch: {v}')" \
 && rm -rf /opt/sparq
WORKDIR /

RUN groupadd --system --gid 10001 sparq \
 && useradd --system --uid 10001 --gid sparq --home-dir /home/sparq --create-home \
        --shell /usr/sbin/nologin sparq \
 && mkdir -p /data \
 && chown sparq:sparq /data

# Trials write their checkpoints under the job directory in SPARQ_HOME: the
# same shared path as in the service container (one volume in compose.yaml).
ENV SPARQ_HOME=/data \
    RAY_HEAD=ray-head:6379
USER sparq
WORKDIR /home/sparq

# A Ray worker node joining the head; Ray detects the GPUs the toolkit exposes.
CMD ["sh", "-c", "exec ray start --address=\"$RAY_HEAD\" --block"]
