"""GraNd similarity: sum over a few dev batches of the gradient norm of the loss w.r.t. each source
delta's parameters, on each target's dev data; per T5 block or sublayer site with --mode block|layer.

    python get_similarity/get_GraNd.py --source_checkpoint_path runs/adapter/sources \
        --task_dir data/fewshot --output_dir runs/adapter/similarity/GraNd --mode block

Writes result.tsv (--mode dev) or one {encoder,decoder}_block_{i}[_layer_{j}]_result.tsv per group,
and scores.json (lower is more similar).
Every tunable below can be overridden as --name=value or --name value; `--help` lists them.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: run from anywhere
from pewe.model import DEFAULT_MODEL, REPO  # noqa: E402

task_dir = str(REPO / "data" / "fewshot")  # targets: CrossFit task folders, each scored on its dev split
tasks = []  # score only these targets (default: every task folder of task_dir)
source_checkpoint_path = ""  # folder of source task folders holding checkpoint-best*.safetensors (required)
source_tasks = []  # use only these sources (default: every task folder with a checkpoint)
output_dir = ""  # where result files, scores.json and log.txt go (required)
model = str(DEFAULT_MODEL)  # backbone: a Hugging Face T5 name or a local folder
tokenizer_path = str(DEFAULT_MODEL)  # tokenizer: a Hugging Face name or a local folder
mode = "dev"  # dev: one score per source; block: per T5 block; layer: per sublayer site (adapter / LoRA only)
grand_batches = None  # dev batches summed, 0 = all (None: the original's 10 in dev mode, 5 in block / layer)
grand_dropout = True  # dropout on while taking gradients, as the original (False: eval mode, deterministic)
predict_batch_size = 50  # dev batch size (the original's similarity scripts pass 50)
max_input_length = 512  # input tokens kept
max_output_length = 64  # answer tokens kept
truncation_side = "auto"  # auto (left for bAbI, right otherwise), left or right
seed = 42  # seed of everything random (GraNd's dropout masks)
device = "auto"  # auto (cuda if available), cpu or cuda
precision = "auto"  # auto (bf16 autocast where the hardware has it), fp32 or bf16
quiet = False  # no progress bar
tune_method = None  # adapter, lora or prefix: if given, must match the source checkpoints (whose config is used)
apply_adapter = False  # the original's flag: if given, must match the source checkpoints
adapter_type = None  # if given, must match the source checkpoints
adapter_size = None  # if given, must match the source checkpoints
apply_lora = False  # the original's flag: if given, must match the source checkpoints
lora_r = None  # if given, must match the source checkpoints
lora_alpha = None  # if given, must match the source checkpoints
apply_prefix = False  # the original's flag: if given, must match the source checkpoints
prefix_num = None  # if given, must match the source checkpoints
prefix_r = None  # if given, must match the source checkpoints
do_train = False  # accepted for the original's command lines; unused
do_predict = False  # accepted for the original's command lines; unused
one_prefix = False  # accepted; unused (the first split of each target is scored)
learning_rate_list = []  # accepted for the original's command lines; unused
bsz_list = []  # accepted for the original's command lines; unused
train_iters = 100000  # accepted for the original's command lines; unused
warmup_steps = 200  # accepted for the original's command lines; unused
valid_interval = 100  # accepted for the original's command lines; unused
log_interval = 100  # accepted for the original's command lines; unused
early_stop = 10  # accepted for the original's command lines; unused


def main(argv=None):
    from pewe.cli import run_entry
    from pewe.configurator import configure

    a = configure(globals(), __file__, argv)
    return run_entry(a, "log.txt", _run)


def _run(a, model, tokenizer, device, precision):
    from pewe.similarity import run_similarity

    run_similarity(a, model, tokenizer, device, precision, ["GraNd"])


if __name__ == "__main__":
    sys.exit(main())
