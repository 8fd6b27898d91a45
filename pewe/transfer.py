"""Every source delta on every target: a short tuning (``tune_all_ckpt.py``) or a zero-shot dev
score (``dev_all_ckpt.py``), what the Euclidean and Performance methods score.

The backbone is loaded once and the delta attached once; each (target, source) pair only swaps the
delta's tensors. Targets are the task folders of ``task_dir`` (``--tasks`` / ``--shard`` as in
tune_hps_singletask.py); sources are ``{source folder}/{task}/checkpoint-best*.safetensors``; the
target's own source is skipped by default (the weighting leaves it out anyway).

Layout of tune_all's ``output_dir``:
  {target}/{source}/checkpoint-best.safetensors  best delta by dev during the short tuning (+ .json), as the original
  {target}/{source}/checkpoint-last.safetensors  the delta after the last update (+ .json; the original's save_last)
  {target}/{source}/resume.safetensors           the training loop's state, while the pair runs (a killed
                                                 pair resumes); removed once it is done unless keep_resume
  {target}/{source}/result.json                  dev score (best, last), steps, test score: the pair is done
  result.tsv                                     similarity layout: per target, ``source,best dev score``
Layout of dev_all's ``output_dir``:
  {target}/result.json   {source: zero-shot dev score}, rewritten after every pair (a rerun skips scored pairs)
  result.tsv, result.json  every target's scores (similarity layout / {target: {source: score}})
"""
from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from safetensors.torch import load_file
from tqdm.auto import tqdm

from delta_modules import DeltaError, attach_delta, check_compatible, read_delta, save_delta
from pewe.atomic import atomic_write_text
from pewe.data import TextOptions, first_prefix, load_split, split_path
from pewe.delta_scores import pairs_of
from pewe.layout import claim_run, file_sha256, format_similarity, read_json, source_checkpoints
from pewe.metrics import metric_for
from pewe.model import model_fingerprint
from pewe.trainer import Run, TrainSettings, resolve_batch_runs, score_deltas, set_seed, train_runs
from pewe.tuning import delta_config_from_args, run_record, select_tasks, text_options

log = logging.getLogger("pewe")


# --------------------------------------------------------------------------- sources, targets, pairs

def check_sources_fit(config, sources: dict):
    """Every source delta must have the model's delta config: fail before any pair runs."""
    for path in sources.values():
        _, found, _ = read_delta(path)
        check_compatible(config, found, path)


def single(values, name):
    """The one value of a list option (the original's ``--learning_rate_list 5e-4``)."""
    values = list(values)
    if len(values) != 1:
        raise DeltaError(f"--{name}: give exactly one value here (got {values}); every pair is tuned with one setting")
    return values[0]


@dataclasses.dataclass
class TargetData:
    """One target's tokenised splits (train: a row per answer; dev/test: a row per example)."""
    name: str
    prefix: str
    metric: str
    train: object = None
    dev: object = None
    test: object = None


def load_target(task_dir, task, tokenizer, text: TextOptions, splits) -> TargetData:
    data = TargetData(task, first_prefix(task_dir, task, warn=True), metric_for(task))
    for split in splits:
        setattr(data, split, load_split(task_dir, task, data.prefix, split, tokenizer, text, split == "train"))
    return data


def eval_settings(a, precision) -> TrainSettings:
    return TrainSettings(predict_batch_size=a.predict_batch_size, max_output_length=a.max_output_length,
                         seed=a.seed, precision=precision, progress=False)


def pair_bar(pairs, a, desc, manual=False):
    """A progress bar over the pairs (``manual``: a bar to update by hand, for pairs done in groups)."""
    if manual:
        return tqdm(total=len(pairs), desc=desc, unit="pair", disable=not a.progress, dynamic_ncols=True)
    return tqdm(pairs, desc=desc, unit="pair", disable=not a.progress, dynamic_ncols=True)


def _prepare(a, model, source_dir):
    """(targets, sources, config): the options checked, the delta attached, the sources fit it."""
    if not source_dir:
        raise DeltaError("no folder of source deltas given ({task}/checkpoint-best*.safetensors)")
    config = delta_config_from_args(a)
    targets = select_tasks(a.task_dir, a.tasks, a.shard)
    sources = source_checkpoints(source_dir, a.source_tasks)
    check_sources_fit(config, sources)
    set_seed(a.seed)
    attach_delta(model, config)
    return targets, sources, config


# --------------------------------------------------------------------------- tune all

def last_delta(resume_path) -> dict:
    """The delta after the final update: the ``delta.*`` tensors of the loop's resume.safetensors."""
    return {k[len("delta."):]: v for k, v in load_file(str(resume_path)).items() if k.startswith("delta.")}


def last_validated_score(summary):
    """The dev score of the last delta when the loop already has it: the last validation's if it was at
    the final update, the best's when no validation ran (the loop scored the last delta as its best);
    else None (it is decoded afresh)."""
    history = summary.get("history") or []
    if history and history[-1][0] == summary["num_updates"]:
        return history[-1][1]
    if not history and summary["best_step"] == summary["num_updates"]:
        return summary["best"]
    return None


@dataclasses.dataclass(frozen=True)
class PairJob:
    """One source delta tuned on one target: what tune_all_ckpt.py (and the study's Euclidean and
    Performance scores) run for each (target, source) pair."""
    target: str
    source: str
    source_checkpoint: Path
    pair_dir: Path
    task_dir: str  # the targets' task folders
    settings: TrainSettings
    text: TextOptions
    model: str  # the backbone's name or folder, as given (recorded in the checkpoints)
    do_predict: bool = False  # also score test with the pair's best delta, as the original did
    keep_resume: bool = False  # keep the finished pair's resume.safetensors (delta + optimizer state)
    overwrite: bool = False  # start the pair afresh even if its folder holds another pair's work

    @property
    def splits(self) -> tuple:
        return ("train", "dev", "test") if self.do_predict else ("train", "dev")


def claim_pair(model, tokenizer, job: PairJob):
    """Check the pair folder's record (or write it, for a new pair): its result when the pair is done,
    else None. A folder made with other options, data, model or source delta is refused."""
    prefix = first_prefix(job.task_dir, job.target)
    files = {sp: split_path(job.task_dir, job.target, prefix, sp) for sp in job.splits}
    record = run_record(model, tokenizer, job.settings, job.text, files, target=job.target, source=job.source,
                        prefix=prefix, model_name=job.model, source_checkpoint=file_sha256(job.source_checkpoint),
                        do_predict=job.do_predict)
    claim_run(job.pair_dir, record, job.overwrite, what="pair tuning")
    done = Path(job.pair_dir) / "result.json"
    return read_json(done, "pair result") if done.is_file() else None


def tune_pairs(model, tokenizer, datas, jobs, device) -> list:
    """Tune each job's source delta on its target's train split (``datas[i]`` for ``jobs[i]``), the jobs
    in lockstep (one forward for all, ``pewe.trainer.train_runs``); keep best and last; returns each
    pair's result.json."""
    runs, metas = [], []
    for data, job in zip(datas, jobs):
        s = job.settings
        metas.append({"task": data.name, "source": job.source, "prefix": data.prefix, "init": str(job.source_checkpoint),
                      "base_model": job.model, "base_model_sha256": model_fingerprint(model), "seed": s.seed,
                      "learning_rate": s.learning_rate, "batch_size": s.batch_size})
        runs.append(Run(data.train, data.dev, data.metric, s, Path(job.pair_dir), job.source_checkpoint, None, metas[-1]))
    summaries = train_runs(model, tokenizer, runs, device)
    lasts = [last_delta(Path(job.pair_dir) / "resume.safetensors") for job in jobs]  # right even when already done
    scores = [last_validated_score(summary) for summary in summaries]
    fresh = [i for i, score in enumerate(scores) if score is None]  # the last update was not validated
    for i, (score, _) in zip(fresh, score_deltas(model, tokenizer, [(lasts[i], datas[i].dev, datas[i].metric) for i in fresh],
                                                 jobs[0].settings, device, desc="dev") if fresh else ()):
        scores[i] = score
    results = []
    for data, job, meta, summary, last, last_score in zip(datas, jobs, metas, summaries, lasts, scores):
        save_delta(Path(job.pair_dir) / "checkpoint-last.safetensors", last, model.delta_config,
                   **{**meta, "dev_score": last_score, "step": summary["num_updates"]})
        results.append({"target": data.name, "source": job.source, "metric": data.metric,
                        "init": str(job.source_checkpoint), "dev_score": summary["best"],
                        "best_step": summary["best_step"], "last_dev_score": last_score,
                        "updates": summary["num_updates"], "history": summary["history"], "test_score": None})
    testing = [i for i, job in enumerate(jobs) if job.do_predict]
    if testing:
        items = [(Path(jobs[i].pair_dir) / "checkpoint-best.safetensors", datas[i].test, datas[i].metric) for i in testing]
        for i, (score, _) in zip(testing, score_deltas(model, tokenizer, items, jobs[0].settings, device, desc="test")):
            results[i]["test_score"] = score
    for job, result in zip(jobs, results):
        atomic_write_text(Path(job.pair_dir) / "result.json", json.dumps(result, indent=1))
        if not job.keep_resume:  # the pair is done (result.json): its optimizer state is dead weight on disk
            (Path(job.pair_dir) / "resume.safetensors").unlink(missing_ok=True)
    return results


def tune_pair(model, tokenizer, data: TargetData, job: PairJob, device) -> dict:
    """Tune the source's delta on the target's train split; keep best and last; returns result.json."""
    return tune_pairs(model, tokenizer, [data], [job], device)[0]


def zero_shot_score(model, tokenizer, data: TargetData, checkpoint, settings, device, desc=None) -> float:
    """The dev score of a source delta on a target without any tuning (what Performance subtracts)."""
    return zero_shot_scores(model, tokenizer, data, [checkpoint], settings, device, desc=desc)[0]


def zero_shot_scores(model, tokenizer, data: TargetData, checkpoints, settings, device, desc=None) -> list:
    """The dev scores of several source deltas on one target, decoded together."""
    items = [(ckpt, data.dev, data.metric) for ckpt in checkpoints]
    return [score for score, _ in score_deltas(model, tokenizer, items, settings, device, desc=desc)]


def collect_pair_results(output_dir, key="dev_score") -> dict:
    """``{target: {source: result[key]}}`` of every finished pair under ``output_dir``."""
    out = {}
    for done in sorted(Path(output_dir).glob("*/*/result.json")):
        r = read_json(done, "pair result")
        out.setdefault(r["target"], {})[r["source"]] = r[key]
    return out


def tune_all(a, model, tokenizer, device, precision) -> Path:
    """Tune every source delta on every target for ``train_iters`` updates; returns result.tsv."""
    lr, bsz = single(a.learning_rate_list, "learning_rate_list"), single(a.bsz_list, "bsz_list")
    targets, sources, config = _prepare(a, model, a.train_checkpoint)
    settings = dataclasses.replace(eval_settings(a, precision), learning_rate=lr, batch_size=bsz,
                                   train_iters=a.train_iters, valid_interval=a.valid_interval,
                                   log_interval=a.log_interval, early_stop=a.early_stop)
    out = Path(a.output_dir)
    pairs = pairs_of(targets, sources, a.skip_self)
    batch_runs = resolve_batch_runs(getattr(a, "batch_runs", 1), device)
    log.info("%s delta: %d targets x %d sources = %d pairs, %d updates each, %d pairs at a time", config.method,
             len(targets), len(sources), len(pairs), a.train_iters, batch_runs)
    data = {}
    bar = pair_bar(pairs, a, "tune all", manual=True)
    pending = []

    def tune_group():
        if not pending:
            return
        for target in [t for t in data if t not in {job.target for job in pending}]:
            del data[target]  # one group's targets' rows in memory at a time
        for job in pending:
            if job.target not in data:
                data[job.target] = load_target(a.task_dir, job.target, tokenizer, job.text, job.splits)
        for job, r in zip(pending, tune_pairs(model, tokenizer, [data[job.target] for job in pending], pending, device)):
            log.info("%s <- %s: dev %.4f best at %d, %.4f after %d updates (%s)", job.target, job.source, r["dev_score"],
                     r["best_step"], r["last_dev_score"], r["updates"], r["metric"])
        bar.update(len(pending))
        pending.clear()

    for target, source in pairs:
        bar.set_postfix_str(f"{source} -> {target}")
        job = PairJob(target, source, sources[source], out / target / source, a.task_dir, settings, text_options(a),
                      str(a.model), a.do_predict, a.keep_resume, a.overwrite)
        if claim_pair(model, tokenizer, job) is not None:
            log.info("%s <- %s: already done (%s), skipping", target, source, job.pair_dir / "result.json")
            bar.update(1)
            continue
        pending.append(job)
        if len(pending) == batch_runs:
            tune_group()
    tune_group()
    bar.close()
    result = out / "result.tsv"
    atomic_write_text(result, format_similarity(collect_pair_results(out)))
    return result


# --------------------------------------------------------------------------- dev all

def read_target_scores(path) -> dict:
    return read_json(path, "zero-shot scores") if Path(path).is_file() else {}


def dev_all(a, model, tokenizer, device, precision) -> Path:
    """Zero-shot dev score of every source delta on every target; returns result.tsv."""
    targets, sources, config = _prepare(a, model, a.test_checkpoint)
    settings = eval_settings(a, precision)
    out = Path(a.output_dir)
    pairs = pairs_of(targets, sources, a.skip_self)
    log.info("%s delta: zero-shot dev scores of %d sources on %d targets (%d pairs)", config.method,
             len(sources), len(targets), len(pairs))
    current = data = scores = None
    bar = pair_bar(pairs, a, "dev all")
    for target, source in bar:
        bar.set_postfix_str(f"{source} -> {target}")
        store = out / target / "result.json"  # per target, so shards of targets never share a file
        if target != current:
            current, scores, data = target, read_target_scores(store), None
        if source in scores:
            log.info("%s <- %s: already scored (%s), skipping", target, source, store)
            continue
        if data is None:
            data = load_target(a.task_dir, target, tokenizer, text_options(a), ("dev",))
        scores[source] = zero_shot_score(model, tokenizer, data, sources[source], settings, device,
                                         desc=f"{source} on {target}")
        atomic_write_text(store, json.dumps(scores, indent=1))
        log.info("%s <- %s: zero-shot dev %.4f (%s)", target, source, scores[source], data.metric)
    bar.close()
    table = {p.parent.name: read_json(p, "zero-shot scores") for p in sorted(out.glob("*/result.json"))}
    atomic_write_text(out / "result.json", json.dumps(table, indent=1))
    result = out / "result.tsv"
    atomic_write_text(result, format_similarity(table))
    return result
