# Zero-shot dev score of every adapter source delta on every target of DATA_DIR (the original's
# dev_all); unit_model/unit_model_Performance.py subtracts it from the score after tune_all.
#   cd scripts; bash adapter_devall.sh
# Paths are relative to the repository root; any variable can be set from the environment, and extra
# arguments (e.g. --tasks a b, --shard 0/2) go to dev_all_ckpt.py.
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-data/fewshot}  # the targets' few-shot task folders
MODEL=${MODEL:-data/t5-mini}  # backbone (the paper: google/t5-base-lm-adapt)
TOKENIZER=${TOKENIZER:-$MODEL}  # tokenizer folder or name
SOURCES=${SOURCES:-runs/adapter/sources}  # source deltas: {task}/checkpoint-best*.safetensors
OUTPUT_DIR=${OUTPUT_DIR:-runs/adapter/dev_all}  # result.tsv, result.json, log.txt
TUNE_METHOD=adapter
ADAPTER_SIZE=${ADAPTER_SIZE:-12}  # adapter bottleneck width

python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
$python dev_all_ckpt.py \
--predict_batch_size 80 \
--tune_method ${TUNE_METHOD} \
--quiet \
--apply_adapter \
--adapter_type houlsby \
--adapter_size ${ADAPTER_SIZE} \
--model "${MODEL}" \
--tokenizer_path "${TOKENIZER}" \
--test_checkpoint "${SOURCES}" \
--output_dir "${OUTPUT_DIR}" \
--task_dir "${DATA_DIR}" \
"$@"
