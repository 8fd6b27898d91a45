"""Measure what docs/BACKBONE.md reports about a backbone:

1. held-out span-corruption loss of the backbone vs the same architecture at random init
   (from the backbone's pretrain_report.json);
2. zero-shot test score on the upstream tasks (trained supervised in pretraining) vs the majority answer;
3. per bundled task, the test score of a source delta (``method``: adapter by default) tuned on the
   full split vs the majority answer;
4. 64-shot tuning of a few targets (the same method) from random init vs from a related source's
   delta, dev score at several step budgets, over several seeds.

    python scripts/backbone_report.py                     # -> runs/backbone_report/report.md
    python scripts/backbone_report.py --method lora --output_dir runs/backbone_report_lora
Every step reuses finished runs (tune_hps_singletask.py skips them), so an interrupted report resumes.
"""
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pewe.model import DEFAULT_MODEL, REPO  # noqa: E402
from task_list import STUDY_TASKS, UPSTREAM_TASKS  # noqa: E402

model = str(DEFAULT_MODEL)  # the backbone folder to measure
output_dir = str(REPO / "runs" / "backbone_report")  # runs and report.md
upstream_tasks = list(UPSTREAM_TASKS)  # tasks whose zero-shot test score is measured (the backbone trained on them)
method = "adapter"  # delta method of the source and 64-shot runs: adapter, lora or prefix (their default sizes)
source_tasks = list(STUDY_TASKS)  # tasks whose source delta is measured against the majority answer
source_iters = 1000  # updates of each source delta on its full split
source_valid_interval = 250  # validation interval of the source runs (the best validation is kept)
source_early_stop = 0  # stop a source run after this many validations without improvement (0: never)
pairs = ["babi-qa2:babi-qa1", "babi-qa9:babi-qa6"]  # target:related-source pairs
seeds = [42, 43, 44]  # seeds of the 64-shot runs
budgets = [0, 25, 50, 100, 200]  # update counts at which the 64-shot dev score is recorded
learning_rate = 5e-4  # the original's learning rate, for every run
extra = []  # more flags for every tune_hps_singletask.py call (e.g. --device cuda)


# tune_hps_singletask.py's default size of each method (what the runs use)
SIZES = {"adapter": "Adapter (houlsby, 12)", "lora": "LoRA (r 10, alpha 16)", "prefix": "Prefix (120 vectors, MLP 24)"}


def tune(args, a):
    cmd = [sys.executable, str(REPO / "tune_hps_singletask.py"), "--do_train", "--do_predict",
           "--model", a.model, "--tokenizer_path", a.model, "--tune_method", a.method, f"--apply_{a.method}",
           "--learning_rate_list", str(a.learning_rate), "--quiet", *map(str, args), *a.extra]
    subprocess.run(cmd, check=True)


def runs(out, task):
    return [json.loads(p.read_text()) for p in sorted((Path(out) / task / "runs").glob("*/result.json"))]


def majority_score(task):
    from pewe.data import read_tsv
    from pewe.metrics import evaluate, majority_answer, metric_for

    test = read_tsv(REPO / "data" / "full" / task / f"{task}_full_test.tsv")
    answers = [ex.answers for ex in test]
    guess = majority_answer(answers)
    return evaluate([guess] * len(answers), answers, metric_for(task)), guess


def zero_shot_scores(model_path, tasks, max_input_length=512):
    """(metric, greedy test score, order sensitivity) of the bare backbone on each task: the score on
    the full test split; pewe.pretrain.order_sensitivity on 64 supervised dev rows."""
    import torch

    from pewe.data import read_tsv
    from pewe.model import autocast, load_backbone, resolve_precision
    from pewe.pretrain import order_sensitivity, supervised_batches, task_scores

    model, tok = load_backbone(model_path)
    cpu = torch.device("cpu")
    precision = resolve_precision("auto", cpu)
    tests = {t: read_tsv(REPO / "data" / "full" / t / f"{t}_full_test.tsv") for t in tasks}
    out = {}
    for task, (metric, score) in task_scores(model, tok, tests, cpu, precision, max_input_length, 16).items():
        dev = read_tsv(REPO / "data" / "full" / task / f"{task}_full_dev.tsv")[:64]
        batches = supervised_batches(tok, [(task, e.input, e.answers) for e in dev], 4, 16, max_input_length, 64)
        out[task] = metric, score, order_sensitivity(model, batches, cpu, autocast(cpu, precision))
    return out


def main(argv=None):
    from pewe.configurator import configure

    a = configure(globals(), __file__, argv)
    if a.method not in SIZES:
        print(f"error: --method must be one of {', '.join(SIZES)}, not {a.method!r}", file=sys.stderr)
        return 1
    missing = sorted({p.split(":")[1] for p in a.pairs} - set(a.source_tasks))
    if missing:
        print(f"error: --pairs name sources that are not --source_tasks: {missing}", file=sys.stderr)
        return 1
    out = Path(a.output_dir)
    lines = [f"Backbone: `{a.model}`", ""]

    rep = Path(a.model) / "pretrain_report.json"
    if rep.is_file():
        r = json.loads(rep.read_text())
        lines += ["## Held-out span-corruption loss", "",
                  "| model | loss |", "|---|---|",
                  f"| same architecture, random init | {r['heldout_loss_random_init']:.3f} |",
                  f"| backbone after {r['config']['steps']} updates | {r['heldout_loss']:.3f} |", ""]
        if r.get("upstream_order_sensitivity") is not None:  # 0 for a model blind to word order
            lines += [f"Order sensitivity on upstream dev rows (mean change of a row's loss when its input words "
                      f"are shuffled): {r['upstream_order_sensitivity']:.3f}.", ""]

    if a.upstream_tasks:
        lines += ["## Upstream tasks, zero-shot", "",
                  "The bare backbone on the full test split of each task it was trained on (train split) in "
                  "pretraining. Order sensitivity: mean change of a dev row's loss when its input words are "
                  "shuffled (0 for a model blind to word order).", "",
                  "| task | metric | backbone | majority answer | majority guess | order sensitivity |",
                  "|---|---|---|---|---|---|"]
        for task, (metric, score, order) in zero_shot_scores(a.model, a.upstream_tasks).items():
            maj, guess = majority_score(task)
            lines.append(f"| {task} | {metric} | {100 * score:.1f} | {100 * maj:.1f} | {guess} | {order:.3f} |")
        lines.append("")

    src = out / "sources"
    if a.source_tasks:  # (an empty list skips this section and the transfer one)
        tune(["--task_dir", REPO / "data" / "full", "--output_dir", src, "--tasks", *a.source_tasks,
              "--train_iters", a.source_iters, "--valid_interval", a.source_valid_interval,
              "--log_interval", a.source_valid_interval, "--early_stop", a.source_early_stop], a)
        lines += [f"## Source {a.method} deltas (full split) vs the majority answer", "",
                  f"{SIZES[a.method]}, lr {a.learning_rate}, batch 8, at most {a.source_iters} updates, best of "
                  f"validations every {a.source_valid_interval} (early stop after {a.source_early_stop} without "
                  f"improvement; 0: none); test split.", "",
                  f"| task | metric | source {a.method} | updates | majority answer | majority guess | upstream? |",
                  "|---|---|---|---|---|---|---|"]
        beat = clear = 0
        for task in a.source_tasks:
            r = runs(src, task)[0]
            maj, guess = majority_score(task)
            beat += r["test_score"] > maj
            clear += r["test_score"] > maj + 0.05
            lines.append(f"| {task} | {r['metric']} | {100 * r['test_score']:.1f} | {r.get('updates', '')} | "
                         f"{100 * maj:.1f} | {guess} | {'yes' if task in UPSTREAM_TASKS else ''} |")
        lines += ["", f"The source {a.method} beats the majority answer on {beat} of {len(a.source_tasks)} tasks, by "
                  f"more than 5 points on {clear}.", ""]

    if a.pairs:
        lines += ["## 64-shot targets: random init vs a related source's delta", "",
                  f"Dev score (64 examples) after each number of updates, mean ± std over seeds {a.seeds}.", "",
                  "| target | init | " + " | ".join(str(b) for b in a.budgets) + " |",
                  "|---|---|" + "---|" * len(a.budgets)]
        for pair in a.pairs:
            target, source = pair.split(":")
            for init in ("random", source):
                scores = {b: [] for b in a.budgets}
                for seed in a.seeds:
                    run_out = out / "transfer" / f"{target}_from_{init}_seed{seed}"
                    args = ["--task_dir", REPO / "data" / "fewshot", "--output_dir", run_out, "--tasks", target,
                            "--train_iters", max(a.budgets), "--valid_interval", max(a.budgets),
                            "--log_interval", max(a.budgets), "--early_stop", 0, "--seed", seed,
                            "--step_budgets", *a.budgets]
                    if init != "random":
                        args += ["--train_checkpoint", src / source / "checkpoint-best.safetensors"]
                    tune(args, a)
                    got = runs(run_out, target)[0]["budget_scores"]
                    for b in a.budgets:
                        scores[b].append(got[str(b)])
                cells = [f"{100 * statistics.mean(v):.1f} ± {100 * statistics.pstdev(v):.1f}" for v in scores.values()]
                lines.append(f"| {target} | {init} | " + " | ".join(cells) + " |")
    report = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
