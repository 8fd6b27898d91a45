"""Step ``ensemble``: each target's initial delta for every initialisation (``pewe.inits``): the
average of all other sources, the manual group's, one softmax(sign * score / T) per score, and the
peers' combinations asked for with ``--inits`` (merges, topk, LoraHub).

Temperatures are the scores' (``pewe.scores``); with ``per_token`` a summed score's temperature is
per label token (per batch for GraNd). The Performance initialisation averages the pair-tuned
deltas (each has seen the target's few-shot data), as the original; so does a peers' combination
that reads the Performance score (it differs from Performance by its rule alone); every other one
the sources.

Each sidecar records what the initialisation cost (``compute_seconds``: making its weights, reading
and merging the deltas; a streamed average's pass is shared evenly among the targets written in it;
the scores' own cost is the similarity step's) and, for LoraHub, its ``loss_evaluations``. For LoRA
it also records ``lora_product_error``: the relative Frobenius error of the paper's rule
s (sum w B)(sum w A) against the exact s sum w B A at this initialisation's weights, over all modules
at once (``pewe.merges.lora_product_error``).
"""
from __future__ import annotations

import contextlib
import json
import logging
import time

from pewe.atomic import atomic_write_text
from pewe.averaging import read_sources, write_averages, write_merges
from pewe.data import first_prefix, load_split
from pewe.delta_scores import tuned_checkpoint
from pewe.inits import InitInputs, init_spec
from pewe.layout import file_sha256, read_json
from pewe.lorahub import TrainSplitLoss
from pewe.merges import lora_product_error, merge_rng
from pewe.scores import effective_temperature, score_spec
from pewe.study.plan import StudyError, StudyPlan
from pewe.study.similarity import read_part
from pewe.study.sources import study_sources
from pewe.weight_reports import write_weight_reports

log = logging.getLogger("pewe")


def plan_init_spec(plan: StudyPlan, init):
    """The declaration of ``init`` with the study's merge options."""
    return init_spec(init, getattr(plan, "merge_options", None) or None)


def init_inputs(plan: StudyPlan, method, init, target, loss_of=None) -> InitInputs:
    """What the initialisation ``init`` may read for ``target``: for a score's, its part file."""
    scores, temperatures = {}, {}
    spec = plan_init_spec(plan, init)
    if spec.score is not None:
        part = read_part(plan, method, target)
        if spec.score not in part["scores"]:
            raise StudyError(f"{plan.part_path(method, target)}: no {spec.score} scores (run --steps similarity again)")
        scores = {spec.score: part["scores"][spec.score]}
        per_unit = plan.temperatures[spec.score]
        temp = effective_temperature(score_spec(spec.score), per_unit, plan.per_token, part["label_tokens"],
                                     part["grand_batches"])
        temperatures = {spec.score: (temp, per_unit)}
    return InitInputs(target, tuple(plan.tasks), plan.groups, scores, temperatures, loss_of=loss_of,
                      seed=plan.source_seed)


def reads_tuned(spec) -> bool:
    """Whether the initialisation combines the pair-tuned deltas (those of a Performance-like score)."""
    return spec.score is not None and score_spec(spec.score).init_from_tuned


def train_loss(bench, plan: StudyPlan, method, target, pool: dict, params: dict):
    """LoraHub's objective for ``target``: the loss of a weighted sum of the ``pool`` deltas on its
    few-shot train split, with the study's model (a context: the model's delta is put back after)."""
    rows = load_split(plan.target_task_dir, target, first_prefix(plan.target_task_dir, target), "train",
                      bench.tokenizer, plan.text, one_row_per_answer=True)
    deltas, _ = read_sources(list(pool.values()), method)
    return TrainSplitLoss(bench.model, bench.tokenizer, rows, dict(zip(pool, deltas)), bench.device, bench.precision,
                          batch_size=params["lorahub_batch_size"], mode=params["lorahub_loss"])


def _refuse_changed(path, old: dict, new: dict, fields):
    for field in fields:
        if old.get(field) != new.get(field):
            what = {"weights": "weights", "source_sha256": "source deltas", "merge": "merge parameters",
                    "search": "search inputs (start weights, seed, sources or options)"}[field]
            raise StudyError(f"{path}: made with other {what} than now (another temperature, other scores, "
                             f"a source retrained, other merge options?); rerun with --overwrite to make it again")


class _SourceCache:
    """The study's source deltas read once per step for the LoRA product errors (the pair-tuned
    deltas differ per target and are read when needed)."""

    def __init__(self, method):
        self.method, self.tensors, self.config = method, {}, None

    def error(self, paths: list, weights: list, shared: bool) -> float:
        if shared:
            missing = [p for p in paths if p not in self.tensors]
            if missing:
                deltas, self.config = read_sources(missing, self.method)
                self.tensors.update(zip(missing, deltas))
            deltas, config = [self.tensors[p] for p in paths], self.config
        else:
            deltas, config = read_sources(paths, self.method)
        return lora_product_error(deltas, weights, config)


def step_ensemble(bench, plan: StudyPlan, method):
    """Write each target's initial delta (skipped when present, refused when its weights changed),
    then rebuild each initialisation's summary files over every target done so far."""
    sources = study_sources(plan, method, bench.base)
    cache = _SourceCache(method)
    for init in plan.init_names:
        spec = plan_init_spec(plan, init)
        if spec.lora_only and method != "lora":
            raise StudyError(f"--inits {init}: for LoRA deltas only, not {method}")
        tuned = reads_tuned(spec)  # Performance: the pair-tuned deltas
        pending, metas = {}, {}  # the targets still to write: {target: {source: w}}, {target: sidecar fields}
        for target in plan.targets:
            pool = {s: tuned_checkpoint(plan.pairs_dir(method), target, s) if tuned else sources[s]
                    for s in plan.tasks if s != target}
            path = plan.init_path(method, init, target)
            old = (read_json(path.with_suffix(".json"), "initial delta's sidecar")
                   if path.is_file() and not plan.overwrite else None)
            if old is not None and spec.search_key is not None:  # a search is not redone to check it
                new = {"search": spec.search_key(init_inputs(plan, method, init, target)),
                       "source_sha256": {s: file_sha256(p) for s, p in pool.items()}}
                _refuse_changed(path, old, new, ("search", "source_sha256"))
                log.info("%s: already done, skipping", path)
                continue
            start = time.perf_counter()
            loss = (train_loss(bench, plan, method, target, pool, spec.params) if spec.needs_loss
                    else contextlib.nullcontext(None))
            with loss as loss_of:
                got = spec.weights(init_inputs(plan, method, init, target, loss_of))
            seconds = time.perf_counter() - start
            if got is None:
                log.info("%s %s: %s is alone in its group, no manual initialisation", method, init, target)
                continue
            weights, meta = got
            used = {s: pool[s] for s in weights}
            meta = {**meta, "source_sha256": {s: file_sha256(p) for s, p in used.items()}, "compute_seconds": seconds}
            if old is not None:
                _refuse_changed(path, old, {**meta, "weights": weights}, ("weights", "source_sha256", "merge"))
                log.info("%s: already done, skipping", path)
                continue
            if spec.needs_loss:
                log.info("%s %s %s: %d loss evaluations, %.1f s", method, init, target, meta.get("loss_evaluations", 0),
                         seconds)
            pending[target], metas[target] = weights, meta
        # a source is read once for all pending targets, unless the deltas differ per target
        checkpoints = ({t: {s: tuned_checkpoint(plan.pairs_dir(method), t, s) for s in w} for t, w in pending.items()}
                       if tuned else sources)
        if spec.combine is None:
            _write_sums(plan, method, init, pending, metas, checkpoints, tuned, cache)
        else:
            def on_sources(target, deltas, ws, config):
                return {"lora_product_error": lora_product_error(deltas, ws, config)} if method == "lora" else {}

            write_merges(plan.init_dir(method, init), pending, checkpoints, metas.get, spec.combine,
                         lambda t: merge_rng(plan.source_seed, t), expect_method=method, on_sources=on_sources)
        write_init_summary(plan, method, init)


def _write_sums(plan, method, init, pending, metas, checkpoints, tuned, cache):
    """The streamed weighted sums (pewe.averaging) with each sidecar's compute time and LoRA error."""
    start, stream_seconds = time.perf_counter(), []

    def meta_of(target):
        if not stream_seconds:  # every pending target's sum is done when the first is written
            stream_seconds.append(time.perf_counter() - start)
        meta = dict(metas[target])
        meta["compute_seconds"] += stream_seconds[0] / max(len(pending), 1)
        if method == "lora":
            w = pending[target]
            paths = [checkpoints[target][s] if tuned else checkpoints[s] for s in w]
            meta["lora_product_error"] = cache.error(paths, [float(w[s]) for s in w], shared=not tuned)
        return meta

    write_averages(plan.init_dir(method, init), pending, checkpoints, meta=meta_of, expect_method=method)


def read_init_sidecars(plan: StudyPlan, method, init) -> dict:
    """{target: sidecar} of every initial delta of ``init`` written so far."""
    out = {}
    for t in plan.all_targets:
        side = plan.init_path(method, init, t).with_suffix(".json")
        if side.is_file():
            out[t] = read_json(side, "initial delta's sidecar")
    return out


def read_init_weights(plan: StudyPlan, method, init) -> dict:
    """{target: {source: w}} from the sidecars of every initial delta written so far."""
    return {t: side["weights"] for t, side in read_init_sidecars(plan, method, init).items()}


def write_init_summary(plan: StudyPlan, method, init):
    """final_weight.txt, weights.csv and hot_pic_all.png of one initialisation (only when its
    weights changed since the last time: the heat map takes a second to draw)."""
    weights = read_init_weights(plan, method, init)
    d = plan.init_dir(method, init)
    text = json.dumps(weights, indent=1)
    if not weights or ((d / "weights.json").is_file() and (d / "weights.json").read_text() == text
                       and (d / "hot_pic_all.png").is_file()):
        return
    scores = None
    score = init_spec(init).score
    if score is not None:
        scores = {t: read_part(plan, method, t)["scores"][score] for t in weights}
    write_weight_reports(d, weights, plan.tasks, scores, title=f"{method}: {init}")
    atomic_write_text(d / "weights.json", text)
