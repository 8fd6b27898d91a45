#!/bin/bash
# The device checks of lockstep runs, as one script for a GPU machine (about 10 minutes on an H200):
#   1. benchmarks/gpu_batched_runs.py: K = 1, 4, 16, 64 runs of a T5-base shape (runs/s, memory, MFU);
#   2. the demo's study (scripts/demo.sh) on cuda in bf16, one run at a time and in groups of 16,
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
for K in 1 16; do  # the demo (scripts/demo.sh: shipped LoRA sources, 4 targets x 3 inits x 3 seeds), one process
  start=$(date +%s)
  OUTPUT_DIR="$OUT/demo_k$K" SHARDS=1 PYTHON=$PYTHON bash scripts/demo.sh --device cuda --precision bf16 \
      --batch_runs $K > "$OUT/demo_k$K.log" 2>&1
  echo "demo_study_k${K}_seconds: $(( $(date +%s) - start ))" | tee -a "$OUT/summary.txt"
done
diff "$OUT/demo_k1/report.csv" "$OUT/demo_k16/report.csv" > "$OUT/report_diff.txt" || true
echo "report.csv lines that differ (dropout draws): $(grep -c '^<' "$OUT/report_diff.txt" || true)" | tee -a "$OUT/summary.txt"
