#!/usr/bin/env bash
# The GPU checks as one prepared script (under 8 minutes on one H100-class card): reduced-precision
# error, forward throughput by batch size and precision (with torch.compile and CUDA graphs) and MFU,
# and the batching engine under a burst. Writes benchmarks/results/gpu_check.md.
#
#   bash benchmarks/gpu_check.sh            # on a machine with a CUDA GPU and `make install` done
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
mkdir -p benchmarks/results
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 470 "$PY" benchmarks/gpu_check.py --device cuda --out benchmarks/results/gpu_check.md
