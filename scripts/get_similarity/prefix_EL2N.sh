#!/usr/bin/env bash
# EL2N similarity, prefix deltas: sum of ||softmax - one_hot|| over the dev label tokens (lower = closer).
# As the original's adapter_EL2N.sh. Run it from its folder (cd scripts/get_similarity;
# bash prefix_EL2N.sh) or from anywhere. Paths are relative to the repo root; each variable
# can be overridden from the environment; extra arguments go to the Python script.
set -euo pipefail
cd "$(dirname "$0")/../.."

METHOD=prefix
METRIC=EL2N
MODEL=${MODEL:-data/t5-mini}                       # backbone + tokenizer (the original: t5.1.1.lm100k.base)
TASK_DIR=${TASK_DIR:-data/fewshot}                 # targets, each scored on its dev split
SOURCES=${SOURCES:-runs/${METHOD}/sources}         # {task}/checkpoint-best.safetensors tuned on data/full
OUTPUT_DIR=${OUTPUT_DIR:-runs/${METHOD}/similarity/${METRIC}}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

"$PYTHON" get_similarity/get_EL2N.py \
    --tune_method "$METHOD" --apply_prefix \
    --predict_batch_size 50 \
    --quiet \
    --model "$MODEL" --tokenizer_path "$MODEL" \
    --task_dir "$TASK_DIR" \
    --source_checkpoint_path "$SOURCES" \
    --output_dir "$OUTPUT_DIR" \
    "$@"
