"""Tune every source delta for a few hundred updates on every target's few-shot data, as the
original's tune_all_ckpt.py; the Euclidean and Performance weightings read what it keeps.

    python tune_all_ckpt.py --tune_method adapter --apply_adapter --train_checkpoint runs/adapter/sources \
        --output_dir runs/adapter/tune_all --task_dir data/fewshot --train_iters 200 --valid_interval 50

Writes {output_dir}/{target}/{source}/checkpoint-best.safetensors (best by dev), checkpoint-last.safetensors
(after the last update), result.json, and {output_dir}/result.tsv (per target: source,best dev score).
A rerun skips finished pairs and resumes a killed one. Every tunable below can be overridden as
--name=value or --name value; `--help` lists them.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from anywhere
from pewe.model import DEFAULT_MODEL, REPO  # noqa: E402

task_dir = str(REPO / "data" / "fewshot")  # folder of the targets' task folders ({task}/{task}_{k}_{seed}_{split}.tsv)
tasks = []  # targets: only these tasks (default: every task folder of task_dir)
shard = ""  # "i/n": run every n-th target starting at i (spread the pairs over processes or machines)
train_checkpoint = ""  # folder of the source deltas, {task}/checkpoint-best*.safetensors (required)
source_tasks = []  # sources: only these (default: every subfolder of train_checkpoint with a delta)
skip_self = True  # skip the target's own source delta (the weighting leaves it out anyway)
output_dir = ""  # where {target}/{source}/ checkpoints, log.txt and result.tsv go (required)
model = str(DEFAULT_MODEL)  # backbone: a Hugging Face T5 name or a local folder
tokenizer_path = str(DEFAULT_MODEL)  # tokenizer: a Hugging Face name or a local folder
do_train = True  # accepted for the original's scripts (every pair is trained)
do_predict = False  # also score the test split with each pair's best delta, as the original did
tune_method = "adapter"  # adapter, lora or prefix (must match the source deltas)
apply_adapter = False  # the original's flag for tune_method adapter
adapter_type = "houlsby"  # houlsby (swish, after attention and FFN) or pfeiffer (relu, after FFN)
adapter_size = 12  # adapter bottleneck width
apply_lora = False  # the original's flag for tune_method lora
lora_r = 10  # LoRA rank
lora_alpha = 16  # LoRA scale numerator (scale = alpha / r)
lora_targets = ["q", "v"]  # T5 Linear layers LoRA wraps: any of q k v o (every attention), wi wi_0 wi_1 wo (every FFN)
lora_rslora = False  # LoRA scale alpha / sqrt(r) (rank-stabilised, peft's use_rslora) instead of alpha / r
apply_prefix = False  # the original's flag for tune_method prefix
prefix_num = 120  # number of prefix vectors per stack
prefix_r = 24  # width of the prefix MLP
learning_rate_list = [5e-4]  # the learning rate (one value; a list for the original's flag)
bsz_list = [8]  # the batch size (one value; above 16, accumulated from batches of 16)
train_iters = 200  # updates per pair (the original's scripts: 200)
warmup_steps = 0  # accepted for the original's scripts; its constant schedule ignores it
valid_interval = 50  # validate on dev every this many updates, keeping the best (original: 50)
log_interval = 50  # log the train loss every this many updates
early_stop = 0  # stop a pair after this many validations without gain (<= 0: never; the original's 10 never fires in 4)
predict_batch_size = 80  # batch size for dev and test decoding
max_input_length = 512  # input tokens kept
max_output_length = 64  # answer tokens kept / generated
truncation_side = "auto"  # auto (left for bAbI, right otherwise), left or right
keep_resume = False  # keep each finished pair's resume.safetensors (delta + optimizer state; deleted by default)
seed = 42  # seed of the data order and dropout (the same for every pair)
batch_runs = "auto"  # pairs tuned together in one forward (of one target where they can): auto (1 on a CPU, 16 on a GPU) or a number (1 = one at a time)
overwrite = False  # start every pair afresh, even one whose folder holds another pair's work
device = "auto"  # auto (cuda if available), cpu or cuda
precision = "auto"  # auto (bf16 autocast where the hardware has it), fp32 or bf16
quiet = False  # terminal shows warnings only (everything still goes to log.txt)
progress = True  # a progress bar over the pairs


def main(argv=None):
    from pewe.cli import run_entry
    from pewe.configurator import configure

    a = configure(globals(), __file__, argv)
    from pewe.tuning import check_tune_options

    return run_entry(a, "log.txt", _run, check=check_tune_options)


def _run(a, model, tokenizer, device, precision):
    from pewe.transfer import tune_all

    result = tune_all(a, model, tokenizer, device, precision)
    print(f"results: {result}")
    print(Path(result).read_text(), end="")


if __name__ == "__main__":
    sys.exit(main())
