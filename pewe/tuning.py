"""Single-task tuning over an lr x batch-size grid: what ``tune_hps_singletask.py`` runs for each task.

Layout of ``output_dir`` (one folder per task, as the original):
  {task}/runs/{prefix}_lr_{lr}_bsz_{bsz}/  checkpoint-best.safetensors (+.json), resume.safetensors,
                                           predictions_test.tsv, result.json
  {task}/checkpoint-best.safetensors       the best run of the grid by dev score (+.json)
  result.tsv                               ``task,dev_score,test_score`` per run, rebuilt from the
                                           runs' result.json files (so a rerun never duplicates lines)
  log.txt
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from delta_modules import DeltaConfig, DeltaError, attach_delta, find_checkpoint, load_delta, save_delta, read_delta
from pewe.atomic import atomic_write_text
from pewe.data import DataError, list_tasks, read_tsv, split_path, split_prefixes, tokenize
from pewe.metrics import metric_for
from pewe.trainer import TrainSettings, can_extend, resume_counters, score_rows, set_seed, train, write_predictions

log = logging.getLogger("pewe")


def delta_config_from_args(a) -> DeltaConfig:
    """The delta of the original's flags: ``--tune_method`` and the matching ``--apply_*`` flag."""
    applied = [m for m in ("adapter", "lora", "prefix") if getattr(a, f"apply_{m}")]
    method = a.tune_method
    if method not in ("adapter", "lora", "prefix"):
        raise DeltaError(f"unknown --tune_method {method!r}; expected adapter, lora or prefix")
    if applied and applied != [method]:
        raise DeltaError(f"--tune_method {method} conflicts with --apply_{' --apply_'.join(applied)}")
    return DeltaConfig(method, adapter_type=a.adapter_type, adapter_size=a.adapter_size, lora_r=a.lora_r,
                       lora_alpha=a.lora_alpha, prefix_num=a.prefix_num, prefix_r=a.prefix_r)


def train_checkpoint_for(path, task):
    """``--train_checkpoint``: a single delta file, or a folder of ``without_{task}_checkpoint*``."""
    if path is None:
        return None
    path = Path(path)
    if path.is_file():
        return path
    return find_checkpoint(path, f"without_{task}_checkpoint*.safetensors")


def test_checkpoint_for(path, task):
    """``--test_checkpoint``: a delta file, a task folder, or a folder holding ``{task}/``."""
    path = Path(path)
    if path.is_dir() and (path / task).is_dir():
        return find_checkpoint(path / task)
    return find_checkpoint(path)


def _fmt(x):
    return f"{x:g}" if isinstance(x, float) else str(x)


def load_split(task_dir, task, prefix, split, tokenizer, a, one_row_per_answer):
    examples = read_tsv(split_path(task_dir, task, prefix, split))
    return tokenize(examples, tokenizer, task, a.max_input_length, a.max_output_length, a.truncation_side,
                    one_row_per_answer=one_row_per_answer)


def run_one(model, tokenizer, task, prefix, lr, bsz, a, device, precision, run_dir, fresh_delta):
    """One (task, split, lr, bsz) run: train and/or predict; returns its result dict."""
    done = run_dir / "result.json"
    resume = run_dir / "resume.safetensors"
    if done.exists():
        if not (a.do_train and resume.exists() and can_extend(resume_counters(resume), a.train_iters)):
            log.info("%s: already done (%s), skipping", run_dir, done)
            return json.loads(done.read_text())
        done.unlink()  # a finished run given a larger --train_iters continues (train() extends it)
    metric = metric_for(task)
    settings = TrainSettings(learning_rate=lr, batch_size=bsz, train_iters=a.train_iters,
                             valid_interval=a.valid_interval, log_interval=a.log_interval,
                             early_stop=a.early_stop, predict_batch_size=a.predict_batch_size,
                             max_output_length=a.max_output_length, seed=a.seed, precision=precision,
                             progress=a.progress)
    fresh_delta()  # the same seeded random init for every run
    result = {"task": task, "prefix": prefix, "learning_rate": lr, "batch_size": bsz, "metric": metric,
              "dev_score": None, "test_score": None}
    meta = {"task": task, "prefix": prefix, "base_model": str(a.model), "seed": a.seed,
            "learning_rate": lr, "batch_size": bsz}
    if a.do_train:
        train_rows = load_split(a.task_dir, task, prefix, "train", tokenizer, a, True)
        dev_rows = load_split(a.task_dir, task, prefix, "dev", tokenizer, a, False)
        init = train_checkpoint_for(a.train_checkpoint, task)
        summary = train(model, tokenizer, train_rows, dev_rows, metric, settings, run_dir, device,
                        init_checkpoint=init, meta={**meta, "init": str(init) if init else "random"},
                        step_budgets=a.step_budgets)
        result.update(dev_score=summary["best"], best_step=summary["best_step"],
                      updates=summary["num_updates"], budget_scores=summary["budget_scores"],
                      init=str(init) if init else "random")
    if a.do_predict:
        ckpt = test_checkpoint_for(a.test_checkpoint, task) if a.test_checkpoint else run_dir / "checkpoint-best.safetensors"
        load_delta(model, ckpt)
        test_rows = load_split(a.task_dir, task, prefix, "test", tokenizer, a, False)
        score, preds = score_rows(model, tokenizer, test_rows, metric, settings, device, desc=f"{task} test")
        write_predictions(run_dir / "predictions_test.tsv", preds, test_rows.examples)
        result.update(test_score=score, test_checkpoint=str(ckpt))
    log.info("%s %s lr=%s bsz=%s: dev %s, test %s (%s)", task, prefix, lr, bsz, result["dev_score"],
             result["test_score"], metric)
    atomic_write_text(done, json.dumps(result, indent=1))
    return result


def keep_best(task_out: Path, results, runs):
    """Copy the grid's best run (by dev score) to ``{task}/checkpoint-best.safetensors``."""
    scored = [(r["dev_score"], d) for r, d in zip(results, runs)
              if r["dev_score"] is not None and (d / "checkpoint-best.safetensors").exists()]
    if not scored:
        return
    _, best = max(scored, key=lambda t: t[0])
    tensors, config, meta = read_delta(best / "checkpoint-best.safetensors")
    save_delta(task_out / "checkpoint-best.safetensors", tensors, config, **{**meta, "run": best.name})


def rebuild_result_tsv(output_dir: Path, tasks):
    """``result.tsv``: ``task,dev_score,test_score`` for every finished run, tasks in run order."""
    lines = []
    for task in tasks:
        for done in sorted((output_dir / task / "runs").glob("*/result.json")):
            r = json.loads(done.read_text())
            lines.append(f"{task},{r['dev_score']},{r['test_score']}")
    extra = []
    old = output_dir / "result.tsv"
    if old.exists():  # keep lines of tasks that this invocation did not run
        extra = [ln for ln in old.read_text().splitlines() if ln and ln.split(",")[0] not in tasks]
    atomic_write_text(old, "\n".join(extra + lines) + "\n")


def select_tasks(task_dir, tasks=(), shard=None):
    all_tasks = list_tasks(task_dir)
    if tasks:
        missing = [t for t in tasks if t not in all_tasks]
        if missing:
            raise DataError(f"{task_dir}: missing task folder(s) {', '.join(missing)}")
        all_tasks = list(tasks)
    if shard:
        i, n = (int(x) for x in str(shard).split("/"))
        if not 0 <= i < n:
            raise DataError(f"--shard {shard}: expected i/n with 0 <= i < n")
        all_tasks = all_tasks[i::n]
    return all_tasks


def tune_tasks(a, model, tokenizer, device, precision):
    """The original's loop: every task, every split prefix, every batch size x learning rate."""
    if not a.do_train and not a.do_predict:
        raise DeltaError("at least one of --do_train or --do_predict is needed")
    output_dir = Path(a.output_dir)
    tasks = select_tasks(a.task_dir, a.tasks, a.shard)
    config = delta_config_from_args(a)
    set_seed(a.seed)
    attach_delta(model, config)
    from delta_modules import delta_state_dict, load_delta_state
    init_state = {k: v.clone() for k, v in delta_state_dict(model).items()}

    def fresh_delta():
        load_delta_state(model, init_state)

    log.info("%s delta, %d trainable parameters, tasks: %s", config.method,
             sum(v.numel() for v in init_state.values()), ", ".join(tasks))
    for task in tasks:
        prefixes = split_prefixes(Path(a.task_dir) / task)
        if a.one_prefix:
            prefixes = prefixes[:1]
        results, runs = [], []
        for prefix in prefixes:
            for bsz in a.bsz_list:
                for lr in a.learning_rate_list:
                    run_dir = output_dir / task / "runs" / f"{prefix}_lr_{_fmt(lr)}_bsz_{bsz}"
                    results.append(run_one(model, tokenizer, task, prefix, lr, bsz, a, device, precision,
                                           run_dir, fresh_delta))
                    runs.append(run_dir)
        if a.do_train:
            keep_best(output_dir / task, results, runs)
        rebuild_result_tsv(output_dir, tasks)
    return output_dir / "result.tsv"
