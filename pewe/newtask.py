"""New tasks from a pool of source deltas: the method's everyday use (what ``transfer.py`` runs).

For each new task folder (train and dev splits; test optional): every source of the pool is scored
on the task's dev split, the scores become weights softmax(sign * score / T) (a task that is also in
the pool leaves its own source out), the weighted average of the sources initialises the task's
delta, which is tuned on its train split with the study's recipe and scored on test when there is
one. With ``compare_random`` the same tuning runs from a random init. The steps are the study's own
(``pewe.study``), on a plan whose pool and targets are given, so the folders are the study's:

  {output_dir}/report.md                               the top sources and weights, dev and test scores
  {output_dir}/{method}/similarity/{score}/result.tsv   every source's score for every new task
  {output_dir}/{method}/init/{score}/                   without_{task}_checkpoint.safetensors, final_weight.txt,
                                                        weights.csv, hot_pic_all.png
  {output_dir}/{method}/targets/{score}/seed_{seed}/    the tuned deltas (a tune_hps_singletask.py output_dir)
  {output_dir}/{method}/targets/random/seed_{seed}/     the same from random init (compare_random, or a
                                                        score that compares with a target-tuned delta)
"""
from __future__ import annotations

import logging
import statistics
from pathlib import Path

from delta_modules import DeltaError, read_delta
from pewe.atomic import atomic_write_text
from pewe.data import TextOptions, first_prefix
from pewe.layout import read_json, run_name, source_checkpoints
from pewe.scores import STUDY_SCORES, check_temperature, score_spec
from pewe.study import StudyPlan
from pewe.study.bench import Bench
from pewe.study.ensemble import step_ensemble
from pewe.study.random import step_random
from pewe.study.similarity import step_similarity
from pewe.study.sources import step_sources
from pewe.study.targets import step_targets
from pewe.tuning import select_tasks
from pewe.weights import effective_sources
from pewe.errors import UserError

log = logging.getLogger("pewe")


def new_task_plan(a) -> StudyPlan:
    """Check transfer.py's options (the tasks, the pool, the score) before any work; the plan."""
    if not a.task_dir or not a.source_dir:
        raise UserError("--task_dir (the new tasks) and --source_dir (the pool of source deltas) are both required")
    tasks = select_tasks(a.task_dir, a.tasks)
    for task in tasks:
        first_prefix(a.task_dir, task)  # each must have train and dev splits (one error naming the file)
    pool = source_checkpoints(a.source_dir, a.sources)
    _, config, _ = read_delta(next(iter(pool.values())))
    if config.method != a.method:
        raise DeltaError(f"{next(iter(pool.values()))}: the pool holds {config.method} deltas, not --method {a.method}")
    if a.score not in STUDY_SCORES or score_spec(a.score).kind == "pairs":
        usable = [s for s in STUDY_SCORES if score_spec(s).kind != "pairs"]
        raise UserError(f"--score {a.score}: expected one of {', '.join(usable)} (Euclidean and Performance tune "
                        f"every source on every task first: use run_study.py for them)")
    spec = score_spec(a.score)
    temperature = check_temperature(spec.temperature if a.temperature is None else a.temperature, "--temperature")
    random_too = a.compare_random or spec.needs_reference  # KL and weight Cosine compare with the random-init delta
    return StudyPlan(
        out=Path(a.output_dir), steps=("sources", *(("random",) if random_too else ()), "similarity", "ensemble",
                                       "targets"),
        methods=(a.method,), deltas={a.method: config}, tasks=tuple(pool), all_targets=tuple(tasks),
        targets=tuple(tasks), source_tasks=(), seeds=(a.seed,), budgets=(), scores=(a.score,), baselines=(),
        groups={}, temperatures={a.score: temperature}, per_token=True, model=str(a.model),
        source_dir=str(a.source_dir), source_task_dir="", target_task_dir=str(a.task_dir), source_seed=a.seed,
        learning_rate=a.learning_rate, batch_size=a.batch_size, source_train_iters=0, target_train_iters=a.train_iters,
        valid_interval=a.valid_interval, log_interval=a.log_interval, early_stop=a.early_stop,
        predict_batch_size=a.predict_batch_size,
        text=TextOptions(a.max_input_length, a.max_output_length, a.truncation_side),
        sim_num_batches=a.sim_num_batches, sim_batch_size=a.sim_batch_size, grand_batches=a.grand_batches,
        pair_train_iters=1, pair_valid_interval=1, progress=a.progress, overwrite=a.overwrite)


def run_new_tasks(a, model, tokenizer, device, precision) -> Path:
    """Score, weight, initialise, tune and test every new task; returns report.md."""
    plan = new_task_plan(a)
    bench = Bench(plan, model, tokenizer, device, precision)
    method = plan.methods[0]
    bench.use(method)
    log.info("%d new tasks, a pool of %d %s sources, %s weights", len(plan.targets), len(plan.tasks), method,
             plan.scores[0])
    for name, step in (("sources", step_sources), ("random", step_random), ("similarity", step_similarity),
                       ("ensemble", step_ensemble), ("targets", step_targets)):
        if name in plan.steps:
            step(bench, plan, method)
    report = plan.out / "report.md"
    atomic_write_text(report, report_text(plan, a.top))
    print(report.read_text(), end="")
    print(f"report: {report}")
    return report


def _result(plan: StudyPlan, init, task):
    path = (plan.tuned_dir(plan.methods[0], init, plan.seeds[0]) / task / "runs"
            / run_name(first_prefix(plan.target_task_dir, task), plan.learning_rate, plan.batch_size) / "result.json")
    return read_json(path, "run result") if path.is_file() else None


def _points(x) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def report_text(plan: StudyPlan, top=5) -> str:
    """report.md: per new task, its top sources and their weights, and the dev and test scores."""
    method, score = plan.methods[0], plan.scores[0]
    spec = score_spec(score)
    inits = [score, *(["random"] if "random" in plan.steps else [])]
    lines = [f"# New tasks from a pool of {len(plan.tasks)} {method} source deltas", "",
             f"Weights: softmax({'+' if spec.sign > 0 else '-'}{score} / T), T = {plan.temperatures[score]:g}"
             f"{' per ' + spec.temperature_unit if spec.temperature_unit else ''}; pool `{plan.source_dir}`; "
             f"backbone `{plan.model}`; tuned on each task's train split (lr {plan.learning_rate:g}, batch "
             f"{plan.batch_size}, at most {plan.target_train_iters} updates, validation every {plan.valid_interval}, "
             f"early stop after {plan.early_stop}), seed {plan.seeds[0]}. Scores × 100.", ""]
    for task in plan.targets:
        side = read_json(plan.init_path(method, score, task).with_suffix(".json"), "initial delta's sidecar")
        weights = sorted(side["weights"].items(), key=lambda kv: -kv[1])
        effective = effective_sources(w for _, w in weights)
        lines += [f"## {task}", "", f"Top sources (of {len(weights)}; effective sources {effective:.2f}): "
                  + ", ".join(f"{s} {w:.3f}" for s, w in weights[:top]), ""]
        rows = []
        for init in inits:
            r = _result(plan, init, task)
            name = f"from the {score}-weighted average" if init == score else "from random init"
            rows.append(f"| {name} | {_points(r and r['dev_score'])} | {_points(r and r['test_score'])} | "
                        f"{r['best_step'] if r else '—'} |")
        lines += ["| initial delta | dev | test | best at update |", "|---|---|---|---|", *rows, ""]
    if "random" in plan.steps:
        gains = [(_result(plan, score, t) or {}).get("test_score") for t in plan.targets]
        base = [(_result(plan, "random", t) or {}).get("test_score") for t in plan.targets]
        pairs = [(g, b) for g, b in zip(gains, base) if g is not None and b is not None]
        if pairs:
            lines += [f"Mean test gain over random init: {100 * statistics.fmean(g - b for g, b in pairs):+.2f} points "
                      f"over {len(pairs)} task(s), one seed.", ""]
    return "\n".join(lines)
