# syntax=docker/dockerfile:1
#
# The patchdiff HTTP API. Torch-free: it installs the `api` extra only (no `core`), so neither torch
# nor the model weights are in this image; it validates requests, queues jobs in Redis and serves
# results from the object store. Build from the repository root:
#
#   docker build -f docker/api.Dockerfile -t patchdiff-api .
#
# Same Python minor version as the worker image (pytorch/pytorch:2.6.0 ships 3.11) and as the tests.
FROM python:3.11.13-slim-bookworm

# PATCHDIFF_WEIGHTS_DIR: where `GET /models` reads weights/manifest.json. Results go to S3 when
# PATCHDIFF_STORE_S3_BUCKET is set (compose sets it), else to PATCHDIFF_STORE_DIR.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PATCHDIFF_WEIGHTS_DIR=/app/weights \
    PATCHDIFF_STORE_DIR=/app/data/results

WORKDIR /app

# Only what the API needs. worker/ is matched by [tool.setuptools.packages.find] but is optional
# there (find only lists what exists), and the API never imports it. README.md is the package's
# `readme` (pyproject.toml).
COPY pyproject.toml README.md ./
COPY patchdiff_core/ ./patchdiff_core/
COPY api/ ./api/
# The manifest only (model names, configs, classes, defaults); never the .safetensors files.
COPY weights/manifest.json ./weights/manifest.json

RUN pip install --no-cache-dir ".[api]" \
    && rm -rf build ./*.egg-info \
    && python -c "import importlib.util, sys, api.main; assert 'torch' not in sys.modules and importlib.util.find_spec('torch') is None, 'torch in the API image'" \
    && groupadd --gid 10001 patchdiff \
    && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/patchdiff --shell /usr/sbin/nologin patchdiff \
    && mkdir -p /app/data/results \
    && chown -R patchdiff:patchdiff /app/data

USER 10001:10001

EXPOSE 8000

# No curl in the slim image: Python's urllib (raises, so exits non-zero, on anything but a 2xx).
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=3)"]

# The access log is our own (JSON, api/observe.py): uvicorn's is off.
CMD ["uvicorn", "--factory", "api.main:create_app", "--host", "0.0.0.0", "--port", "8000", "--no-access-log"]
