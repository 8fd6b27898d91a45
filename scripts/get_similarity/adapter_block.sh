#!/usr/bin/env bash
# block similarity, adapter deltas: per T5 block, hidden-state cosine vs the random-init-tuned target delta (higher = closer).
# As the original's adapter_block.sh. Run it from its folder (cd scripts/get_similarity;
# bash adapter_block.sh) or from anywhere. Paths are relative to the repo root; each variable
# can be overridden from the environment; extra arguments go to the Python script.
set -euo pipefail
cd "$(dirname "$0")/../.."

METHOD=adapter
METRIC=block
MODEL=${MODEL:-data/t5-mini}                       # backbone + tokenizer (the original: t5.1.1.lm100k.base)
TASK_DIR=${TASK_DIR:-data/fewshot}                 # targets, each scored on its dev split
SOURCES=${SOURCES:-runs/${METHOD}/sources}         # {task}/checkpoint-best.safetensors tuned on data/full
RANDOM_TUNED=${RANDOM_TUNED:-runs/${METHOD}/random}  # {task}/checkpoint-best.safetensors tuned on data/fewshot
OUTPUT_DIR=${OUTPUT_DIR:-runs/${METHOD}/similarity/${METRIC}}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

"$PYTHON" get_similarity/get_block.py \
    --tune_method "$METHOD" --apply_adapter \
    --predict_batch_size 50 \
    --quiet \
    --model "$MODEL" --tokenizer_path "$MODEL" \
    --task_dir "$TASK_DIR" \
    --source_checkpoint_path "$SOURCES" \
    --random_tuned_ckpt_path "$RANDOM_TUNED" \
    --output_dir "$OUTPUT_DIR" \
    "$@"
