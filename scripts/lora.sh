# Tune a lora delta on every task folder of DATA_DIR, with the original's hyper-parameters.
#   cd scripts; bash lora.sh                                   # 64-shot targets from random init
#   DATA_DIR=data/full OUTPUT_DIR=runs/lora/sources bash lora.sh  # source deltas on the full splits
#   TRAIN_CHECKPOINT=runs/lora/init/Loss OUTPUT_DIR=runs/lora/Loss bash lora.sh  # from weighted averages
# Paths are relative to the repository root; any variable can be set from the environment.
cd "$(dirname "$0")/.."

DATA_DIR=${DATA_DIR:-data/fewshot}  # CrossFit task folders
MODEL=${MODEL:-data/t5-mini}  # backbone (the paper: google/t5-base-lm-adapt)
TOKENIZER=${TOKENIZER:-$MODEL}  # tokenizer folder or name
OUTPUT_DIR=${OUTPUT_DIR:-runs/lora/random}  # checkpoints, log.txt, result.tsv
TRAIN_CHECKPOINT=${TRAIN_CHECKPOINT:-}  # folder of without_{task}_checkpoint*.safetensors (empty: random init)
TUNE_METHOD=lora
LORA_R=${LORA_R:-10}  # LoRA rank
LORA_ALPHA=${LORA_ALPHA:-16}  # LoRA scale numerator

python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
$python tune_hps_singletask.py \
--do_train \
--do_predict \
--learning_rate_list 5e-4 \
--bsz_list 8 \
--train_iters 100000 \
--warmup_steps 200 \
--valid_interval 100 \
--log_interval 100 \
--early_stop 10 \
--predict_batch_size 80 \
--tune_method ${TUNE_METHOD} \
--quiet \
--apply_lora \
--lora_r ${LORA_R} \
--lora_alpha ${LORA_ALPHA} \
--model "${MODEL}" \
--tokenizer_path "${TOKENIZER}" \
--output_dir "${OUTPUT_DIR}" \
--task_dir "${DATA_DIR}" \
${TRAIN_CHECKPOINT:+--train_checkpoint "${TRAIN_CHECKPOINT}"} \
"$@"
