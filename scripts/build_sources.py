"""Rebuild the shipped source deltas, data/sources/{method}/{task}/checkpoint-best.safetensors (+ .json).

Every study task is tuned on its full split with the study's own recipe (``run_study.py --steps
sources``: Adafactor 5e-4, batch 8, validation on the full dev split every ``valid_interval`` updates,
the best delta kept, early stop after ``early_stop`` validations without gain), then its best delta is
copied in with the fingerprint of the backbone it was tuned on (``base_model_sha256``: the study
refuses a shipped source on another backbone) and its scores. ``data/sources/sources.json`` lists
every shipped source's dev and test score next to its task's majority-answer score.

    python scripts/build_sources.py                                  # every method and study task
    python scripts/build_sources.py --shard 0/2 & python scripts/build_sources.py --shard 1/2   # 2 processes
    python scripts/build_sources.py --steps ship                     # copy finished runs in, rewrite sources.json

Resumable: the runs skip or resume as the study's always do, and shipping rewrites only what changed.
Every tunable below can be overridden as --name=value or --name value; `--help` lists them.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pewe.model import DEFAULT_MODEL, REPO  # noqa: E402
from task_list import STUDY_TASKS  # noqa: E402

methods = ["lora", "adapter", "prefix"]  # delta methods to build, in this order (their default sizes, as the study's)
tasks = list(STUDY_TASKS)  # source tasks (the study's tasks on the embedded backbone)
steps = ["train", "ship"]  # train (tune the sources) and / or ship (copy them into out_dir)
shard = ""  # "i/n": this process trains every n-th task from i (run n processes, then --steps ship)
work_dir = str(REPO / "runs" / "sources_build")  # the study's output folder for the source runs
task_dir = str(REPO / "data" / "full")  # the sources' data: CrossFit task folders (full splits)
out_dir = str(REPO / "data" / "sources")  # where the shipped deltas and sources.json go
model = str(DEFAULT_MODEL)  # backbone the sources are tuned on
train_iters = ["lora=3000", "adapter=2000", "prefix=2000"]  # updates per source, per method (docs/BACKBONE.md)
valid_interval = 250  # validate on the full dev split every this many updates (200 rows: a validation costs about 25 updates)
early_stop = 0  # stop after this many validations without gain (0: never; LoRA sits on a plateau for 1,000 updates)
learning_rate = 5e-4  # Adafactor learning rate (the study's)
batch_size = 8  # batch size (the study's)
seed = 42  # seed of the source deltas (the study's source_seed)
max_input_length = 128  # input tokens kept: the backbone's pretraining length (bAbI is cut from the left, keeping the question)
device = "auto"  # auto, cpu or cuda
precision = "auto"  # auto (bf16 autocast where the hardware has it), fp32 or bf16
progress = True  # progress bars


def main(argv=None):
    from pewe.cli import run_cli
    from pewe.configurator import configure

    a = configure(globals(), __file__, argv)
    return run_cli(_run, a)


def _run(a):
    import run_study
    from pewe.errors import UserError
    from pewe.sources import ship_sources

    unknown = [s for s in a.steps if s not in ("train", "ship")]
    if unknown:
        raise UserError(f"--steps: unknown step(s) {', '.join(unknown)}; expected train and / or ship")
    budgets = {}
    for item in a.train_iters:
        method, eq, iters = str(item).partition("=")
        if not eq or not iters.isdigit():
            raise UserError(f"--train_iters: {item!r} is not method=updates")
        budgets[method] = int(iters)
    missing = [m for m in a.methods if m not in budgets]
    if missing:
        raise UserError(f"--train_iters: no budget for {', '.join(missing)}")
    for method in a.methods if "train" in a.steps else ():
        code = run_study.main(["--steps", "sources", "--methods", method, "--tasks", *a.tasks,
                               "--source_shard", a.shard, "--source_dir", "", "--output_dir", a.work_dir,
                               "--source_task_dir", a.task_dir,
                               "--model", a.model, "--tokenizer_path", a.model,
                               "--source_train_iters", str(budgets[method]), "--valid_interval", str(a.valid_interval),
                               "--early_stop", str(a.early_stop), "--learning_rate", str(a.learning_rate),
                               "--batch_size", str(a.batch_size), "--source_seed", str(a.seed), "--device", a.device,
                               "--max_input_length", str(a.max_input_length),
                               "--precision", a.precision, f"--progress={a.progress}", "--quiet"])
        if code:
            raise SystemExit(code)
    if "ship" in a.steps:
        table = ship_sources(Path(a.work_dir), Path(a.out_dir), a.methods, a.tasks, a.model, task_dir=a.task_dir,
                             max_input_length=a.max_input_length)
        print(markdown_table(table, a.tasks))
        print(f"wrote {Path(a.out_dir) / 'sources.json'} ({sum(len(v) for v in table.values())} sources)")


def markdown_table(table: dict, tasks) -> str:
    """The shipped sources' test scores (x 100) against each task's majority answer and the bare
    backbone's own score: docs/BACKBONE.md's table. ✓: more than 5 points above the majority answer;
    ✓✓: above the bare backbone by as much too (the delta added a skill the backbone lacked)."""
    methods = [m for m in ("adapter", "lora", "prefix") if m in table]
    lines = ["| task | majority answer | bare backbone | " + " | ".join(f"{m} test (best at update)" for m in methods)
             + " |", "|---|---|---|" + "---|" * len(methods)]
    clear, added = {m: 0 for m in methods}, {m: 0 for m in methods}
    for task in tasks:
        entries = {m: table[m].get(task) for m in methods}
        majority = next((e["majority"] for e in entries.values() if e), None)
        if majority is None:
            continue
        cells = []
        for m, e in entries.items():
            if e is None:
                cells.append("—")
                continue
            above_majority, above_bare = e["test"] - majority["score"] > 0.05, e["test"] - e["backbone"] > 0.05
            clear[m] += above_majority
            added[m] += above_majority and above_bare
            mark = " ✓✓" if above_majority and above_bare else " ✓" if above_majority else ""
            cells.append(f"{100 * e['test']:.1f} ({e['best_step']}){mark}")
        bare = next(e["backbone"] for e in entries.values() if e)
        lines.append(f"| {task} | {100 * majority['score']:.1f} (`{majority['answer']}`) | {100 * bare:.1f} | "
                     + " | ".join(cells) + " |")
    lines.append("| **clearly above the majority answer (> 5 points, ✓)** | | | "
                 + " | ".join(f"**{clear[m]} of {sum(1 for t in tasks if table[m].get(t))}**" for m in methods) + " |")
    lines.append("| **... and above the bare backbone by as much (✓✓)** | | | "
                 + " | ".join(f"**{added[m]}**" for m in methods) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
