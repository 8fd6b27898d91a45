# Rebuild the embedded default backbone (data/t5-mini) from scratch: tokenizer + pretrained T5.
#   cd scripts; bash pretrain_backbone.sh          (about 9 minutes on 2 idle CPU cores; minutes on a GPU)
# Every variable can be set from the environment; extra arguments go to pretrain_backbone.py
# (`python scripts/pretrain_backbone.py --help` lists all its parameters).
cd "$(dirname "$0")/.."

OUTPUT_DIR=${OUTPUT_DIR:-data/t5-mini}  # model + tokenizer folder (replaced when the run finishes)
TEXT_DIR=${TEXT_DIR:-data/full}  # task folders whose train splits are the pretraining text
STEPS=${STEPS:-2000}  # pretraining updates
BATCH_SIZE=${BATCH_SIZE:-16}  # sequences per update
LEARNING_RATE=${LEARNING_RATE:-6e-4}  # peak AdamW learning rate
POSITION_BIAS_INIT=${POSITION_BIAS_INIT:-normal}  # normal (T5's random init) or recency (ALiBi's distance penalty)
POSITION_LR_SCALE=${POSITION_LR_SCALE:-50}  # relative position bias tables learn at this multiple of it (1: blind to word order)
MAX_INPUT_LENGTH=${MAX_INPUT_LENGTH:-128}  # input tokens kept while pretraining
PROBE_EVERY=${PROBE_EVERY:-500}  # updates between greedy scores on the upstream tasks' dev rows (0: at the end only)
DEVICE=${DEVICE:-auto}  # auto, cpu or cuda

python=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
$python scripts/pretrain_backbone.py \
--output_dir "${OUTPUT_DIR}" \
--text_dirs "${TEXT_DIR}" \
--steps ${STEPS} \
--batch_size ${BATCH_SIZE} \
--learning_rate ${LEARNING_RATE} \
--position_bias_init ${POSITION_BIAS_INIT} \
--position_lr_scale ${POSITION_LR_SCALE} \
--max_input_length ${MAX_INPUT_LENGTH} \
--probe_every ${PROBE_EVERY} \
--device ${DEVICE} \
"$@"
