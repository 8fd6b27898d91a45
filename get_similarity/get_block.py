"""Hidden-state similarity per block: for each T5 block, the sum over dev rows of the cosine between the
row's hidden states under each source delta and under the delta tuned on the target from random init.

    python get_similarity/get_block.py --source_checkpoint_path runs/adapter/sources \
        --random_tuned_ckpt_path runs/adapter/random \
        --task_dir data/fewshot --output_dir runs/adapter/similarity/block

Writes one {encoder,decoder}_block_{i}_result.tsv per block and scores.json (higher is more
similar).
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
random_tuned_ckpt_path = ""  # {target}/checkpoint-best*.safetensors: deltas tuned on each target from random init (required)
output_dir = ""  # where result files, scores.json and log.txt go (required)
model = str(DEFAULT_MODEL)  # backbone: a Hugging Face T5 name or a local folder
tokenizer_path = str(DEFAULT_MODEL)  # tokenizer: a Hugging Face name or a local folder
num_batches = 1  # dev batches read per (target, source), 0 = all (the original reads only the first)
hidden_site = "output"  # compare each block's output, or its input as the original did (block 0 = embeddings)
predict_batch_size = 50  # dev batch size (the original's similarity scripts pass 50)
max_input_length = 512  # input tokens kept
max_output_length = 64  # answer tokens kept
truncation_side = "auto"  # auto (left for bAbI, right otherwise), left or right
seed = 42  # seed of everything random (unused by eval-mode scores)
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

    run_similarity(a, model, tokenizer, device, precision, ["block"])


if __name__ == "__main__":
    sys.exit(main())
