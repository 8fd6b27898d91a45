#!/usr/bin/env bash
# The main job on the embedded default (what `make demo` runs): a reduced transfer study on the
# embedded backbone with the shipped LoRA source deltas (data/sources/lora, one per study task) as the
# pool. Targets: planted variants of two pool tasks (the positive control: the method must find their
# siblings) and two real tasks; each tuned on its 64-shot split from random init, from the plain
# average of the pool and from the Loss-weighted average, three seeds each. The per-target steps run
# as two shards in parallel (one per core), then the report step prints the report's answer.
#   bash scripts/demo.sh                      # -> runs/demo/report.md
# Every variable can be set from the environment; extra arguments go to every run_study.py call.
set -euo pipefail
cd "$(dirname "$0")/.."

OUTPUT_DIR=${OUTPUT_DIR:-runs/demo}  # the study's folder (report.md, report.csv, gain.png)
METHODS=${METHODS:-lora}  # delta methods (shipped sources exist for adapter, lora and prefix)
TARGETS=${TARGETS:-planted-babi-qa20 planted-babi-qa8 babi-qa2 babi-qa5}  # planted and real targets
SEEDS=${SEEDS:-42 43 44}  # target seeds
TARGET_ITERS=${TARGET_ITERS:-50}  # updates of each target run on its 64 examples
SHARDS=${SHARDS:-2}  # processes running the per-target steps at once
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

# inputs cut to 128 tokens: the backbone's pretraining length, at which the shipped sources were tuned
flags=(--output_dir "$OUTPUT_DIR" --methods $METHODS --targets $TARGETS --inits average --scores Loss
       --seeds $SEEDS --step_budgets 0 --target_train_iters "$TARGET_ITERS" --valid_interval "$TARGET_ITERS"
       --log_interval "$TARGET_ITERS" --early_stop 0 --max_input_length 128 --max_output_length 8 "$@")
mkdir -p "$OUTPUT_DIR"
echo "demo: $SHARDS shards of the per-target steps (logs: $OUTPUT_DIR/shard_*.log), then the report"
pids=()
for ((i = 0; i < SHARDS; i++)); do
    OMP_NUM_THREADS=1 "$PYTHON" run_study.py "${flags[@]}" --steps sources random similarity ensemble targets \
        --shard "$i/$SHARDS" --quiet --progress=false > "$OUTPUT_DIR/shard_$i.log" 2>&1 &
    pids+=($!)
done
status=0
for i in "${!pids[@]}"; do
    if ! wait "${pids[$i]}"; then
        echo "demo: shard $i failed:" >&2
        tail -n 5 "$OUTPUT_DIR/shard_$i.log" >&2
        status=1
    fi
done
[ "$status" = 0 ] || exit 1
"$PYTHON" run_study.py "${flags[@]}" --steps report --quiet | sed -n '/^## The answer/,/^## Majority-answer baseline/p' \
    | sed '$d'
echo "report: $OUTPUT_DIR/report.md"
