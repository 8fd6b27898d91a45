# Zero-shot dev score of every lora source delta on every target of DATA_DIR (the original's
# dev_all); unit_model/unit_model_Performance.py subtracts it from the score after tune_all.
#   cd scripts; bash lora_devall.sh
# Paths are relative to the repository root; any variable can be set from the environment, and extra
# arguments (e.g. --tasks a b, --shard 0/2) go to dev_all_ckpt.py.
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-data/fewshot}  # the targets' few-shot task folders
MODEL=${MODEL:-data/t5-mini}  # backbone (the paper: google/t5-base-lm-adapt)
TOKENIZER=${TOKENIZER:-$MODEL}  # tokenizer folder or name
SOURCES=${SOURCES:-runs/lora/sources}  # source deltas: {task}/checkpoint-best*.safetensors
OUTPUT_DIR=${OUTPUT_DIR:-runs/lora/dev_all}  # result.tsv, result.json, log.txt
TUNE_METHOD=lora
LORA_R=${LORA_R:-10}  # LoRA rank
LORA_ALPHA=${LORA_ALPHA:-16}  # LoRA scale numerator

python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
$python dev_all_ckpt.py \
--predict_batch_size 80 \
--tune_method ${TUNE_METHOD} \
--quiet \
--apply_lora \
--lora_r ${LORA_R} \
--lora_alpha ${LORA_ALPHA} \
--model "${MODEL}" \
--tokenizer_path "${TOKENIZER}" \
--test_checkpoint "${SOURCES}" \
--output_dir "${OUTPUT_DIR}" \
--task_dir "${DATA_DIR}" \
"$@"
