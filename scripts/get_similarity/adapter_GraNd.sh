#!/usr/bin/env bash
# GraNd similarity, adapter deltas: sum over dev batches of the delta's gradient norm (lower = closer).
# As the original's adapter_GraNd.sh. Run it from its folder (cd scripts/get_similarity;
# bash adapter_GraNd.sh) or from anywhere. Paths are relative to the repo root; each variable
# can be overridden from the environment; extra arguments go to the Python script.
set -euo pipefail
cd "$(dirname "$0")/../.."

METHOD=adapter
METRIC=GraNd
MODEL=${MODEL:-data/t5-mini}                       # backbone + tokenizer (the original: t5.1.1.lm100k.base)
TASK_DIR=${TASK_DIR:-data/fewshot}                 # targets, each scored on its dev split
SOURCES=${SOURCES:-runs/${METHOD}/sources}         # {task}/checkpoint-best.safetensors tuned on data/full
MODE=${MODE:-dev}                                   # dev (one score), block or layer (per block / sublayer site)
OUTPUT_DIR=${OUTPUT_DIR:-runs/${METHOD}/similarity/${METRIC}$([ "$MODE" = dev ] || echo "_$MODE")}
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}

"$PYTHON" get_similarity/get_GraNd.py \
    --tune_method "$METHOD" --apply_adapter \
    --predict_batch_size 50 \
    --quiet \
    --model "$MODEL" --tokenizer_path "$MODEL" \
    --task_dir "$TASK_DIR" \
    --source_checkpoint_path "$SOURCES" \
    --mode "$MODE" \
    --output_dir "$OUTPUT_DIR" \
    "$@"
