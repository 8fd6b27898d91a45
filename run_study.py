"""The main job: the leave-one-out transfer study end to end, in one process, with a paper-style report.

    python run_study.py                       # the whole study on the embedded backbone (long on a CPU)
    python run_study.py --steps report        # rebuild report.md / report.csv / gain.png from the files

Steps (pewe/study.py): sources -> random -> similarity -> ensemble -> targets -> report. Every step
skips what is done, so the same command resumes an interrupted study. Outputs: {output_dir}/report.md,
report.csv, gain.png, heatmaps/, and per method {output_dir}/{method}/ (sources, similarity, init,
targets).

On a Slurm cluster, scripts/slurm_study.sh submits the study as three chained jobs (the sources and
the per-target steps as array jobs, then the report) and resumes it when submitted again; README.md,
"On a cluster", also covers several GPUs of one node.

By hand: `--source_shard i/n` splits the sources step and `--shard i/n` the per-target steps, every
call with the same other options. A shard runs the per-target steps for every n-th target;
several shards may run at once. Run one after another, `--shard 0/2`, `--shard 1/2`, then
`--steps report` gives the same report as one unsharded run.

Every tunable below can be overridden as --name=value or --name value; `--help` lists them.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # run from anywhere
from pewe.model import DEFAULT_MODEL, REPO  # noqa: E402
from task_list import STUDY_TASKS  # noqa: E402

output_dir = str(REPO / "runs" / "study")  # all outputs: {method}/ runs, report.md, report.csv, gain.png, log.txt
steps = ["all"]  # steps to run: all, or some of sources random similarity ensemble targets report
methods = ["adapter"]  # delta methods studied: adapter, lora, prefix
tasks = list(STUDY_TASKS)  # the study's tasks: each is a source and, leaving itself out, a target
targets = []  # do the per-target steps only for these tasks (default: every task)
shard = ""  # "i/n": the per-target steps (random similarity ensemble targets) for every n-th target from i
source_shard = ""  # "i/n": the sources step tunes every n-th source from i
source_dir = "auto"  # reuse these source deltas ({task}/checkpoint-best* or {task}/ peft LoRA folders; "{method}" is replaced); auto: the shipped data/sources/{method} on the embedded backbone; "": tune them here
source_task_dir = str(REPO / "data" / "full")  # the sources' data: CrossFit task folders (full splits)
target_task_dir = str(REPO / "data" / "fewshot")  # the targets' data: CrossFit task folders (few-shot splits)
model = str(DEFAULT_MODEL)  # backbone: a Hugging Face T5 name or a local folder
tokenizer_path = str(DEFAULT_MODEL)  # tokenizer: a Hugging Face name or a local folder
inits = ["average", "manual"]  # initialisations besides random and the scores': average, manual, and the peers' NAME or NAME=SCORE (SCORE among --scores): task_arithmetic ties dare_linear dare_ties lora_exact topk=S lorahub lorahub_from=S (pewe/inits.py)
merge_options = []  # name=value parameters of the peers' combinations (pewe.inits.MERGE_OPTIONS: lambda=1 ties_density=0.2 dare_drop=0.8 topk_k=3 lorahub_budget=40 lorahub_bound=1.5 lorahub_l1=0.05 ...)
groups = []  # manual groups ("a b c" each); default task_list.BUNDLED_GROUPS and the paper's QA_groups, restricted to the tasks
scores = ["Loss", "KL", "EL2N", "Cosine_of_Logits_and_Labels", "GraNd", "Cosine", "Euclidean",
          "Performance"]  # one softmax init per score (every score of the paper)
temperatures = []  # Name=T overrides of the softmax temperatures (pewe.study.TEMPERATURES: Loss 0.1, Cosine 0.001, ...)
per_token = True  # temperatures of summed scores are per label token (GraNd: per batch): T x count
seeds = [42, 43, 44]  # target seeds: delta init, data order, dropout (the first also gives the reference deltas)
source_seed = 42  # seed of the source deltas
step_budgets = [0, 25, 50, 100]  # also record the targets' dev score after these update counts
learning_rate = 5e-4  # Adafactor learning rate (sources and targets)
batch_size = 8  # batch size (sources and targets)
source_train_iters = 5000  # most updates of a source delta (early stopping usually ends it)
target_train_iters = 3000  # most updates of a target delta (early stopping usually ends it)
valid_interval = 100  # validate on dev every this many updates
log_interval = 100  # log the train loss every this many updates
early_stop = 10  # stop after this many validations without improvement (<= 0: never)
predict_batch_size = 80  # batch size for dev and test decoding
max_input_length = 512  # input tokens kept
max_output_length = 64  # answer tokens kept / generated
truncation_side = "auto"  # auto (left for bAbI, right otherwise), left or right
sim_num_batches = 1  # dev batches the forward scores read, 0 = all (the original: the first)
sim_batch_size = 50  # dev batch size of the similarity scores (the original: 50)
grand_batches = 10  # GraNd dev batches, 0 = all (the original: 10)
pair_train_iters = 200  # Euclidean / Performance: updates of each source delta on each target (the original: 200)
pair_valid_interval = 50  # Euclidean / Performance: validate the short tunings every this many updates (original: 50)
adapter_type = "houlsby"  # houlsby (swish, after attention and FFN) or pfeiffer (relu, after FFN)
adapter_size = 12  # adapter bottleneck width
lora_r = 10  # LoRA rank
lora_alpha = 16  # LoRA scale numerator (scale = alpha / r)
lora_targets = ["q", "v"]  # T5 Linear layers LoRA wraps: any of q k v o (every attention), wi wi_0 wi_1 wo (every FFN)
lora_rslora = False  # LoRA scale alpha / sqrt(r) (rank-stabilised, peft's use_rslora) instead of alpha / r
prefix_num = 120  # number of prefix vectors per stack
prefix_r = 24  # width of the prefix MLP
device = "auto"  # auto (cuda if available), cpu or cuda
precision = "auto"  # auto (bf16 autocast where the hardware has it), fp32 or bf16
quiet = False  # terminal shows warnings only (everything still goes to log.txt)
progress = True  # progress bars on the terminal
batch_runs = "auto"  # runs trained, validated and tested together in one forward: auto (1 on a CPU, 16 on a GPU) or a number (1 = one at a time)
overwrite = False  # redo every run, pair, part and initial delta of the steps asked for, even finished ones


def main(argv=None):
    from pewe.cli import run_entry
    from pewe.configurator import configure
    from pewe.study import make_plan, needs_model, run_study

    a = configure(globals(), __file__, argv)
    return run_entry(a, "log.txt", run_study, needs_model=needs_model(a), check=make_plan)


if __name__ == "__main__":
    sys.exit(main())
