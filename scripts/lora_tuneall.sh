# Tune every lora source delta for 200 updates on every target of DATA_DIR (the original's settings);
# unit_model/unit_model_Euclidean.py and unit_model_Performance.py read the result.
#   cd scripts; bash lora_tuneall.sh
#   bash scripts/lora_tuneall.sh --shard 0/2 & bash scripts/lora_tuneall.sh --shard 1/2  # two processes
# Paths are relative to the repository root; any variable can be set from the environment, and extra
# arguments (e.g. --do_predict to also score test, --tasks a b) go to tune_all_ckpt.py.
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-data/fewshot}  # the targets' few-shot task folders
MODEL=${MODEL:-data/t5-mini}  # backbone (the paper: google/t5-base-lm-adapt)
TOKENIZER=${TOKENIZER:-$MODEL}  # tokenizer folder or name
SOURCES=${SOURCES:-runs/lora/sources}  # source deltas: {task}/checkpoint-best*.safetensors
OUTPUT_DIR=${OUTPUT_DIR:-runs/lora/tune_all}  # {target}/{source}/ checkpoints, log.txt, result.tsv
TUNE_METHOD=lora
LORA_R=${LORA_R:-10}  # LoRA rank
LORA_ALPHA=${LORA_ALPHA:-16}  # LoRA scale numerator

python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
$python tune_all_ckpt.py \
--do_train \
--learning_rate_list 5e-4 \
--bsz_list 8 \
--train_iters 200 \
--warmup_steps 0 \
--valid_interval 50 \
--log_interval 50 \
--predict_batch_size 80 \
--tune_method ${TUNE_METHOD} \
--quiet \
--apply_lora \
--lora_r ${LORA_R} \
--lora_alpha ${LORA_ALPHA} \
--model "${MODEL}" \
--tokenizer_path "${TOKENIZER}" \
--train_checkpoint "${SOURCES}" \
--output_dir "${OUTPUT_DIR}" \
--task_dir "${DATA_DIR}" \
"$@"
