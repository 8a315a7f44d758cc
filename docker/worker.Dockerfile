# A patchdiff worker: loads the models in weights/ once, then runs sampling jobs from the Redis queue
# (`python -m worker`). Build from the repository root:
#
#   docker build -f docker/worker.Dockerfile -t patchdiff-worker .                 # CUDA (GPU)
#   docker build -f docker/worker.Dockerfile --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#     --build-arg DEVICE=cpu -t patchdiff-worker:cpu .                               # CPU only
#
# torch TORCH_VERSION (2.13.0, what the tests run) is installed into a venv on PYTHON_IMAGE (the
# official Python image by default). TORCH_INDEX_URL empty: the default index (PyPI), whose Linux
# x86_64 wheel is the CUDA build; it brings the CUDA/cuDNN user-space libraries as the nvidia-*
# wheels that torch pins, so the base image needs no CUDA, only the host an NVIDIA driver recent
# enough for that CUDA 12/13 release and the NVIDIA container toolkit. docker-compose.cpu.yml passes
# PyTorch's CPU index (a ~1 GB image instead of several GB).
#
# Layers, most stable first: torch (docker/requirements/torch.txt), the other locked dependencies
# (worker.txt), the user, the weights, then the source: a code change rebuilds only the last.
# Offline build: wheels for both locks in docker/wheels/ (`make wheelhouse`) and --network none;
# pip then installs from there only (bind-mounted, never in a layer). An air-gapped site points
# PYTHON_IMAGE at its mirror, or TORCH_INDEX_URL/PIP_INDEX_URL at its package mirror.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
COPY docker/requirements/torch.txt /tmp/requirements/torch.txt
# torch first, in its own layer. With TORCH_INDEX_URL, torch comes from there (its local version
# tag, e.g. +cpu, sorts above the plain release) and its dependencies from the default index.
RUN --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    set -eu; \
    if ls /tmp/wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /tmp/wheels; \
    elif [ -n "${TORCH_INDEX_URL}" ]; then set -- --extra-index-url "${TORCH_INDEX_URL}"; else set --; fi; \
    grep -q "^torch==${TORCH_VERSION}\$" /tmp/requirements/torch.txt \
      || { echo "TORCH_VERSION=${TORCH_VERSION} is not the torch of docker/requirements/torch.txt (make lock)"; exit 1; }; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/python -m pip install "$@" --require-virtualenv -r /tmp/requirements/torch.txt
COPY docker/requirements/worker.txt /tmp/requirements/worker.txt
RUN --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    set -eu; \
    if ls /tmp/wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /tmp/wheels; else set --; fi; \
    /opt/venv/bin/python -m pip install "$@" --require-virtualenv -r /tmp/requirements/torch.txt -r /tmp/requirements/worker.txt

FROM ${PYTHON_IMAGE}
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
# The image's default PATCHDIFF_DEVICE. cuda: a worker that sees no GPU fails at start-up instead of
# silently sampling on the CPU ("auto" would). The CPU build (docker-compose.cpu.yml) passes cpu.
ARG DEVICE=cuda
# NVIDIA_*: what the NVIDIA container toolkit exposes to the container (the official CUDA images
# set the same).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    PATCHDIFF_DEVICE=${DEVICE} \
    PATCHDIFF_WEIGHTS_DIR=/app/weights \
    PATCHDIFF_STORE_DIR=/app/data/results
RUN groupadd --gid 10001 patchdiff \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/patchdiff --shell /usr/sbin/nologin patchdiff \
    && mkdir -p /app/data/results /app/data/compile-cache /app/data/gpu-locks \
    && chown -R patchdiff:patchdiff /app/data
COPY --from=deps /opt/venv /opt/venv
# Fails the build if the torch is not the pinned version, or a CUDA build was asked for (no
# TORCH_INDEX_URL, or a /cuXXX one) and a CPU-only build came.
RUN python -c "import sys, torch; v = torch.__version__.split('+')[0]; print('torch', torch.__version__, 'cuda', torch.version.cuda); sys.exit(0 if v == '${TORCH_VERSION}' else 'torch %s, expected ${TORCH_VERSION}' % v)" \
    && case "${TORCH_INDEX_URL}" in \
         */cpu) python -c "import torch, sys; sys.exit('a CUDA torch from a CPU index' if torch.version.cuda else 0)" ;; \
         *) [ "${DEVICE}" = cpu ] || python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'a CPU-only torch for a CUDA image')" ;; \
       esac
WORKDIR /app
# The models (manifest.json, *.safetensors): baked in, loaded once at start-up.
COPY weights/ ./weights/
COPY pyproject.toml README.md ./
COPY patchdiff_core/ ./patchdiff_core/
COPY worker/ ./worker/
RUN pip install --no-deps --no-build-isolation --no-index . && rm -rf build ./*.egg-info

USER 10001:10001

# Healthy while the worker's control loop goes round (`worker/health.py`: a file it touches at least
# every few seconds; no Redis call, no keyspace scan). The start period covers loading the models.
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s --retries=3 CMD ["python", "-m", "worker.health"]

CMD ["python", "-m", "worker"]
