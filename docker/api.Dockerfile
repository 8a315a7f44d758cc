# The patchdiff HTTP API. Torch-free: it installs the API's locked dependencies only
# (docker/requirements/api.txt), so neither torch nor the model weights are in this image; it
# validates requests, queues jobs in Redis and serves results from the object store. It also carries
# docker/s3_init.py, which the compose stack runs once to create the results bucket and its
# retention rule. Build from the repository root:
#
#   docker build -f docker/api.Dockerfile -t patchdiff-api .
#
# Layers, most stable first: the locked dependencies in a venv (rebuilt only when the lock changes),
# the user, then the source (a code change rebuilds only the last, seconds).
#
# PYTHON_IMAGE: any Debian-like image with python3 (3.10+), the `venv` module and useradd: the
# official one by default; an air-gapped site points it at its own mirror.
# Offline build: put wheels for every line of the lock in docker/wheels/ (`make wheelhouse`) and
# build with --network none: pip then installs from there only. The wheels are bind-mounted for the
# install and never land in a layer.
ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm

FROM ${PYTHON_IMAGE} AS deps
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
COPY docker/requirements/api.txt /tmp/requirements/api.txt
RUN --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    set -eu; \
    if ls /tmp/wheels/*.whl >/dev/null 2>&1; then set -- --no-index --find-links /tmp/wheels; else set --; fi; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/python -m pip install "$@" --require-virtualenv -r /tmp/requirements/api.txt; \
    /opt/venv/bin/python -c "import importlib.util, sys; sys.exit('torch in the API image' if importlib.util.find_spec('torch') else 0)"

FROM ${PYTHON_IMAGE}
# PATCHDIFF_WEIGHTS_DIR: where `GET /models` reads weights/manifest.json. Results go to S3 when
# PATCHDIFF_STORE_S3_BUCKET is set (compose sets it), else to PATCHDIFF_STORE_DIR.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATCHDIFF_WEIGHTS_DIR=/app/weights \
    PATCHDIFF_STORE_DIR=/app/data/results
RUN groupadd --gid 10001 patchdiff \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/patchdiff --shell /usr/sbin/nologin patchdiff \
    && mkdir -p /app/data/results \
    && chown -R patchdiff:patchdiff /app/data
COPY --from=deps /opt/venv /opt/venv
WORKDIR /app

# Only what the API needs: worker/ is optional for [tool.setuptools.packages.find] and the API never
# imports it. README.md is the package's `readme` (pyproject.toml). The weights manifest only (model
# names, configs, classes, defaults); never the .safetensors files.
COPY pyproject.toml README.md ./
COPY patchdiff_core/ ./patchdiff_core/
COPY api/ ./api/
COPY weights/manifest.json ./weights/manifest.json
COPY docker/s3_init.py ./s3_init.py
# The project itself, without dependencies (all in the venv) and without network.
RUN pip install --no-deps --no-build-isolation --no-index . \
    && rm -rf build ./*.egg-info \
    && python -c "import importlib.util, sys, api.main; assert 'torch' not in sys.modules and importlib.util.find_spec('torch') is None, 'torch in the API image'"

USER 10001:10001
EXPOSE 8000

# No curl in the slim image: Python's urllib (raises, so exits non-zero, on anything but a 2xx).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]

# The access log is our own (JSON, api/observe.py): uvicorn's is off.
CMD ["uvicorn", "--factory", "api.main:create_app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
