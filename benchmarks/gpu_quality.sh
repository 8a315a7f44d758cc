#!/usr/bin/env bash
# The few-step quality check on a GPU. Writes into $OUT_DIR (default benchmarks/results/):
# digits_quality_seeds.md, digits_quality_seed{0,1,2}.json, digits_quality_table.md, digits_quality.png.
#
# 1. `patchdiff tune-timesteps` on the device for each sampler:steps of DEVICE_TUNE, on TUNE_IMAGES
#    images (on the H200, 12-26 s each for 3 to 5 steps, 169 s for 10). weights/manifest.json's
#    default schedule is the unipc_bh1:5 that this step printed there.
# 2. digits_quality.py on seeds 0, 1 and 2 side by side, PER_CLASS images of each digit per setting
#    (the demo model is so small that several processes share one card): KEY_SETTINGS, the model's
#    default and the schedules of step 1; then their cross-seed summary (on the H200, 7 settings at
#    300 per class: 125 s).
# 3. Beside step 2, the README's full table and plot (the script's default settings), seed 0, 300 per
#    class (on the H200 it finished within 5 minutes, beside step 2 at PER_CLASS=1000).
# With PER_CLASS=1000 and 10-step tuning the whole did not finish in 9 minutes there.
#
#   bash benchmarks/gpu_quality.sh                                 # with `make install` done
#   PY=python3 OUT_DIR=/tmp/out bash benchmarks/gpu_quality.sh      # another interpreter / folder
#   DEVICE=cpu PER_CLASS=2 TABLE_PER_CLASS=2 TUNE_IMAGES=4 KEY_SETTINGS=ddim:5:1.0 DEVICE_TUNE=ddim:3 \
#       TABLE_SETTINGS=ancestral:10:1.0,ddim:5:1.0 bash benchmarks/gpu_quality.sh   # the plumbing, on a CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT_DIR=${OUT_DIR:-benchmarks/results}
DEVICE=${DEVICE:-cuda}
PER_CLASS=${PER_CLASS:-300}
TABLE_PER_CLASS=${TABLE_PER_CLASS:-300}
TUNE_IMAGES=${TUNE_IMAGES:-1000}
# 4 and 5 steps take 12-26 s each there (1000 images); 10 steps, 169 s.
DEVICE_TUNE=${DEVICE_TUNE:-"unipc_bh1:4 unipc_bh1:5 unipc:5"}
KEY_SETTINGS=${KEY_SETTINGS:-"ancestral:250:1.0,unipc_bh1:5:1.0,unipc_bh1:10:1.0,dpmpp_2m:100:1.0"}
mkdir -p "$OUT_DIR"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
status=0

default=$("$PY" -c 'from pathlib import Path; from patchdiff_core.generation.registry import get_model
d = get_model("digits", Path("weights")).defaults; print(d.sampler, d.timesteps, d.guidance, sep=":")') || exit 1
settings="$KEY_SETTINGS,$default"
for item in $DEVICE_TUNE; do
    start=$(date +%s)
    spec=$("$PY" -m patchdiff_core.cli tune-timesteps --model digits --device "$DEVICE" --precision fp32 --quiet \
        --sampler "${item%%:*}" --steps "${item##*:}" --num-images "$TUNE_IMAGES" --batch-size "$TUNE_IMAGES") || { status=1; continue; }
    echo "tuned on $DEVICE: ${item%%:*} ${item##*:} steps -> $spec ($(( $(date +%s) - start )) s)"
    settings="$settings,${item%%:*}:$spec:1.0"
done
echo "key settings: $settings"

pids=()
for seed in 0 1 2; do
    "$PY" benchmarks/digits_quality.py --device "$DEVICE" --threads 4 --per-class "$PER_CLASS" --batch-size 2000 \
        --seed "$seed" --settings "$settings" --json-out "$OUT_DIR/digits_quality_seed$seed.json" > /dev/null &
    pids+=($!)
done
"$PY" benchmarks/digits_quality.py --device "$DEVICE" --threads 4 --per-class "$TABLE_PER_CLASS" --batch-size 1500 \
    --seed 0 ${TABLE_SETTINGS:+--settings "$TABLE_SETTINGS"} --plot "$OUT_DIR/digits_quality.png" \
    > "$OUT_DIR/digits_quality_table.md" || status=1
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
"$PY" benchmarks/digits_quality_seeds.py "$OUT_DIR"/digits_quality_seed{0,1,2}.json | tee "$OUT_DIR/digits_quality_seeds.md" || status=1
exit $status
