"""Zero-shot dev score of every source delta on every target's few-shot dev split, as the original's
dev_all_ckpt.py; the Performance weighting subtracts it from the score after tune_all_ckpt.py.

    python dev_all_ckpt.py --tune_method adapter --apply_adapter --test_checkpoint runs/adapter/sources \
        --output_dir runs/adapter/dev_all --task_dir data/fewshot

Writes {output_dir}/result.tsv (per target: source,score), result.json and {target}/result.json; a
rerun skips scored pairs. Every tunable below can be overridden as --name=value or --name value;
`--help` lists them.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from anywhere
from pewe.model import DEFAULT_MODEL, REPO  # noqa: E402

task_dir = str(REPO / "data" / "fewshot")  # folder of the targets' task folders ({task}/{task}_{k}_{seed}_{split}.tsv)
tasks = []  # targets: only these tasks (default: every task folder of task_dir)
shard = ""  # "i/n": run every n-th target starting at i (spread the pairs over processes or machines)
test_checkpoint = ""  # folder of the source deltas, {task}/checkpoint-best*.safetensors (required)
source_tasks = []  # sources: only these (default: every subfolder of test_checkpoint with a delta)
skip_self = True  # skip the target's own source delta (the weighting leaves it out anyway)
output_dir = ""  # where result.tsv, result.json and log.txt go (required)
model = str(DEFAULT_MODEL)  # backbone: a Hugging Face T5 name or a local folder
tokenizer_path = str(DEFAULT_MODEL)  # tokenizer: a Hugging Face name or a local folder
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
predict_batch_size = 80  # batch size for dev decoding
max_input_length = 512  # input tokens kept
max_output_length = 64  # answer tokens generated
truncation_side = "auto"  # auto (left for bAbI, right otherwise), left or right
seed = 42  # seed (decoding is greedy: only the delta attachment draws random numbers)
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
    from pewe.transfer import dev_all

    result = dev_all(a, model, tokenizer, device, precision)
    print(f"results: {result}")
    print(Path(result).read_text(), end="")


if __name__ == "__main__":
    sys.exit(main())
