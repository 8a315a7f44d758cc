# syntax=docker/dockerfile:1
#
# A patchdiff GPU worker: loads the models in weights/ once, then runs sampling jobs from the Redis
# queue (`python -m worker`). Build from the repository root:
#
#   docker build -f docker/worker.Dockerfile -t patchdiff-worker .
#
# Base image: the official PyTorch runtime image, pinned. It is ubuntu:22.04 + Python 3.11 (the
# version of the API image and the tests) + torch 2.6.0 installed by PyTorch's own release process
# from https://download.pytorch.org/whl/cu124, i.e. the CUDA 12.4 / cuDNN 9 user-space libraries as
# the nvidia-* wheels that torch pins. It also sets NVIDIA_VISIBLE_DEVICES / NVIDIA_DRIVER_CAPABILITIES
# for the NVIDIA container toolkit. Preferred over nvidia/cuda:*-cudnn-runtime + a pip torch wheel,
# which would carry the CUDA libraries twice (the image's and the wheel's own, ~3 GB more) and give
# Python 3.10 on Ubuntu 22.04. Needs an NVIDIA driver >= 525 on the host (CUDA 12.x minor-version
# compatibility).
#
# torch 2.6.0 satisfies pyproject's `torch>=2.3`; the tests check that TORCH_VERSION, the
# base image tag and that constraint agree. The `pip install torch==...` below is a no-op on the
# default base (already installed); it matters when BASE_IMAGE/TORCH_INDEX_URL are overridden, as
# docker-compose.cpu.yml does for a ~1 GB CPU-only image:
#
#   docker build -f docker/worker.Dockerfile \
#     --build-arg BASE_IMAGE=python:3.11.13-slim-bookworm \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#     --build-arg DEVICE=cpu -t patchdiff-worker:cpu .
ARG BASE_IMAGE=pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.6.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu124
# The image's default PATCHDIFF_DEVICE. cuda: a worker that sees no GPU fails at start-up instead of
# silently sampling on the CPU ("auto" would). The CPU build (docker-compose.cpu.yml) passes cpu.
ARG DEVICE=cuda

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATCHDIFF_DEVICE=${DEVICE} \
    PATCHDIFF_WEIGHTS_DIR=/app/weights \
    PATCHDIFF_STORE_DIR=/app/data/results

WORKDIR /app

# torch first, in its own layer, from the PyTorch index (only torch: the rest comes from PyPI).
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY pyproject.toml README.md ./
COPY patchdiff_core/ ./patchdiff_core/
COPY worker/ ./worker/

# torch is already satisfied, so this only adds safetensors, h5py, redis, rq, boto3 and the base
# dependencies. The check after it fails the build if anything replaced the pinned torch, or if a
# CUDA index gave a build without CUDA.
RUN pip install --no-cache-dir ".[core,worker]" \
    && rm -rf build ./*.egg-info \
    && python -c "import sys, torch; v = torch.__version__.split('+')[0]; print('torch', torch.__version__, 'cuda', torch.version.cuda); sys.exit(0 if v == '${TORCH_VERSION}' else 'torch %s, expected ${TORCH_VERSION}' % v)" \
    && case "${TORCH_INDEX_URL}" in \
         */cu*) python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'a CPU-only torch from a CUDA index')" ;; \
       esac \
    && groupadd --gid 10001 patchdiff \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/patchdiff --shell /usr/sbin/nologin patchdiff \
    && mkdir -p /app/data/results \
    && chown -R patchdiff:patchdiff /app/data

# The models (manifest.json, *.safetensors): baked in, loaded once at start-up.
COPY weights/ ./weights/

USER 10001:10001

# Healthy while this container's worker has a live heartbeat key in Redis (it expires after
# PATCHDIFF_HEARTBEAT_TTL_S): the same test the API's /readyz and the job reaper use. Worker names
# start with the hostname, which is the container's own. The start period covers loading the models.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import socket, sys, redis; from patchdiff_core.service.jobs import JobStore; from patchdiff_core.service.settings import get_settings; r = redis.Redis.from_url(get_settings().redis_url, socket_connect_timeout=3, socket_timeout=3); sys.exit(0 if next(r.scan_iter(match=JobStore.worker_key(socket.gethostname() + '-*'), count=1000), None) else 1)"]

CMD ["python", "-m", "worker"]
