"""Tune a delta (adapter / LoRA / prefix) on every task folder of --task_dir, as the original script.

    python tune_hps_singletask.py --do_train --do_predict --tune_method adapter --apply_adapter \
        --output_dir runs/adapter --task_dir data/fewshot

Every tunable below can be overridden as --name=value or --name value; `--help` lists them.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from anywhere
from pewe.model import DEFAULT_MODEL, REPO  # noqa: E402

task_dir = str(REPO / "data" / "fewshot")  # folder of CrossFit task folders ({task}/{task}_{k}_{seed}_{split}.tsv)
tasks = []  # run only these tasks (default: every task folder of task_dir)
shard = ""  # "i/n": run every n-th task starting at i (spread a study over processes or machines)
output_dir = ""  # where {task}/ checkpoints, log.txt and result.tsv go (required)
model = str(DEFAULT_MODEL)  # backbone: a Hugging Face T5 name or a local folder
tokenizer_path = str(DEFAULT_MODEL)  # tokenizer: a Hugging Face name or a local folder
do_train = False  # train a delta on each task's train split, validating on dev
do_predict = False  # predict the test split with the best (or --test_checkpoint) delta
train_checkpoint = ""  # initialise from DIR/without_{task}_checkpoint.safetensors (or one file or peft folder; "" = random)
test_checkpoint = ""  # evaluate this delta (a file, or a folder with {task}/checkpoint-best*; "" = the run's best)
tune_method = "adapter"  # adapter, lora or prefix
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
one_prefix = False  # run only the first data split (file prefix) of each task folder
learning_rate_list = [5e-4]  # learning rates to try
bsz_list = [8]  # batch sizes to try (above 16, accumulated from batches of 16)
train_iters = 100000  # most updates per run
warmup_steps = 200  # accepted for the original's scripts; its constant schedule ignores it
valid_interval = 100  # validate on dev every this many updates
log_interval = 100  # log the train loss every this many updates
early_stop = 10  # stop after this many validations without improvement (<= 0: never)
predict_batch_size = 80  # batch size for dev and test decoding
max_input_length = 512  # input tokens kept
max_output_length = 64  # answer tokens kept / generated
truncation_side = "auto"  # auto (left for bAbI, right otherwise), left or right
step_budgets = []  # also record the dev score after these update counts (e.g. 0 25 50 100)
seed = 42  # seed of the delta initialisation, the data order and dropout
overwrite = False  # start every run afresh, even one whose folder holds another run's work
device = "auto"  # auto (cuda if available), cpu or cuda
precision = "auto"  # auto (bf16 autocast where the hardware has it), fp32 or bf16
quiet = False  # terminal shows warnings only (everything still goes to log.txt)
progress = True  # progress bars on the terminal


def main(argv=None):
    from pewe.cli import run_entry
    from pewe.configurator import configure

    a = configure(globals(), __file__, argv)
    from pewe.tuning import check_tune_options

    return run_entry(a, "log.txt" if a.do_train else "eval_log.txt", _run, check=check_tune_options)


def _run(a, model, tokenizer, device, precision):
    from pewe.tuning import tune_tasks

    result = tune_tasks(a, model, tokenizer, device, precision)
    print(f"results: {result}")
    print(Path(result).read_text(), end="")


if __name__ == "__main__":
    sys.exit(main())
