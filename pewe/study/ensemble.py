"""Step ``ensemble``: each target's initial delta for every initialisation (``pewe.inits``): the
average of all other sources, the manual group's, and one softmax(sign * score / T) per score.

Temperatures are the scores' (``pewe.scores``); with ``per_token`` a summed score's temperature is
per label token (per batch for GraNd). The Performance initialisation averages the pair-tuned
deltas (each has seen the target's few-shot data), as the original; every other one the sources.
"""
from __future__ import annotations

import json
import logging

from pewe.atomic import atomic_write_text
from pewe.averaging import write_averages
from pewe.delta_scores import tuned_checkpoint
from pewe.inits import InitInputs, init_spec
from pewe.layout import file_sha256, read_json
from pewe.scores import effective_temperature, score_spec
from pewe.study.plan import StudyError, StudyPlan
from pewe.study.similarity import read_part
from pewe.study.sources import study_sources
from pewe.weight_reports import write_weight_reports

log = logging.getLogger("pewe")


def init_inputs(plan: StudyPlan, method, init, target) -> InitInputs:
    """What the initialisation ``init`` may read for ``target``: for a score's, its part file."""
    scores, temperatures = {}, {}
    spec = init_spec(init)
    if spec.score is not None:
        part = read_part(plan, method, target)
        if spec.score not in part["scores"]:
            raise StudyError(f"{plan.part_path(method, target)}: no {spec.score} scores (run --steps similarity again)")
        scores = {spec.score: part["scores"][spec.score]}
        per_unit = plan.temperatures[spec.score]
        temp = effective_temperature(score_spec(spec.score), per_unit, plan.per_token, part["label_tokens"],
                                     part["grand_batches"])
        temperatures = {spec.score: (temp, per_unit)}
    return InitInputs(target, tuple(plan.tasks), plan.groups, scores, temperatures)


def step_ensemble(bench, plan: StudyPlan, method):
    """Write each target's initial delta (skipped when present, refused when its weights changed),
    then rebuild each initialisation's summary files over every target done so far."""
    sources = study_sources(plan, method, bench.base)
    for init in plan.init_names:
        tuned = init in plan.scores and score_spec(init).init_from_tuned  # Performance: the pair-tuned deltas
        pending, metas = {}, {}  # the targets still to write: {target: {source: w}}, {target: sidecar fields}
        for target in plan.targets:
            got = init_spec(init).weights(init_inputs(plan, method, init, target))
            path = plan.init_path(method, init, target)
            if got is None:
                log.info("%s %s: %s is alone in its group, no manual initialisation", method, init, target)
                continue
            weights, meta = got
            used = {s: tuned_checkpoint(plan.pairs_dir(method), target, s) if tuned else sources[s] for s in weights}
            meta = {**meta, "source_sha256": {s: file_sha256(p) for s, p in used.items()}}
            if path.is_file() and not plan.overwrite:
                old = read_json(path.with_suffix(".json"), "initial delta's sidecar")
                if old.get("weights") != weights or old.get("source_sha256") != meta["source_sha256"]:
                    what = "weights" if old.get("weights") != weights else "source deltas"
                    raise StudyError(f"{path}: made with other {what} than now (another temperature, other scores, "
                                     f"a source retrained?); rerun with --overwrite to make it again")
                log.info("%s: already done, skipping", path)
                continue
            pending[target], metas[target] = weights, meta
        # a source is read once for all pending targets, unless the deltas differ per target
        checkpoints = ({t: {s: tuned_checkpoint(plan.pairs_dir(method), t, s) for s in w} for t, w in pending.items()}
                       if tuned else sources)
        write_averages(plan.init_dir(method, init), pending, checkpoints, meta=metas.get, expect_method=method)
        write_init_summary(plan, method, init)


def read_init_weights(plan: StudyPlan, method, init) -> dict:
    """{target: {source: w}} from the sidecars of every initial delta written so far."""
    out = {}
    for t in plan.all_targets:
        side = plan.init_path(method, init, t).with_suffix(".json")
        if side.is_file():
            out[t] = read_json(side, "initial delta's sidecar")["weights"]
    return out


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
    if init in plan.scores:
        scores = {t: read_part(plan, method, t)["scores"][init] for t in weights}
    write_weight_reports(d, weights, plan.tasks, scores, title=f"{method}: {init}")
    atomic_write_text(d / "weights.json", text)
