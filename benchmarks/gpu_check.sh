#!/usr/bin/env bash
# The GPU checks as one prepared script (about 8 minutes on one H100-class card): the golden fixtures
# on the device, reduced-precision error, the batching engine by rows per forward, forward throughput
# by batch size and precision (with torch.compile and CUDA graphs) and MFU, the real worker end to
# end, and one `patchdiff sample` grid. Writes $OUT_DIR/gpu_check.md (default benchmarks/results/).
#
#   bash benchmarks/gpu_check.sh                  # on a machine with a CUDA GPU and `make install` done
#   PY=python3 OUT_DIR=/tmp/out bash benchmarks/gpu_check.sh   # another interpreter / report folder
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
status=0
timeout 330 "$PY" benchmarks/gpu_check.py --device cuda --budget 280 --out "$OUT_DIR/gpu_check.md" || status=1
timeout 150 "$PY" benchmarks/gpu_worker_check.py --device cuda --out "$OUT_DIR/gpu_check.md" || status=1
timeout 60 "$PY" -m patchdiff_core.cli sample --model digits --device cuda --num-images 64 --seed 0 --quiet \
    --out "$OUT_DIR/gpu_sample.png" || status=1
exit $status
