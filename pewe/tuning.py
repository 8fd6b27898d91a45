"""Single-task tuning over an lr x batch-size grid: what ``tune_hps_singletask.py`` runs for each task.

One run is a ``TuneJob`` (every option that decides it, typed); ``run_job`` trains and / or predicts
it, ``run_jobs`` several, in lockstep groups. The study builds its jobs the same way. Layout of ``output_dir`` (one folder per task, as the
original):
  {task}/runs/{prefix}_lr_{lr}_bsz_{bsz}/  checkpoint-best.safetensors (+.json), resume.safetensors,
                                           predictions_test.tsv, result.json
  {task}/checkpoint-best.safetensors       the best run of the grid by dev score (+.json)
  result.tsv                               ``task,dev_score,test_score`` per run, rebuilt from the
                                           runs' result.json files (so a rerun never duplicates lines)
  log.txt
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
from pathlib import Path

from delta_modules import DeltaConfig, DeltaError, attach_delta, delta_state_dict, read_delta, save_delta
from pewe.atomic import atomic_write_text
from pewe.data import DataError, TextOptions, check_task_names, list_tasks, load_split, read_tsv, split_path, split_prefixes
from pewe.layout import (claim_run, file_sha256, init_checkpoint_for, read_json, rebuild_result_tsv, run_name, shard_of,
                         test_checkpoint_for)
from pewe.model import model_fingerprint, tokenizer_fingerprint
from pewe.metrics import metric_for
from pewe.trainer import (Run, TrainSettings, can_extend, groups_of, resolve_batch_runs, resume_counters,
                          score_deltas, set_seed, train_runs, write_predictions)

log = logging.getLogger("pewe")
DELTA_FIELDS = ("adapter_type", "adapter_size", "lora_r", "lora_alpha", "prefix_num", "prefix_r")
OPTIONAL_DELTA_FIELDS = ("lora_targets", "lora_rslora")  # the DeltaConfig default where a script lacks the option


@dataclasses.dataclass(frozen=True)
class TuneJob:
    """One (task, split, lr, batch size) run: every option that decides its result."""
    task: str
    prefix: str  # the data split, ``{task}_{k}_{seed}``
    task_dir: str
    run_dir: Path
    settings: TrainSettings  # lr, batch size, budget, intervals, seed, precision, progress
    text: TextOptions
    model: str  # the backbone's name or folder, as given (recorded in the checkpoints)
    do_train: bool = True
    do_predict: bool = True
    train_checkpoint: str | None = None  # init: a delta file or a folder of without_{task}_checkpoint files
    test_checkpoint: str | None = None  # predict with this delta (file or folder) instead of the best
    step_budgets: tuple = ()  # also record the dev score after these update counts
    overwrite: bool = False  # start the run afresh even if its folder holds another run's work


def run_record(model, tokenizer, settings: TrainSettings, text: TextOptions, data_files: dict, **extra) -> dict:
    """What decides a run's result, as its folder's run.json records it: the backbone and tokenizer
    (by content), the delta config, the data files (by checksum), every training and decoding
    setting, and ``extra`` (the task, the init delta's checksum, ...)."""
    s = dataclasses.asdict(settings)
    del s["progress"], s["log_interval"]  # they change what is shown, not what is computed
    return {**extra, "model_name": extra.get("model_name"), "model": model_fingerprint(model),
            "tokenizer": tokenizer_fingerprint(tokenizer), "delta": model.delta_config.fields(),
            "data": {split: file_sha256(path) for split, path in data_files.items()}, **s,
            **dataclasses.asdict(text)}


def delta_config_of(method, options) -> DeltaConfig:
    """The DeltaConfig of ``method`` with the sizes an entry script's options give."""
    optional = {f: getattr(options, f) for f in OPTIONAL_DELTA_FIELDS if hasattr(options, f)}
    return DeltaConfig(method, **{f: getattr(options, f) for f in DELTA_FIELDS}, **optional)


def delta_config_from_args(a) -> DeltaConfig:
    """The delta of the original's flags: ``--tune_method`` and the matching ``--apply_*`` flag."""
    applied = [m for m in ("adapter", "lora", "prefix") if getattr(a, f"apply_{m}")]
    method = a.tune_method
    if method not in ("adapter", "lora", "prefix"):
        raise DeltaError(f"unknown --tune_method {method!r}; expected adapter, lora or prefix")
    if applied and applied != [method]:
        raise DeltaError(f"--tune_method {method} conflicts with --apply_{' --apply_'.join(applied)}")
    return delta_config_of(method, a)


def initial_delta_state(base_model, config: DeltaConfig, seed: int) -> dict:
    """The random delta a run with ``seed`` starts from: seed, then attach to a copy of the base."""
    set_seed(seed)
    scratch = attach_delta(copy.deepcopy(base_model), config)
    return {k: v.clone() for k, v in delta_state_dict(scratch).items()}


def text_options(a) -> TextOptions:
    return TextOptions(a.max_input_length, a.max_output_length, a.truncation_side)


@dataclasses.dataclass
class _Pending:
    """A job whose folder is claimed: what it trains from and the result it fills in."""
    job: TuneJob
    record: dict
    init: Path | None = None  # the delta file it trains from (None: its seed's random init)
    test: Path | None = None  # the delta file its test split is scored with (None: its best)
    metric: str = ""
    meta: dict = dataclasses.field(default_factory=dict)
    result: dict = dataclasses.field(default_factory=dict)
    done: bool = False  # finished before: ``result`` is its result.json


def _claim_job(model, tokenizer, job: TuneJob) -> _Pending:
    """Check and claim the job's folder (run.json); a finished job comes back done (unless a larger
    budget extends it)."""
    run_dir, s = Path(job.run_dir), job.settings
    splits = [sp for sp, used in (("train", job.do_train), ("dev", job.do_train), ("test", job.do_predict)) if used]
    files = {sp: split_path(job.task_dir, job.task, job.prefix, sp) for sp in splits}
    if job.do_predict:
        read_tsv(files["test"])  # a bad test split is found now, not after the whole budget
    init = init_checkpoint_for(job.train_checkpoint, job.task) if job.do_train else None
    test = test_checkpoint_for(job.test_checkpoint, job.task) if job.do_predict and job.test_checkpoint else None
    record = run_record(model, tokenizer, s, job.text, files, task=job.task, prefix=job.prefix, model_name=job.model,
                        train_checkpoint=file_sha256(init) if init else None,
                        test_checkpoint=file_sha256(test) if test else None, step_budgets=list(job.step_budgets),
                        do_train=job.do_train, do_predict=job.do_predict)
    claim_run(run_dir, record, job.overwrite)
    done = run_dir / "result.json"
    resume = run_dir / "resume.safetensors"
    if done.exists():
        if not (job.do_train and resume.exists() and can_extend(resume_counters(resume), s.train_iters)):
            log.info("%s: already done (%s), skipping", run_dir, done)
            return _Pending(job, record, result=read_json(done, "run result"), done=True)
        done.unlink()  # a finished run given a larger --train_iters continues (train() extends it)
    metric = metric_for(job.task)
    result = {"task": job.task, "prefix": job.prefix, "learning_rate": s.learning_rate, "batch_size": s.batch_size,
              "metric": metric, "dev_score": None, "test_score": None}
    meta = {"task": job.task, "prefix": job.prefix, "base_model": job.model, "base_model_sha256": record["model"],
            "seed": s.seed, "learning_rate": s.learning_rate, "batch_size": s.batch_size}
    return _Pending(job, record, init, test, metric, meta, result)


def _run_group(model, tokenizer, group: list, device, init_state_of):
    """Train the group's jobs in lockstep, score their test splits together, write each result.json."""
    training = [p for p in group if p.job.do_train]
    if training:
        runs = []
        for p in training:
            j = p.job
            runs.append(Run(load_split(j.task_dir, j.task, j.prefix, "train", tokenizer, j.text, True),
                            load_split(j.task_dir, j.task, j.prefix, "dev", tokenizer, j.text, False), p.metric,
                            j.settings, Path(j.run_dir), p.init, init_state_of(j),
                            {**p.meta, "init": str(p.init) if p.init else "random"}, j.step_budgets))
        for p, summary in zip(training, train_runs(model, tokenizer, runs, device)):
            p.result.update(dev_score=summary["best"], best_step=summary["best_step"], updates=summary["num_updates"],
                            budget_scores=summary["budget_scores"], init=str(p.init) if p.init else "random")
    predicting = [p for p in group if p.job.do_predict]
    if predicting:
        items, checkpoints = [], []
        for p in predicting:
            j = p.job
            checkpoints.append(p.test or Path(j.run_dir) / "checkpoint-best.safetensors")
            items.append((checkpoints[-1], load_split(j.task_dir, j.task, j.prefix, "test", tokenizer, j.text, False),
                          p.metric))
        desc = f"{predicting[0].job.task} test" if len(predicting) == 1 else f"{len(predicting)} runs test"
        scored = score_deltas(model, tokenizer, items, predicting[0].job.settings, device, desc=desc)
        for p, ckpt, (_, rows, _), (score, preds) in zip(predicting, checkpoints, items, scored):
            write_predictions(Path(p.job.run_dir) / "predictions_test.tsv", preds, rows.examples)
            p.result.update(test_score=score, test_checkpoint=str(ckpt))
    for p in group:
        s = p.job.settings
        log.info("%s %s lr=%s bsz=%s: dev %s, test %s (%s)", p.job.task, p.job.prefix, s.learning_rate, s.batch_size,
                 p.result["dev_score"], p.result["test_score"], p.metric)
        atomic_write_text(Path(p.job.run_dir) / "result.json", json.dumps(p.result, indent=1))


def run_jobs(model, tokenizer, jobs, device, init_state_of, batch_runs=1, on_done=None) -> list:
    """Train and / or predict ``jobs`` (each skipped when its result.json exists, extended when it used
    its whole budget and a larger one is asked for), ``batch_runs`` at a time in lockstep (one forward
    for a group, ``pewe.trainer.train_runs``); a group's jobs must share the settings of
    ``pewe.trainer.SHARED_SETTINGS``. ``init_state_of(job)``: the random delta a job starts from when
    it has no train_checkpoint. ``on_done(job, result)`` after each job. Returns the results in order."""
    claimed = [_claim_job(model, tokenizer, job) for job in jobs]
    for p in claimed:
        if p.done and on_done is not None:
            on_done(p.job, p.result)
    for group in groups_of([p for p in claimed if not p.done], batch_runs):
        _run_group(model, tokenizer, group, device, init_state_of)
        for p in group:
            if on_done is not None:
                on_done(p.job, p.result)
    return [p.result for p in claimed]


def run_job(model, tokenizer, job: TuneJob, device, init_state: dict) -> dict:
    """Train and / or predict one run from ``init_state`` (its random init) unless it has a
    train_checkpoint; returns its result dict (see ``run_jobs``)."""
    return run_jobs(model, tokenizer, [job], device, lambda _: init_state)[0]


def keep_best(task_out: Path, results, runs):
    """Copy the grid's best run (by dev score) to ``{task}/checkpoint-best.safetensors``, what the
    similarity scores and the averages read: rewritten whenever the best run's delta changed (a run
    extended to a larger budget moves its best), so the copy never goes stale."""
    scored = [(r["dev_score"], d) for r, d in zip(results, runs)
              if r["dev_score"] is not None and (d / "checkpoint-best.safetensors").exists()]
    if not scored:
        return
    _, best = max(scored, key=lambda t: t[0])
    src, dst = best / "checkpoint-best.safetensors", Path(task_out) / "checkpoint-best.safetensors"
    tensors, config, meta = read_delta(src)
    if dst.is_file() and file_sha256(dst) == file_sha256(src) and read_delta(dst)[2].get("run") == best.name:
        return  # already the copy of this delta
    save_delta(dst, tensors, config, **{**meta, "run": best.name})


def select_tasks(task_dir, tasks=(), shard=None):
    all_tasks = list_tasks(task_dir)
    if tasks:
        missing = [t for t in tasks if t not in all_tasks]
        if missing:
            raise DataError(f"{task_dir}: missing task folder(s) {', '.join(missing)}")
        all_tasks = list(tasks)
    return check_task_names(shard_of(all_tasks, shard))


def grid_jobs(a, task, precision) -> list:
    """The original's grid for one task: every split prefix x batch size x learning rate."""
    prefixes = split_prefixes(Path(a.task_dir) / task)
    if a.one_prefix:
        prefixes = prefixes[:1]
    jobs = []
    for prefix in prefixes:
        for bsz in a.bsz_list:
            for lr in a.learning_rate_list:
                settings = TrainSettings(learning_rate=lr, batch_size=bsz, train_iters=a.train_iters,
                                         valid_interval=a.valid_interval, log_interval=a.log_interval,
                                         early_stop=a.early_stop, predict_batch_size=a.predict_batch_size,
                                         max_output_length=a.max_output_length, seed=a.seed, precision=precision,
                                         progress=a.progress)
                jobs.append(TuneJob(task, prefix, a.task_dir, Path(a.output_dir) / task / "runs" / run_name(prefix, lr, bsz),
                                    settings, text_options(a), str(a.model), a.do_train, a.do_predict,
                                    a.train_checkpoint or None, a.test_checkpoint or None, tuple(a.step_budgets),
                                    a.overwrite))
    return jobs


def check_tune_options(a):
    """Refuse bad options of tune_hps_singletask.py / tune_all_ckpt.py / dev_all_ckpt.py before any work."""
    delta_config_from_args(a)
    text_options(a)
    defaults = TrainSettings()
    for lr in getattr(a, "learning_rate_list", [defaults.learning_rate]):
        for bsz in getattr(a, "bsz_list", [defaults.batch_size]):
            TrainSettings(learning_rate=lr, batch_size=bsz, predict_batch_size=a.predict_batch_size,
                          max_output_length=a.max_output_length,
                          **{k: getattr(a, k) for k in ("train_iters", "valid_interval", "log_interval") if hasattr(a, k)})
    if hasattr(a, "batch_runs"):
        resolve_batch_runs(a.batch_runs, "cpu")
    if any(int(b) < 0 for b in getattr(a, "step_budgets", ())):
        raise DataError("--step_budgets must be >= 0")
    select_tasks(a.task_dir, a.tasks, a.shard)


def tune_tasks(a, model, tokenizer, device, precision):
    """The original's loop: every task, every split prefix, every batch size x learning rate."""
    if not a.do_train and not a.do_predict:
        raise DeltaError("at least one of --do_train or --do_predict is needed")
    output_dir = Path(a.output_dir)
    tasks = select_tasks(a.task_dir, a.tasks, a.shard)
    config = delta_config_from_args(a)
    init_state = initial_delta_state(model, config, a.seed)
    attach_delta(model, config)
    log.info("%s delta, %d trainable parameters, tasks: %s", config.method,
             sum(v.numel() for v in init_state.values()), ", ".join(tasks))
    for task in tasks:
        jobs = grid_jobs(a, task, precision)
        results = [run_job(model, tokenizer, job, device, init_state) for job in jobs]
        if a.do_train:
            keep_best(output_dir / task, results, [job.run_dir for job in jobs])
        rebuild_result_tsv(output_dir)
    return output_dir / "result.tsv"
