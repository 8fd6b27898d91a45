"""The leave-one-out transfer study, end to end, in one process (what ``run_study.py`` runs).

For every delta method, with the backbone loaded once:

  sources     tune every study task on its full split (``source_task_dir``), or reuse ``source_dir``
  random      tune every target on its few-shot split from a random init, once per seed: the
              "random" baseline, and (first seed) the reference delta that KL and weight Cosine need
  similarity  score every source on every target (its few-shot dev split): the logit scores of
              ``pewe.similarity`` from one forward per source, GraNd, the weight Cosine, and
              Euclidean / Performance from a short tuning of every other source on the target
  ensemble    initial deltas per target: ``average`` (all other sources), ``manual`` (the other
              members of the target's group) and one ``softmax(sign * score / T)`` per score
  targets     tune every target from every initialisation, once per seed; record the dev score at
              ``step_budgets`` updates and the test score of the early-stopped best delta
  report      report.md, report.csv, gain.png, heatmaps/ (rebuilt from the files alone)

Layout of ``output_dir``::

  log.txt  report.md  report.csv  gain.png  heatmaps/{method}_{init}.png
  {method}/sources/                     a tune_hps_singletask.py output_dir (full splits)
  {method}/targets/{init}/seed_{s}/     one tune_hps_singletask.py output_dir per (init, seed);
                                        init "random" is the baseline (step random)
  {method}/similarity/parts/{target}.json  every score of every source for one target
  {method}/pairs/{target}/{source}/     the source delta tuned ``pair_train_iters`` updates on the
                                        target (tune_all_ckpt.py's layout; Euclidean, Performance)
  {method}/similarity/{score}/result.tsv   the original's layout, + scores.json (sign, options)
  {method}/init/{init}/without_{target}_checkpoint.safetensors (+ .json: weights, temperature),
                       final_weight.txt, weights.csv, weights.json, hot_pic_all.png

Every piece is skipped when its file exists (a run's result.json, a similarity part, an initial
delta), and an interrupted tuning run resumes from its last validation, so an interrupted study
started again with the same command continues where it stopped. ``shard`` / ``targets`` split the
per-target steps (random, similarity, ensemble, targets) over processes, ``source_shard`` the
sources step; the report reads only files, so it can run once at the end (``--steps report``), and
first rebuilds the files that gather all targets (similarity result.tsv, weights, heat maps), which
shards running at the same time may each have written before the others finished.

Choices (documented here, shown in the report):

- one data split per task (the first ``{task}_{k}_{seed}`` prefix); seeds vary the delta's random
  init, the data order and dropout; one learning rate and batch size (the paper's 5e-4, 8);
- ``manual``: groups are ``task_list.BUNDLED_GROUPS`` restricted to the study tasks
  (``task_list.groups_for``); a target left alone in its group gets no manual initialisation (its
  cell is "—"): falling back to the average of all would repeat the ``average`` row under another name;
- temperatures (``TEMPERATURES``): Loss 0.1 and weight Cosine 0.001 are the paper's. The other scores
  are sums over label tokens (KL, EL2N, Cosine of logits and labels) or over batches (GraNd), so their
  scale grows with the target's answer length; with ``per_token`` (default) their temperature is per
  label token (per batch for GraNd): T_eff = T * count, which is softmax of the per-token mean at T.
  KL 0.1: KL(P||Q) = CE(P, Q) - H(P) is a cross-entropy in nats per token like Loss, so it gets Loss's
  temperature. EL2N and Cosine of logits and labels 0.05: per token they are bounded (<= sqrt 2, <= 1)
  and, for a label probability p between 0.2 and 0.8, move about half as much as -log p does, so half
  of Loss's temperature gives the same sharpness. GraNd 1.0 per batch: no reference value exists;
  the report's "effective sources" column (1 / sum w^2) shows whether a temperature is degenerate;
- Euclidean and Performance (the paper's temperatures 0.1 and 0.001) tune every other source delta on
  the target's few-shot split for ``pair_train_iters`` updates (seed ``source_seed``, validation every
  ``pair_valid_interval``), as tune_all_ckpt.py does; Euclidean is the distance from the source delta
  to its best tuned delta, Performance that delta's dev score minus the source's zero-shot dev score
  (dev_all_ckpt.py); as the original, the Performance initialisation averages the tuned deltas (each
  has seen the target's few-shot data), every other one the source deltas. They are the costliest
  scores: (tasks - 1) short tunings per target;
- the dev score is recorded at each step budget (pewe.trainer.train's ``step_budgets``); the test
  score only after early stopping: scoring test at the budgets would need a hook in the trainer. A
  budget beyond the update at which a run stopped has no score (blank in report.csv, "—" in tables).
"""
from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import shutil
import statistics
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from delta_modules import DeltaConfig, attach_delta, delta_state_dict, load_delta_state, save_delta
from pewe.atomic import atomic_write_bytes, atomic_write_text
from pewe.errors import UserError

log = logging.getLogger("pewe")

STEPS = ("sources", "random", "similarity", "ensemble", "targets", "report")
BASELINES = ("average", "manual")  # initialisations that need no score
DELTA_SCORES = ("Cosine", "Euclidean", "Performance")  # computed from delta files (pewe.delta_scores)
PAIR_SCORES = ("Euclidean", "Performance")  # those that need the short tuning of every (target, source) pair
STUDY_SCORES = ("Loss", "KL", "EL2N", "Cosine_of_Logits_and_Labels", "GraNd", *DELTA_SCORES)
# softmax temperatures, per label token for sum-reduced scores and per batch for GraNd when per_token
TEMPERATURES = {"Loss": 0.1, "KL": 0.1, "EL2N": 0.05, "Cosine_of_Logits_and_Labels": 0.05, "GraNd": 1.0,
                "Cosine": 0.001, "Euclidean": 0.1, "Performance": 0.001}
FLAG_SHARE = 0.5  # a test set whose most frequent answer exceeds this share is flagged
EARLY = "early_stop"  # the budget name of the early-stopped best delta in report.csv


class StudyError(UserError):
    """A study request that cannot be met (bad option, missing earlier step)."""


# --------------------------------------------------------------------------- options

def parse_steps(steps) -> list:
    """Step names in pipeline order from ``["all"]`` or names (also comma separated)."""
    names = [s.strip() for item in steps for s in str(item).split(",") if s.strip()]
    if not names or "all" in names:
        return list(STEPS)
    unknown = [s for s in names if s not in STEPS]
    if unknown:
        raise StudyError(f"--steps: unknown step(s) {', '.join(unknown)}; expected all or {', '.join(STEPS)}")
    return [s for s in STEPS if s in names]


def needs_model(a) -> bool:
    """Only the report step runs without the backbone (bad steps: the study refuses them before any work)."""
    try:
        return parse_steps(a.steps) != ["report"]
    except StudyError:
        return False


def shard_of(items, shard, name="--shard") -> list:
    """Every n-th item starting at i, for ``shard`` "i/n" ("" = all)."""
    if not shard:
        return list(items)
    try:
        i, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise StudyError(f"{name} {shard}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise StudyError(f"{name} {shard}: expected i/n with 0 <= i < n")
    return list(items)[i::n]


def parse_temperatures(items) -> dict:
    """``TEMPERATURES`` updated with "Name=T" items."""
    out = dict(TEMPERATURES)
    for item in items:
        name, eq, value = str(item).partition("=")
        try:
            t = float(value)
        except ValueError:
            t = float("nan")
        if not eq or not math.isfinite(t) or t <= 0:
            raise StudyError(f"--temperatures: {item!r} is not Name=T with a positive T")
        if name not in STUDY_SCORES:
            raise StudyError(f"--temperatures: unknown score {name!r}; expected one of {', '.join(STUDY_SCORES)}")
        out[name] = t
    return out


def score_sign(name) -> int:
    from pewe.ensemble import WEIGHT_SCORE_SIGN
    from pewe.similarity import SCORES

    if name in DELTA_SCORES:
        return WEIGHT_SCORE_SIGN[name]
    return 1 if SCORES[name].higher_is_more_similar else -1


def plan(a) -> SimpleNamespace:
    """Check every option before any work; the resolved study plan."""
    from pewe.data import list_tasks
    from task_list import BUNDLED_GROUPS, groups_for

    steps = parse_steps(a.steps)
    methods = list(dict.fromkeys(a.methods))
    for m in methods:
        DeltaConfig(m)  # refuses an unknown method
    tasks = [str(t) for t in a.tasks]
    if len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise StudyError(f"--tasks: need at least two distinct tasks, got {tasks}")
    for label, d in (("target_task_dir", a.target_task_dir), ("source_task_dir", a.source_task_dir)):
        if label == "source_task_dir" and a.source_dir:
            continue  # sources are reused, their data is not read
        missing = [t for t in tasks if t not in list_tasks(d)]
        if missing:
            raise StudyError(f"--{label} {d}: no task folder(s) {', '.join(missing)}")
    targets = [str(t) for t in a.targets] or tasks
    strangers = [t for t in targets if t not in tasks]
    if strangers:
        raise StudyError(f"--targets: {', '.join(strangers)} not among --tasks")
    scores = list(dict.fromkeys(a.scores))
    bad = [s for s in scores if s not in STUDY_SCORES]
    if bad:
        raise StudyError(f"--scores: {', '.join(bad)} not supported here; expected some of {', '.join(STUDY_SCORES)}")
    inits = list(dict.fromkeys(a.inits))
    bad = [i for i in inits if i not in BASELINES]
    if bad:
        raise StudyError(f"--inits: {', '.join(bad)} unknown; expected some of {', '.join(BASELINES)} "
                         "(random is always run; score initialisations come from --scores)")
    seeds = [int(s) for s in a.seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise StudyError(f"--seeds: need distinct seeds, got {seeds}")
    budgets = sorted({int(b) for b in a.step_budgets})
    if any(b < 0 for b in budgets):
        raise StudyError("--step_budgets must be >= 0")
    if budgets and budgets[-1] > a.target_train_iters:
        log.warning("step budget %d > target_train_iters %d: no run reaches it", budgets[-1], a.target_train_iters)
    if a.groups:
        from pewe.ensemble import parse_groups

        groups = {f"group_{i + 1}": g for i, g in enumerate(parse_groups(a.groups))}
    else:
        groups = BUNDLED_GROUPS
    return SimpleNamespace(
        steps=steps, methods=methods, tasks=tasks, seeds=seeds, budgets=budgets, scores=scores,
        init_names=[*inits, *scores], all_inits=["random", *inits, *scores],
        targets=shard_of(targets, a.shard), source_tasks=shard_of(tasks, a.source_shard, "--source_shard"),
        groups=groups_for(tasks, groups), temperatures=parse_temperatures(a.temperatures),
        out=Path(a.output_dir))


def delta_config(a, method) -> DeltaConfig:
    return DeltaConfig(method, adapter_type=a.adapter_type, adapter_size=a.adapter_size, lora_r=a.lora_r,
                       lora_alpha=a.lora_alpha, prefix_num=a.prefix_num, prefix_r=a.prefix_r)


# --------------------------------------------------------------------------- paths

def run_name(prefix, a) -> str:
    """The run folder name tune_hps_singletask.py gives the same split, lr and batch size."""
    return f"{prefix}_lr_{a.learning_rate:g}_bsz_{a.batch_size}"


def first_prefix(task_dir, task) -> str:
    from pewe.data import split_prefixes

    return split_prefixes(Path(task_dir) / task)[0]


def source_root(a, p, method) -> Path:
    return Path(str(a.source_dir).replace("{method}", method)) if a.source_dir else p.out / method / "sources"


def tuned_dir(p, method, init, seed) -> Path:
    return p.out / method / "targets" / init / f"seed_{seed}"


def init_dir(p, method, init) -> Path:
    return p.out / method / "init" / init


def init_path(p, method, init, target) -> Path:
    from pewe.ensemble import OUTPUT_PATTERN

    return init_dir(p, method, init) / OUTPUT_PATTERN.format(task=target)


def part_path(p, method, target) -> Path:
    return p.out / method / "similarity" / "parts" / f"{target}.json"


def pairs_dir(p, method) -> Path:
    return p.out / method / "pairs"


def reference_path(p, method, target) -> Path:
    """The first seed's random-init delta of ``target`` (KL and weight Cosine compare with it)."""
    path = tuned_dir(p, method, "random", p.seeds[0]) / target / "checkpoint-best.safetensors"
    if not path.is_file():
        raise StudyError(f"{path}: no random-init delta of target {target} (run --steps random for it first)")
    return path


def source_checkpoints(a, p, method) -> dict:
    """{task: source delta} for every study task; all must exist (run the sources step first)."""
    from pewe.similarity import SimilarityError, list_sources

    root = source_root(a, p, method)
    if not root.is_dir():
        raise StudyError(f"{root}: no source deltas yet (run --steps sources first)")
    try:
        return list_sources(root, p.tasks)
    except SimilarityError as e:
        raise StudyError(f"{e} (run --steps sources first)") from None


# --------------------------------------------------------------------------- backbone and tuning

class Bench:
    """The backbone loaded once; per method one delta-carrying copy, and per seed its random init."""

    def __init__(self, a, base, tokenizer, device, precision):
        self.a, self.base, self.tokenizer, self.device, self.precision = a, base, tokenizer, device, precision
        self.method = self.model = None
        self.inits = {}

    def use(self, method):
        """The model carrying ``method``'s delta (the base stays untouched for later methods)."""
        if method != self.method:
            self.model = None  # drop the previous method's copy first
            self.model = attach_delta(copy.deepcopy(self.base), delta_config(self.a, method))
            self.method, self.inits = method, {}
        return self.model

    def random_init(self, seed) -> dict:
        """The delta tune_hps_singletask.py --seed ``seed`` starts from: seed, then attach."""
        from pewe.trainer import set_seed

        if seed not in self.inits:
            set_seed(seed)
            scratch = attach_delta(copy.deepcopy(self.base), delta_config(self.a, self.method))
            self.inits[seed] = {k: v.clone() for k, v in delta_state_dict(scratch).items()}
        return self.inits[seed]

    def tune(self, task_dir, out_dir, tasks, seed, train_iters, init=None, budgets=()) -> dict:
        """Tune (skip / resume) and test every task, as tune_hps_singletask.py with one split, one lr
        and one batch size would; ``init``: a folder of without_{task}_checkpoint files. {task: result}."""
        from pewe.tuning import keep_best, rebuild_result_tsv, run_one

        a, model = self.a, self.model
        ns = SimpleNamespace(
            task_dir=str(task_dir), seed=seed, train_iters=train_iters, train_checkpoint=init, test_checkpoint=None,
            step_budgets=list(budgets), do_train=True, do_predict=True, model=str(a.model),
            valid_interval=a.valid_interval, log_interval=a.log_interval, early_stop=a.early_stop,
            predict_batch_size=a.predict_batch_size, max_input_length=a.max_input_length,
            max_output_length=a.max_output_length, truncation_side=a.truncation_side, progress=a.progress)
        state = self.random_init(seed)
        results = {}
        for task in tasks:
            prefix = first_prefix(task_dir, task)
            run_dir = Path(out_dir) / task / "runs" / run_name(prefix, a)
            results[task] = run_one(model, self.tokenizer, task, prefix, a.learning_rate, a.batch_size, ns,
                                    self.device, self.precision, run_dir, lambda: load_delta_state(model, state))
            if not (Path(out_dir) / task / "checkpoint-best.safetensors").exists():
                keep_best(Path(out_dir) / task, [results[task]], [run_dir])
        if tasks:
            rebuild_result_tsv(Path(out_dir), list(tasks))
        return results


def step_sources(bench, a, p, method):
    if a.source_dir:
        found = source_checkpoints(a, p, method)
        log.info("%s: reusing %d source deltas from %s", method, len(found), source_root(a, p, method))
        return
    log.info("%s: sources on %s: %s", method, a.source_task_dir, ", ".join(p.source_tasks))
    bench.tune(a.source_task_dir, source_root(a, p, method), p.source_tasks, a.source_seed, a.source_train_iters)


def step_random(bench, a, p, method):
    for seed in p.seeds:
        log.info("%s: random init, seed %d: %s", method, seed, ", ".join(p.targets))
        bench.tune(a.target_task_dir, tuned_dir(p, method, "random", seed), p.targets, seed,
                   a.target_train_iters, budgets=p.budgets)


def step_targets(bench, a, p, method):
    for init in p.init_names:
        todo = [t for t in p.targets if covers(p, init, t)]
        for t in todo:
            if not init_path(p, method, init, t).is_file():
                raise StudyError(f"{init_path(p, method, init, t)}: no initialisation yet (run --steps ensemble)")
        for seed in p.seeds:
            log.info("%s: from %s, seed %d: %s", method, init, seed, ", ".join(todo) or "no target")
            bench.tune(a.target_task_dir, tuned_dir(p, method, init, seed), todo, seed, a.target_train_iters,
                       init=init_dir(p, method, init), budgets=p.budgets)


# --------------------------------------------------------------------------- similarity

def score_options(a, precision):
    from pewe.similarity import ScoreOptions

    return ScoreOptions(num_batches=a.sim_num_batches, batch_size=a.sim_batch_size, grand_batches=a.grand_batches,
                        max_input_length=a.max_input_length, max_output_length=a.max_output_length,
                        truncation_side=a.truncation_side, precision=precision, seed=a.source_seed,
                        quiet=not a.progress)


def step_similarity(bench, a, p, method):
    """Score every source on each target (one part file per target), then rebuild the per-score
    result.tsv files from all parts. A part is kept as it is; scores it lacks (a score added to the
    study later) are computed and added, so the initialisations already made from it stay valid."""
    from pewe.similarity import SimilarityEngine

    if not p.scores:
        return
    options = score_options(a, bench.precision)
    sources = source_checkpoints(a, p, method)
    engine = SimilarityEngine(bench.model, bench.tokenizer, bench.device, options)
    for target in p.targets:
        path = part_path(p, method, target)
        part = json.loads(path.read_text()) if path.is_file() else None
        todo = [s for s in p.scores if part is None or s not in part["scores"]]
        if not todo:
            log.info("%s: already done, skipping", path)
            continue
        part = part or part_info(engine, a, options, target)
        part["scores"].update(score_target(engine, a, p, method, target, sources, todo))
        atomic_write_text(path, json.dumps(part, indent=1))
        log.info("%s: scored %d sources (%s)", target, len(sources), ", ".join(todo))
    write_similarity_files(a, p, method, options)


def part_info(engine, a, options, target) -> dict:
    """A new part: the counts that per-token temperatures need (label tokens of the dev batches the
    forward scores read, GraNd's batches)."""
    dev = engine.dev_batches(a.target_task_dir, target)
    return {"target": target, "scores": {},
            "label_tokens": sum(int((b["labels"] != -100).sum()) for b in _first(dev, options.num_batches)),
            "grand_batches": len(_first(dev, options.grand_batches))}


def score_target(engine, a, p, method, target, sources, names) -> dict:
    """{score: {source: value}} of ``names`` for one target: the engine's scores from one pass per
    source, the weight Cosine from the files, Euclidean / Performance from the short tunings."""
    from pewe.similarity import SCORES

    engine_scores = [s for s in names if s not in DELTA_SCORES]
    needs_ref = any(SCORES[s].needs_reference for s in engine_scores) or "Cosine" in names
    ref = reference_path(p, method, target) if needs_ref else None
    out = {}
    if engine_scores:
        got = engine.score_tasks([target], a.target_task_dir, sources, engine_scores, {target: ref} if ref else None)
        out = {s: got[s][""][target] for s in engine_scores}
    if "Cosine" in names:
        from pewe.delta_scores import cosine_scores

        out["Cosine"] = cosine_scores({target: ref}, sources, expect_method=method)[target]
    pair_names = [s for s in names if s in PAIR_SCORES]
    if pair_names:
        out.update(pair_scores(engine, a, p, method, target, sources, pair_names))
    return out


def pair_scores(engine, a, p, method, target, sources, names) -> dict:
    """{score: {source: value}} of Euclidean / Performance for one target: every other source delta
    tuned ``pair_train_iters`` updates on the target's few-shot split (skipped when its result.json
    exists, resumed when killed; the layout of tune_all_ckpt.py), then its zero-shot dev score."""
    import dataclasses

    from delta_modules import load_delta
    from pewe import delta_scores as D
    from pewe.trainer import score_rows
    from pewe.transfer import eval_settings, load_target, tune_pair

    ns = SimpleNamespace(task_dir=a.target_task_dir, model=str(a.model), seed=a.source_seed, do_predict=False,
                         keep_resume=False, predict_batch_size=a.predict_batch_size, max_input_length=a.max_input_length,
                         max_output_length=a.max_output_length, truncation_side=a.truncation_side)
    model, tokenizer, device = engine.model, engine.tokenizer, engine.device
    settings = dataclasses.replace(eval_settings(ns, engine.options.precision), learning_rate=a.learning_rate,
                                   batch_size=a.batch_size, train_iters=a.pair_train_iters,
                                   valid_interval=a.pair_valid_interval, log_interval=a.pair_valid_interval,
                                   early_stop=0)
    others = {s: path for s, path in sources.items() if s != target}
    data = load_target(ns, tokenizer, target, ("train", "dev"))
    root = pairs_dir(p, method)
    for source, path in others.items():
        pair_dir = root / target / source
        if (pair_dir / "result.json").is_file():
            log.info("%s: already done, skipping", pair_dir / "result.json")
            continue
        r = tune_pair(model, tokenizer, data, source, path, ns, settings, device, pair_dir)
        log.info("%s <- %s: dev %.4f after the short tuning (best at %d)", target, source, r["dev_score"], r["best_step"])
    out = {}
    if "Euclidean" in names:
        out["Euclidean"] = D.euclidean_scores(others, root, [target], "best", expect_method=method)[target]
    if "Performance" in names:
        zero = {}
        for source, path in others.items():
            load_delta(model, path)
            zero[source], _ = score_rows(model, tokenizer, data.dev, data.metric, settings,
                                         device, desc=f"{source} on {target}")
        tuned = D.read_tuned_scores(root, [target], list(others), "best")
        out["Performance"] = D.performance_scores(tuned, {target: zero}, [target], list(others))[target]
    return out


def _first(items, n) -> list:
    """The first ``n`` items (0 = all), as the similarity engine reads dev batches."""
    return list(items) if n == 0 else list(items)[:n]


def read_part(p, method, target) -> dict:
    path = part_path(p, method, target)
    if not path.is_file():
        raise StudyError(f"{path}: target {target} has no similarity scores yet (run --steps similarity)")
    return json.loads(path.read_text())


def write_similarity_files(a, p, method, options):
    """{method}/similarity/{score}/result.tsv (+ scores.json) over every target scored so far."""
    import dataclasses

    from pewe.similarity import format_result, write_results

    parts = {t: read_part(p, method, t) for t in p.tasks if part_path(p, method, t).is_file()}
    for score in p.scores:
        table = {t: part["scores"][score] for t, part in parts.items() if score in part["scores"]}
        sources = list(next(iter(table.values()), {}))
        out = p.out / method / "similarity" / score
        extra = {"sources": sources, "model": str(a.model), "task_dir": str(a.target_task_dir)}
        if not table:
            continue  # no target has this score yet (another method's, or not run)
        if score in DELTA_SCORES:
            atomic_write_text(out / "result.tsv", format_result(table))
            meta = {"metric": score, "higher_is_more_similar": score_sign(score) > 0, "files": ["result.tsv"],
                    "options": dataclasses.asdict(options), **extra}
            atomic_write_text(out / "scores.json", json.dumps(meta, indent=1))
        else:
            write_results(out, score, {"": table}, options, extra)


# --------------------------------------------------------------------------- ensemble

def effective_temperature(a, p, score, part) -> float:
    """T of ``softmax(sign * score / T)``: per label token (per batch for GraNd) when per_token."""
    from pewe.similarity import SCORES

    t = p.temperatures[score]
    if not a.per_token or score in DELTA_SCORES:
        return t
    spec = SCORES[score]
    if spec.kind == "grad":
        return t * max(1, part["grand_batches"])
    if spec.reduction == "sum":
        return t * max(1, part["label_tokens"])
    return t


def covers(p, init, target) -> bool:
    """Whether ``target`` has the initialisation ``init`` (not when alone in its manual group)."""
    return init != "manual" or any(target in members for members in p.groups.values())


def init_weights(a, p, method, init, target):
    """(weights {source: w}, meta) of ``target``'s initialisation ``init``; None where it has none
    (a target alone in its manual group)."""
    from pewe import ensemble as E

    if init == "average":
        return E.average_weights(p.tasks, [target])[target], {"method": "average"}
    if init == "manual":
        group = next(((g, m) for g, m in p.groups.items() if target in m), None)
        if group is None:
            return None
        return E.group_weights([group[1]])[target], {"method": "manual", "group": group[0]}
    part = read_part(p, method, target)
    if init not in part["scores"]:
        raise StudyError(f"{part_path(p, method, target)}: no {init} scores (run --steps similarity again)")
    temp = effective_temperature(a, p, init, part)
    weights = E.loo_weights({target: part["scores"][init]}, p.tasks, score_sign(init), temp, targets=[target],
                            where=str(part_path(p, method, target)))[target]
    return weights, {"method": "softmax", "metric": init, "temperature": temp,
                     "temperature_per_unit": p.temperatures[init]}


def step_ensemble(bench, a, p, method):
    """Write each target's initial delta (skipped when present, refused when its weights changed),
    then rebuild each initialisation's summary files over every target done so far."""
    from pewe import ensemble as E
    from pewe.delta_scores import tuned_checkpoint

    sources = source_checkpoints(a, p, method)
    for init in p.init_names:
        pending, metas = {}, {}  # the targets still to write: {target: {source: w}}, {target: meta}
        for target in p.targets:
            got = init_weights(a, p, method, init, target)
            path = init_path(p, method, init, target)
            if got is None:
                log.info("%s %s: %s is alone in its group, no manual initialisation", method, init, target)
                continue
            weights, meta = got
            if path.is_file():
                old = json.loads(path.with_suffix(".json").read_text()).get("weights")
                if old != weights:
                    raise StudyError(f"{path}: made with other weights than now requested (another temperature "
                                     f"or scores?); use another output_dir or delete {path.parent}")
                log.info("%s: already done, skipping", path)
                continue
            pending[target], metas[target] = weights, meta
        if init == "Performance":  # as the original: the *tuned* deltas of the short tunings, per target
            used = {t: {s: tuned_checkpoint(pairs_dir(p, method), t, s) for s in w} for t, w in pending.items()}
            made = ((t, *E.weighted_average([(used[t][s], w) for s, w in pending[t].items()], method))
                    for t in pending)
        else:  # each source is read once for all pending targets (not once per target)
            used = {t: {s: Path(sources[s]) for s in w} for t, w in pending.items()}
            made = E.weighted_averages(pending, sources, expect_method=method)
        for target, tensors, config in made:
            save_delta(init_path(p, method, init, target), tensors, config, task=target, weights=pending[target],
                       sources={s: str(path.resolve()) for s, path in used[target].items()}, **metas[target])
        write_init_summary(p, method, init)


def read_init_weights(p, method, init) -> dict:
    """{target: {source: w}} from the sidecars of every initial delta written so far."""
    out = {}
    for t in p.tasks:
        side = init_path(p, method, init, t).with_suffix(".json")
        if side.is_file():
            out[t] = json.loads(side.read_text())["weights"]
    return out


def write_init_summary(p, method, init):
    """final_weight.txt, weights.csv and hot_pic_all.png of one initialisation (only when its
    weights changed since the last time: the heat map takes a second to draw)."""
    from pewe import ensemble as E

    weights = read_init_weights(p, method, init)
    d = init_dir(p, method, init)
    text = json.dumps(weights, indent=1)
    if not weights or ((d / "weights.json").is_file() and (d / "weights.json").read_text() == text
                       and (d / "hot_pic_all.png").is_file()):
        return
    scores = None
    if init not in BASELINES:
        scores = {t: read_part(p, method, t)["scores"][init] for t in weights}
    E.write_weight_reports(d, weights, p.tasks, scores, title=f"{method}: {init}")
    atomic_write_text(d / "weights.json", text)


# --------------------------------------------------------------------------- report: data

def majority_baseline(task_dir, task) -> dict:
    """The "always give the most frequent answer" score of ``task``'s test split, and that answer's share."""
    from pewe.data import read_tsv, split_path
    from pewe.metrics import evaluate, majority_answer, metric_for

    examples = read_tsv(split_path(task_dir, task, first_prefix(task_dir, task), "test"))
    answers = [ex.answers for ex in examples]
    answer = majority_answer(answers)
    share = Counter(a[0] for a in answers)[answer] / len(answers)
    metric = metric_for(task)
    return {"task": task, "metric": metric, "answer": answer, "share": share, "n": len(answers),
            "score": evaluate([answer] * len(answers), answers, metric), "flagged": share > FLAG_SHARE}


def collect(a, p) -> list:
    """Tidy rows (method, init, target, seed, budget, split, score) of every finished run."""
    rows = []
    for method in p.methods:
        for init in p.all_inits:
            for seed in p.seeds:
                for target in p.tasks:
                    done = (tuned_dir(p, method, init, seed) / target / "runs"
                            / run_name(first_prefix(a.target_task_dir, target), a) / "result.json")
                    if not done.is_file():
                        continue
                    r = json.loads(done.read_text())
                    key = (method, init, target, seed)
                    rows.append((*key, EARLY, "test", r["test_score"]))
                    rows.append((*key, EARLY, "dev", r["dev_score"]))
                    budgets = r.get("budget_scores") or {}
                    rows += [(*key, str(b), "dev", budgets.get(str(b))) for b in p.budgets]
    return rows


def select(rows, method, budget, split) -> dict:
    """{(init, target): {seed: score}} of one table (missing budgets dropped)."""
    out = {}
    for m, init, target, seed, b, s, score in rows:
        if m == method and b == budget and s == split and score is not None:
            out.setdefault((init, target), {})[seed] = score
    return out


def mean_std(values):
    """(mean, sample std) of a list; std None for a single value."""
    values = list(values)
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def fmt_cell(values) -> str:
    """Mean ± std (sample std over seeds) in points (score x 100), "—" when nothing is there."""
    mean, std = mean_std(values)
    if mean is None:
        return "—"
    return f"{100 * mean:.2f}" if std is None else f"{100 * mean:.2f} ± {100 * std:.2f}"


def row_mean(cells: dict, targets, seeds):
    """Per seed the mean over the targets that have that seed, then those means over seeds; and
    whether every target contributed."""
    per_seed = []
    for s in seeds:
        vals = [cells[t][s] for t in targets if s in cells.get(t, {})]
        if vals:
            per_seed.append(statistics.fmean(vals))
    complete = all(set(seeds) <= set(cells.get(t, {})) for t in targets)
    return per_seed, complete


def gains(rows, method, init, seeds, targets):
    """Per seed: the mean over targets of (test score from ``init`` - test score from random)."""
    table = select(rows, method, EARLY, "test")
    out = []
    for s in seeds:
        diffs = [table[(init, t)][s] - table[("random", t)][s] for t in targets
                 if s in table.get((init, t), {}) and s in table.get(("random", t), {})]
        if diffs:
            out.append(statistics.fmean(diffs))
    return out


# --------------------------------------------------------------------------- report: files

def md_table(header, body) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in body]


def score_table(rows, p, method, budget, split, majority) -> list:
    """Rows: initialisations; columns: targets (dominated ones marked †) and the mean. The test
    table ends with the majority-answer score, the floor that transfer has to beat."""
    table = select(rows, method, budget, split)
    header = ["init", *[f"{m['task']} †" if m["flagged"] else m["task"] for m in majority], "mean"]
    body = []
    for init in p.all_inits:
        cells = {t: table.get((init, t), {}) for t in p.tasks}
        per_seed, complete = row_mean(cells, p.tasks, p.seeds)
        mean = fmt_cell(per_seed) + ("" if complete or not per_seed else " *")
        body.append([init, *[fmt_cell(cells[t].values()) for t in p.tasks], mean])
    if split == "test":
        scores = [m["score"] for m in majority]
        body.append(["*majority answer*", *[fmt_cell([x]) for x in scores], fmt_cell([statistics.fmean(scores)])])
    return md_table(header, body)


def gain_text(rows, p, method, init) -> str:
    """Mean ± std over seeds of the mean test gain over random init (* = not every target)."""
    partial = not all(covers(p, init, t) for t in p.tasks)
    return f"{init} {fmt_cell(gains(rows, method, init, p.seeds, p.tasks))}" + (" *" if partial else "")


def temperature_text(a, p, init) -> str:
    from pewe.similarity import SCORES

    if init in BASELINES:
        return "—"
    unit = ""
    if a.per_token and init not in DELTA_SCORES:
        spec = SCORES[init]
        unit = " per batch" if spec.kind == "grad" else " per token" if spec.reduction == "sum" else ""
    return f"{p.temperatures[init]:g}{unit}"


def weights_lines(a, p, method) -> list:
    """Per initialisation: temperature, mean effective number of sources (1 / sum w^2), heat map."""
    body = []
    for init in p.init_names:
        weights = read_init_weights(p, method, init)
        if not weights:
            continue
        eff = statistics.fmean(1 / sum(w * w for w in ws.values()) for ws in weights.values())
        temp = temperature_text(a, p, init)
        heat = init_dir(p, method, init) / "hot_pic_all.png"
        link = "—"
        if heat.is_file():
            dest = p.out / "heatmaps" / f"{method}_{init}.png"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(heat, dest)
            link = f"![{method} {init}](heatmaps/{dest.name})"
        body.append([init, temp, f"{eff:.2f}", f"{len(weights)}/{len(p.tasks)}", link])
    if not body:
        return []
    return md_table(["init", "T", "effective sources", "targets", "heat map"], body)


def plot_gain(path, rows, p):
    """Grouped bars: per initialisation (x) and method (colour) the mean gain over random init in
    test points, error bars = std over seeds."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    inits = p.init_names
    fig = Figure(figsize=(max(4.0, 1.1 * len(inits) * max(1, len(p.methods)) + 1.5), 3.6), dpi=120,
                 layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(p.methods))
    for k, method in enumerate(p.methods):
        stats = [mean_std(gains(rows, method, i, p.seeds, p.tasks)) for i in inits]
        means = [100 * m if m is not None else np.nan for m, _ in stats]
        errs = [100 * s if s is not None else 0.0 for _, s in stats]
        x = np.arange(len(inits)) + (k - (len(p.methods) - 1) / 2) * width
        ax.bar(x, means, width, yerr=errs, capsize=3, label=method)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(inits)), labels=inits, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test gain over random init (points)")
    ax.set_title(f"mean over {len(p.tasks)} targets, ± std over {len(p.seeds)} seeds", fontsize=9)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def write_csv(path, rows):
    buf = io.StringIO()
    out = csv.writer(buf, lineterminator="\n")
    out.writerow(["method", "init", "target", "seed", "budget", "split", "score"])
    for r in rows:
        out.writerow([*r[:6], "" if r[6] is None else repr(r[6])])
    atomic_write_text(path, buf.getvalue())


def refresh_summaries(a, p, precision):
    """Rebuild the files that gather every target (similarity result.tsv, the initialisations'
    weights and heat maps, each tuned folder's result.tsv): shards running at once may each have
    written them before the others had finished."""
    from pewe.tuning import rebuild_result_tsv

    for method in p.methods:
        if any(part_path(p, method, t).is_file() for t in p.tasks):
            write_similarity_files(a, p, method, score_options(a, precision))
        for init in p.init_names:
            write_init_summary(p, method, init)
        for folder in sorted((p.out / method / "targets").glob("*/seed_*")):
            done = [t for t in p.tasks if (folder / t / "runs").is_dir()]
            if done:
                rebuild_result_tsv(folder, done)


def step_report(a, p) -> Path:
    """report.md, report.csv, gain.png and heatmaps/ from the files alone (any process, any time)."""
    majority = [majority_baseline(a.target_task_dir, t) for t in p.tasks]
    for m in majority:
        print(f"majority baseline {m['task']}: always {m['answer']!r} ({100 * m['share']:.0f} % of test) scores "
              f"{100 * m['score']:.2f} {m['metric']}" + ("  <- dominated by one answer" if m["flagged"] else ""))
    rows = collect(a, p)
    write_csv(p.out / "report.csv", rows)
    runs = len({r[:4] for r in rows})
    planned = len(p.methods) * len(p.seeds) * sum(covers(p, i, t) for i in p.all_inits for t in p.tasks)
    lines = ["# Leave-one-out transfer study", "",
             f"Backbone `{Path(str(a.model)).name}`; {len(p.tasks)} tasks, each a source (tuned on its full "
             f"split) and a target (tuned on its few-shot split with the others as sources); seeds "
             f"{', '.join(map(str, p.seeds))}; lr {a.learning_rate:g}, batch {a.batch_size}, validation every "
             f"{a.valid_interval} updates, early stop after {a.early_stop}, at most {a.target_train_iters} updates.",
             f"Cells: mean ± sample std over seeds of the score × 100; mean column: per seed the mean over "
             f"targets, then mean ± std over seeds (* = not every target has this initialisation). "
             f"Finished runs: {runs} of {planned}.", "",
             "## Majority-answer baseline (test)", "",
             "A target whose test set is dominated by one answer (share > 50 %, marked †) can look like "
             "transfer when a delta learns to always give that answer: compare its scores with this one.", ""]
    lines += md_table(["target", "metric", "majority answer", "share", "score", "dominated"],
                      [[m["task"], m["metric"], f"`{m['answer']}`", f"{100 * m['share']:.0f} %",
                        f"{100 * m['score']:.2f}", "† yes" if m["flagged"] else "no"] for m in majority])
    lines.append("")
    if any(len(gains(rows, m, i, p.seeds, p.tasks)) for m in p.methods for i in p.init_names):
        plot_gain(p.out / "gain.png", rows, p)
        lines += ["![gain over random init](gain.png)", ""]
    for method in p.methods:
        lines += [f"## {method}", "", "### Test score after early stopping", ""]
        lines += score_table(rows, p, method, EARLY, "test", majority)
        lines += ["", "Gain over random init (test points, mean ± std over seeds; * = over the targets it "
                  "covers): " + ", ".join(gain_text(rows, p, method, i) for i in p.init_names), ""]
        for b in p.budgets:
            lines += [f"### Dev score after {b} updates", ""]
            lines += score_table(rows, p, method, str(b), "dev", majority) + [""]
        table = weights_lines(a, p, method)
        if table:
            lines += ["### Initialisation weights", "",
                      "Effective sources = 1 / Σ w² averaged over targets (1: one source, n: uniform).", ""]
            lines += table + [""]
    if "manual" in p.init_names:
        groups = "; ".join(f"{g}: {' '.join(m)}" for g, m in p.groups.items()) or "none"
        alone = [t for t in p.tasks if not covers(p, "manual", t)]
        lines += [f"Manual groups (restricted to the study tasks): {groups}."
                  + (f" No manual initialisation for {', '.join(alone)} (alone in their group)." if alone else ""), ""]
    report = p.out / "report.md"
    atomic_write_text(report, "\n".join(lines))
    return report


# --------------------------------------------------------------------------- the study

def run_study(a, model, tokenizer, device, precision):
    """Run the chosen steps of the study; what run_study.py calls (through pewe.cli.run_entry)."""
    p = plan(a)
    log.info("study: steps %s; methods %s; %d tasks, targets here %s; inits %s; seeds %s", ", ".join(p.steps),
             ", ".join(p.methods), len(p.tasks), ", ".join(p.targets), ", ".join(p.all_inits),
             ", ".join(map(str, p.seeds)))
    work = [s for s in p.steps if s != "report"]
    if work:
        bench = Bench(a, model, tokenizer, device, precision)
        run = {"sources": step_sources, "random": step_random, "similarity": step_similarity,
               "ensemble": step_ensemble, "targets": step_targets}
        for method in p.methods:
            bench.use(method)
            for step in work:
                log.info("== %s: %s", method, step)
                run[step](bench, a, p, method)
    if "report" in p.steps:
        refresh_summaries(a, p, precision)
        report = step_report(a, p)
        print(Path(report).read_text(), end="")
        print(f"report: {report}")
    return p
