#!/bin/bash
# The device checks of lockstep runs, as one script for a GPU machine (about 10 minutes on an H200):
#   1. benchmarks/gpu_batched_runs.py: K = 1, 4, 16, 64 runs of a T5-base shape (runs/s, memory, MFU);
#   2. the demo's study (Makefile DEMO_FLAGS) on cuda in bf16, one run at a time and in groups of 16,
#      each timed, and the two reports side by side (they differ only where dropout draws differ).
# usage: bash benchmarks/gpu_check.sh [OUT]   (OUT default runs/gpu_check; $OUT/*.log hold everything)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-runs/gpu_check}}  # where the logs and the two studies go
PYTHON=${PYTHON:-.venv/bin/python}  # the project's interpreter
KS=${KS:-1 4 16 64}  # runs per lockstep group in the benchmark
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
$PYTHON benchmarks/gpu_batched_runs.py --ks $KS 2>&1 | tee "$OUT/gpu_batched_runs.log"
DEMO="--tasks babi-qa1 babi-qa2 babi-qa6 --inits average --scores Loss --seeds 42 43 --step_budgets 0 25 50 100
      --source_train_iters 200 --target_train_iters 100 --valid_interval 100 --log_interval 100 --early_stop 0
      --max_output_length 8 --device cuda --precision bf16 --progress false --quiet"
for K in 1 16; do
  start=$(date +%s)
  $PYTHON run_study.py $DEMO --output_dir "$OUT/demo_k$K" --batch_runs $K > "$OUT/demo_k$K.log" 2>&1
  echo "demo_study_k${K}_seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/summary.txt"
done
diff "$OUT/demo_k1/report.csv" "$OUT/demo_k16/report.csv" > "$OUT/report_diff.txt" || true
echo "report.csv lines that differ (dropout draws): $(grep -c '^<' "$OUT/report_diff.txt" || true)" | tee -a "$OUT/summary.txt"
