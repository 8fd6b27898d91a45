"""The study's plan: every option of ``run_study.py`` checked and resolved once, before any work,
into one frozen ``StudyPlan`` that every step reads; and the paths of the study's folders.

Layout of ``out``::

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
"""
from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path

from delta_modules import DeltaConfig
from pewe.data import TextOptions, check_task_names, list_tasks
from pewe.errors import UserError
from pewe.inits import INITS, canonical_init_name, init_spec, parse_init_name, parse_merge_options
from pewe.layout import init_path, shard_of
from pewe.model import DEFAULT_MODEL
from pewe.scores import DEFAULT_TEMPERATURES, STUDY_SCORES
from pewe.similarity import ScoreOptions
from pewe.sources import SHIPPED
from pewe.trainer import TrainSettings, resolve_batch_runs
from pewe.tuning import delta_config_of
from pewe.weights import parse_groups
from task_list import BUNDLED_GROUPS, QA_groups, groups_for

log = logging.getLogger("pewe")

STEPS = ("sources", "random", "similarity", "ensemble", "targets", "report")
BASELINES = tuple(INITS)  # initialisations that need no score (average, manual)


class StudyError(UserError):
    """A study request that cannot be met (bad option, missing earlier step)."""


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


def parse_temperatures(items) -> dict:
    """The scores' default temperatures (``pewe.scores``) updated with "Name=T" items."""
    out = dict(DEFAULT_TEMPERATURES)
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


@dataclasses.dataclass(frozen=True)
class StudyPlan:
    out: Path
    steps: tuple
    methods: tuple
    deltas: dict  # {method: DeltaConfig}
    tasks: tuple  # the pool of source tasks (each also a target, leaving itself out, unless --targets says otherwise)
    all_targets: tuple  # every target of the study (--targets, default the pool): rows of the report
    targets: tuple  # the targets of this process (all_targets, --shard)
    source_tasks: tuple  # the sources this process tunes (--source_shard)
    seeds: tuple
    budgets: tuple  # update counts at which the targets' dev score is also recorded
    scores: tuple
    baselines: tuple  # --inits: average, manual and the peers' combinations asked for (ties=Loss, lorahub, ...)
    groups: dict  # {group: members}: the manual division restricted to the tasks
    temperatures: dict  # {score: T in its unit}
    per_token: bool  # temperatures of summed scores are per label token (GraNd: per batch)
    model: str
    source_dir: str  # reuse these source deltas ("{method}" replaced) instead of tuning them
    source_task_dir: str
    target_task_dir: str
    source_seed: int
    learning_rate: float
    batch_size: int
    source_train_iters: int
    target_train_iters: int
    valid_interval: int
    log_interval: int
    early_stop: int
    predict_batch_size: int
    text: TextOptions
    sim_num_batches: int
    sim_batch_size: int
    grand_batches: int
    pair_train_iters: int
    pair_valid_interval: int
    progress: bool
    overwrite: bool  # redo every run, pair, part and initial delta of the steps asked for
    merge_options: dict = dataclasses.field(default_factory=dict)  # the peers' combinations' parameters (--merge_options)
    batch_runs: str = "auto"  # runs per lockstep group (pewe.trainer.resolve_batch_runs); not part of any record

    @property
    def init_names(self) -> list:
        """Every initialisation besides random: the baselines, then one per score."""
        return [*self.baselines, *self.scores]

    @property
    def all_inits(self) -> list:
        return ["random", *self.init_names]

    def covers(self, init, target) -> bool:
        """Whether ``target`` has the initialisation ``init`` (not when alone in its manual group)."""
        return init == "random" or init_spec(init).covers(target, self.groups)

    def score_options(self, precision) -> ScoreOptions:
        return ScoreOptions(num_batches=self.sim_num_batches, batch_size=self.sim_batch_size,
                            grand_batches=self.grand_batches, max_input_length=self.text.max_input_length,
                            max_output_length=self.text.max_output_length, truncation_side=self.text.truncation_side,
                            precision=precision, seed=self.source_seed, quiet=not self.progress)

    # ----------------------------------------------------------------------- paths

    def source_root(self, method) -> Path:
        return Path(self.source_dir.replace("{method}", method)) if self.source_dir else self.out / method / "sources"

    def tuned_dir(self, method, init, seed) -> Path:
        return self.out / method / "targets" / init / f"seed_{seed}"

    def init_dir(self, method, init) -> Path:
        return self.out / method / "init" / init

    def init_path(self, method, init, target) -> Path:
        return init_path(self.init_dir(method, init), target)

    def part_path(self, method, target) -> Path:
        return self.out / method / "similarity" / "parts" / f"{target}.json"

    def pairs_dir(self, method) -> Path:
        return self.out / method / "pairs"

    def reference_path(self, method, target) -> Path:
        """The first seed's random-init delta of ``target`` (KL and weight Cosine compare with it)."""
        path = self.tuned_dir(method, "random", self.seeds[0]) / target / "checkpoint-best.safetensors"
        if not path.is_file():
            raise StudyError(f"{path}: no random-init delta of target {target} (run --steps random for it first)")
        return path


def resolve_source_dir(a, methods, tasks) -> str:
    """``--source_dir auto``: the shipped sources (data/sources/{method}) when the run's model is the
    embedded backbone and every method and task has one; else "" (tune them here)."""
    if str(a.source_dir) != "auto":
        return str(a.source_dir or "")
    shipped = all((SHIPPED / m / t / "checkpoint-best.safetensors").is_file() for m in methods for t in tasks)
    embedded = Path(str(a.model)).expanduser().resolve() == DEFAULT_MODEL.resolve()
    return str(SHIPPED / "{method}") if shipped and embedded else ""


# ----------------------------------------------------------------------- --inits (the peers' combinations)

def parse_inits(a, scores, methods) -> tuple:
    """(initialisation names, merge options) from ``--inits`` and ``--merge_options``: the baselines
    (average, manual) and the peers' combinations of ``pewe.inits`` (NAME or NAME=SCORE; the score
    must be among ``--scores``, whose similarity step computes it; lora_exact needs LoRA deltas)."""
    try:
        options = parse_merge_options(getattr(a, "merge_options", None) or [])
        inits = []
        for item in a.inits:
            base, score = parse_init_name(item)
            if base in STUDY_SCORES or base == "block":
                raise StudyError(f"--inits: {item} is a score; score initialisations come from --scores")
            if score is not None and score not in scores:
                raise StudyError(f"--inits {item}: {score} is not among --scores (the similarity step computes it)")
            name = canonical_init_name(item)
            if init_spec(name).lora_only and any(m != "lora" for m in methods):
                raise StudyError(f"--inits {name}: for LoRA deltas only, but --methods has "
                                 f"{', '.join(m for m in methods if m != 'lora')}")
            inits.append(name)
    except StudyError:
        raise
    except UserError as e:
        raise StudyError(f"--inits: {e} (random is always run; score initialisations come from --scores)") from None
    return list(dict.fromkeys(inits)), options


def make_plan(a) -> StudyPlan:
    """Check every option of ``run_study.py`` before any work; the resolved, frozen plan."""
    steps = parse_steps(a.steps)
    methods = list(dict.fromkeys(a.methods))
    for m in methods:
        DeltaConfig(m)  # refuses an unknown method
    tasks = check_task_names(a.tasks, "--tasks: task")
    if len(tasks) < 2 or len(set(tasks)) != len(tasks):
        raise StudyError(f"--tasks: need at least two distinct tasks, got {tasks}")
    targets = check_task_names(a.targets, "--targets: task") or list(tasks)
    if len(set(targets)) != len(targets):
        raise StudyError(f"--targets: a target is named twice: {targets}")
    need = [("target_task_dir", a.target_task_dir, targets)]  # a target outside the pool needs only its own folder
    if not resolve_source_dir(a, methods, tasks):  # sources tuned here: their full splits are read
        need.append(("source_task_dir", a.source_task_dir, tasks))
    for label, d, names in need:
        missing = [t for t in names if t not in list_tasks(d)]
        if missing:
            raise StudyError(f"--{label} {d}: no task folder(s) {', '.join(missing)}")
    scores = list(dict.fromkeys(a.scores))
    bad = [s for s in scores if s not in STUDY_SCORES]
    if bad:
        raise StudyError(f"--scores: {', '.join(bad)} not supported here; expected some of {', '.join(STUDY_SCORES)}")
    inits, merge_options = parse_inits(a, scores, methods)  # --inits: the baselines and the peers' combinations
    seeds = [int(s) for s in a.seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise StudyError(f"--seeds: need distinct seeds, got {seeds}")
    budgets = sorted({int(b) for b in a.step_budgets})
    if any(b < 0 for b in budgets):
        raise StudyError("--step_budgets must be >= 0")
    if budgets and budgets[-1] > a.target_train_iters:
        log.warning("step budget %d > target_train_iters %d: no run reaches it", budgets[-1], a.target_train_iters)
    for iters, interval in ((a.source_train_iters, a.valid_interval), (a.target_train_iters, a.valid_interval),
                            (a.pair_train_iters, a.pair_valid_interval)):
        TrainSettings(learning_rate=a.learning_rate, batch_size=a.batch_size, train_iters=iters, valid_interval=interval,
                      log_interval=a.log_interval, predict_batch_size=a.predict_batch_size,
                      max_output_length=a.max_output_length)  # refuses a bad number before any work
    ScoreOptions(num_batches=a.sim_num_batches, batch_size=a.sim_batch_size, grand_batches=a.grand_batches)
    batch_runs = str(getattr(a, "batch_runs", "auto"))
    resolve_batch_runs(batch_runs, "cpu")  # refuses a bad value before any work
    groups = ({f"group_{i + 1}": g for i, g in enumerate(parse_groups(a.groups))} if a.groups
              else {**BUNDLED_GROUPS, **QA_groups})
    return StudyPlan(
        out=Path(a.output_dir), steps=tuple(steps), methods=tuple(methods),
        deltas={m: delta_config_of(m, a) for m in methods}, tasks=tuple(tasks), all_targets=tuple(targets),
        targets=tuple(shard_of(targets, a.shard)), source_tasks=tuple(shard_of(tasks, a.source_shard, "--source_shard")),
        seeds=tuple(seeds), budgets=tuple(budgets), scores=tuple(scores), baselines=tuple(inits),
        groups=groups_for(tasks, groups), temperatures=parse_temperatures(a.temperatures), per_token=a.per_token,
        model=str(a.model), source_dir=resolve_source_dir(a, methods, tasks), source_task_dir=str(a.source_task_dir),
        target_task_dir=str(a.target_task_dir), source_seed=a.source_seed, learning_rate=a.learning_rate,
        batch_size=a.batch_size, source_train_iters=a.source_train_iters, target_train_iters=a.target_train_iters,
        valid_interval=a.valid_interval, log_interval=a.log_interval, early_stop=a.early_stop,
        predict_batch_size=a.predict_batch_size,
        text=TextOptions(a.max_input_length, a.max_output_length, a.truncation_side),
        sim_num_batches=a.sim_num_batches, sim_batch_size=a.sim_batch_size, grand_batches=a.grand_batches,
        pair_train_iters=a.pair_train_iters, pair_valid_interval=a.pair_valid_interval, progress=a.progress,
        overwrite=a.overwrite, merge_options=merge_options, batch_runs=batch_runs)
