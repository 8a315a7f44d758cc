#!/usr/bin/env bash
# The GPU checks as one prepared script (at most 8 minutes on one H100/H200-class card), each report
# section written as soon as it is measured, into $OUT_DIR/gpu_check.md (default benchmarks/results/):
#   1. gpu_check.py: the golden fixtures on the device (fp32 must match the original code);
#   2. gpu_serving_check.py: the networks served the default way (compiled in the background):
#      church_p4-sized MFU, the demo model's burst, worker start cold and warm (compile cache), a
#      service burst through a real worker and Redis against the engine alone, precision per model,
#      CUDA graphs and dynamic shapes per bucket;
#   3. gpu_worker_check.py: mixed jobs through the real worker, pictures against fp32;
#   4. one `patchdiff sample` grid ($OUT_DIR/gpu_sample.png).
#
#   bash benchmarks/gpu_check.sh              # on a machine with a CUDA GPU and `make install` done
#   bash benchmarks/gpu_check.sh --smoke      # all of it tiny, on the CPU (tests/test_benchmarks_smoke.py)
#   PY=python3 OUT_DIR=/tmp/out WHEELS=.whl bash benchmarks/gpu_check.sh
#
# WHEELS: a folder of wheels (benchmarks/gpu_wheels.sh makes it) installed into a temporary folder
# first, for a machine whose Python has torch but not the service's pure-Python dependencies.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-benchmarks/results}
SMOKE=0
[ "${1:-}" = "--smoke" ] && SMOKE=1
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [ -n "${WHEELS:-}" ]; then
    site=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "$WHEELS"/*.whl || exit 1
    export PYTHONPATH="$site:$PYTHONPATH"
fi
status=0
REPORT="$OUT_DIR/gpu_check.md"
if [ "$SMOKE" = 1 ]; then
    timeout 120 "$PY" benchmarks/gpu_check.py --device cpu --quick --sections header,golden --out "$REPORT" >/dev/null || status=1
    timeout 600 "$PY" benchmarks/gpu_serving_check.py --device cpu --smoke --budget 500 --out "$REPORT" >/dev/null || status=1
    timeout 180 "$PY" benchmarks/gpu_worker_check.py --device cpu --quick --out "$REPORT" >/dev/null || status=1
    timeout 60 "$PY" -m patchdiff_core.cli sample --model digits --device cpu --num-images 2 --timesteps 3 --seed 0 --quiet \
        --out "$OUT_DIR/gpu_sample.png" || status=1
    exit $status
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 60 "$PY" benchmarks/gpu_check.py --device cuda --sections header,golden --out "$REPORT" || status=1
timeout 390 "$PY" benchmarks/gpu_serving_check.py --device cuda --budget 300 --out "$REPORT" || status=1
timeout 80 "$PY" benchmarks/gpu_worker_check.py --device cuda --out "$REPORT" || status=1
timeout 30 "$PY" -m patchdiff_core.cli sample --model digits --device cuda --num-images 64 --seed 0 --quiet \
    --out "$OUT_DIR/gpu_sample.png" || status=1
exit $status
