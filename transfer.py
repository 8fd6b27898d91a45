"""New tasks from a pool of tuned source deltas, in one command: score every source on each new task's
dev split, weight the sources (softmax of the score), average them into the task's initial delta, tune
it on the task's train split, and score test when the task has one.

    python transfer.py --task_dir my_tasks/ --source_dir POOL --method lora --score Loss
    python transfer.py --task_dir my_tasks/ --source_dir data/sources/lora --compare_random

A new task is a CrossFit task folder ({task}/{task}_{k}_{seed}_{train,dev[,test]}.tsv, lines
``input<TAB>answer``); the pool is a folder of {source}/checkpoint-best.safetensors (this project's,
e.g. the shipped data/sources/{method}) tuned on the same backbone. A new task that is also in the pool
leaves its own source out. Writes {output_dir}/report.md (the top sources and their weights, dev and
test scores), the weights (final_weight.txt, weights.csv, heat map) and the deltas (pewe/newtask.py).
Every tunable below can be overridden as --name=value or --name value; `--help` lists them.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from anywhere
from pewe.model import DEFAULT_MODEL, REPO  # noqa: E402

task_dir = ""  # the new tasks: a folder of CrossFit task folders (train and dev splits; test optional) (required)
tasks = []  # only these new tasks (default: every task folder of task_dir)
source_dir = ""  # the pool: a folder of {source}/checkpoint-best*.safetensors, e.g. data/sources/lora (required)
sources = []  # only these sources of the pool (default: every one)
method = "lora"  # the pool's delta method: adapter, lora or prefix (checked against the pool)
score = "Loss"  # how a source is scored: Loss, KL, EL2N, Cosine_of_Logits_and_Labels, GraNd or Cosine (pewe/scores.py)
temperature = None  # softmax temperature (None: the score's default, pewe/scores.py; per label token for summed scores)
compare_random = False  # also tune each task from a random init and report both
top = 5  # sources listed per task in report.md
output_dir = str(REPO / "runs" / "transfer")  # report.md, the weights, the initial and tuned deltas
model = str(DEFAULT_MODEL)  # backbone the pool was tuned on: a Hugging Face T5 name or a local folder
tokenizer_path = str(DEFAULT_MODEL)  # tokenizer: a Hugging Face name or a local folder
seed = 42  # seed of the tuning (data order, dropout; the random init with compare_random)
learning_rate = 5e-4  # Adafactor learning rate (the paper's)
batch_size = 8  # batch size (the paper's)
train_iters = 3000  # most updates on each new task (early stopping usually ends it)
valid_interval = 100  # validate on dev every this many updates, keeping the best
log_interval = 100  # log the train loss every this many updates
early_stop = 10  # stop after this many validations without improvement (<= 0: never)
predict_batch_size = 80  # batch size for dev and test decoding
max_input_length = 512  # input tokens kept
max_output_length = 64  # answer tokens kept / generated
truncation_side = "auto"  # auto (left for bAbI, right otherwise), left or right
sim_num_batches = 1  # dev batches the forward scores read, 0 = all (the original: the first)
sim_batch_size = 50  # dev batch size of the similarity scores (the original: 50)
grand_batches = 10  # GraNd dev batches, 0 = all (the original: 10)
device = "auto"  # auto (cuda if available), cpu or cuda
precision = "auto"  # auto (bf16 autocast where the hardware has it), fp32 or bf16
overwrite = False  # redo every score, initial delta and run, even finished ones
quiet = False  # terminal shows warnings only (everything still goes to log.txt)
progress = True  # progress bars on the terminal


def main(argv=None):
    from pewe.cli import run_entry
    from pewe.configurator import configure
    from pewe.newtask import new_task_plan, run_new_tasks

    a = configure(globals(), __file__, argv)
    return run_entry(a, "log.txt", run_new_tasks, check=new_task_plan)


if __name__ == "__main__":
    sys.exit(main())
