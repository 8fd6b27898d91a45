"""Step ``similarity``: every source scored on every target (its few-shot dev split).

The forward and gradient scores come from one pass per source of the similarity engine, the weight
Cosine from the delta files, Euclidean and Performance from a short tuning of every other source on
the target (``pair_train_iters`` updates, seed ``source_seed``, validation every
``pair_valid_interval``, in tune_all_ckpt.py's layout), the costliest: (tasks - 1) tunings per target.
One part file per target holds every score; the per-score ``result.tsv`` files are rebuilt from all
the parts.
"""
from __future__ import annotations

import dataclasses
import json
import logging

from pewe.atomic import atomic_write_text
from pewe.delta_scores import cosine_scores, euclidean_scores, performance_scores, read_tuned_scores
from pewe.data import first_prefix, split_path
from pewe.layout import file_sha256, read_json, write_similarity
from pewe.model import model_fingerprint
from pewe.scores import score_spec
from pewe.similarity import SimilarityEngine, first_batches
from pewe.study.plan import StudyError, StudyPlan
from pewe.study.sources import study_sources
from pewe.trainer import groups_of
from pewe.transfer import PairJob, claim_pair, load_target, tune_pairs, zero_shot_scores

log = logging.getLogger("pewe")


def step_similarity(bench, plan: StudyPlan, method):
    """Score every source on each target (one part file per target), then rebuild the per-score
    result.tsv files from all parts. A part is kept as it is; scores it lacks (a score added to the
    study later) are computed and added, so the initialisations already made from it stay valid."""
    if not plan.scores:
        return
    options = plan.score_options(bench.precision)
    sources = study_sources(plan, method, bench.base)
    engine = SimilarityEngine(bench.model, bench.tokenizer, bench.device, options, batch_sources=bench.batch_runs)
    for target in plan.targets:
        path = plan.part_path(method, target)
        record = part_record(engine, plan, target, sources)
        part = read_json(path, "similarity part") if path.is_file() and not plan.overwrite else None
        if part is not None and part.get("record") != record:
            diff = next(k for k in record if part.get("record", {}).get(k) != record[k])
            raise StudyError(f"{path}: these scores were made with other {diff} than now (a source delta retrained, "
                             f"other options?); rerun with --overwrite to score again")
        todo = [s for s in plan.scores if part is None or s not in part["scores"]]
        if not todo:
            log.info("%s: already done, skipping", path)
            continue
        part = part or {**new_part(engine, plan, target), "record": record}
        part["scores"].update(score_target(bench, engine, plan, method, target, sources, todo))
        atomic_write_text(path, json.dumps(part, indent=1))
        log.info("%s: scored %d sources (%s)", target, len(sources), ", ".join(todo))
    write_similarity_files(plan, method, options)


def part_record(engine, plan: StudyPlan, target, sources) -> dict:
    """What a target's scores depend on: the backbone, the target's dev split, every source delta (by
    checksum) and the scoring options."""
    options = dataclasses.asdict(engine.options)
    del options["quiet"]
    dev = split_path(plan.target_task_dir, target, first_prefix(plan.target_task_dir, target), "dev")
    return {"model": model_fingerprint(engine.model), "data": file_sha256(dev),
            "sources": {s: file_sha256(path) for s, path in sources.items()}, "options": options}


def new_part(engine, plan: StudyPlan, target) -> dict:
    """A new part: the counts that per-token temperatures need (label tokens of the dev batches the
    forward scores read, GraNd's batches)."""
    dev = engine.dev_batches(plan.target_task_dir, target)
    return {"target": target, "scores": {},
            "label_tokens": sum(int((b["labels"] != -100).sum()) for b in first_batches(dev, plan.sim_num_batches)),
            "grand_batches": len(first_batches(dev, plan.grand_batches))}


def score_target(bench, engine, plan: StudyPlan, method, target, sources, names) -> dict:
    """{score: {source: value}} of ``names`` for one target."""
    specs = [score_spec(s) for s in names]
    engine_scores = [s.name for s in specs if s.kind in ("logits", "grad", "hidden")]
    ref = plan.reference_path(method, target) if any(s.needs_reference for s in specs) else None
    out = {}
    if engine_scores:
        got = engine.score_tasks([target], plan.target_task_dir, sources, engine_scores, {target: ref} if ref else None)
        out = {s: got[s][""][target] for s in engine_scores}
    if "Cosine" in names:
        out["Cosine"] = cosine_scores({target: ref}, sources, expect_method=method)[target]
    pair_names = [s.name for s in specs if s.kind == "pairs"]
    if pair_names:
        out.update(pair_scores(bench, plan, method, target, sources, pair_names))
    return out


def pair_scores(bench, plan: StudyPlan, method, target, sources, names) -> dict:
    """{score: {source: value}} of Euclidean / Performance for one target: every other source delta
    tuned ``pair_train_iters`` updates on the target's few-shot split (skipped when its result.json
    exists, resumed when killed), then its zero-shot dev score."""
    model, tokenizer, device = bench.model, bench.tokenizer, bench.device
    settings = bench.settings(plan.source_seed, plan.pair_train_iters, valid_interval=plan.pair_valid_interval,
                              log_interval=plan.pair_valid_interval, early_stop=0)
    settings = dataclasses.replace(settings, progress=False)
    others = {s: path for s, path in sources.items() if s != target}
    data = load_target(plan.target_task_dir, target, tokenizer, plan.text, ("train", "dev"))
    root = plan.pairs_dir(method)
    pending = []
    for source, path in others.items():
        job = PairJob(target, source, path, root / target / source, plan.target_task_dir, settings, plan.text, plan.model,
                      overwrite=plan.overwrite)
        if claim_pair(model, tokenizer, job) is not None:
            log.info("%s: already done, skipping", job.pair_dir / "result.json")
            continue
        pending.append(job)
    for group in groups_of(pending, bench.batch_runs):  # the target's pairs in lockstep, batch_runs at a time
        for job, r in zip(group, tune_pairs(model, tokenizer, [data] * len(group), group, device)):
            log.info("%s <- %s: dev %.4f after the short tuning (best at %d)", target, job.source, r["dev_score"],
                     r["best_step"])
    out = {}
    if "Euclidean" in names:
        out["Euclidean"] = euclidean_scores(others, root, [target], "best", expect_method=method)[target]
    if "Performance" in names:
        zero = {}
        for group in groups_of(list(others), bench.batch_runs):
            desc = f"{group[0]} on {target}" if len(group) == 1 else f"{len(group)} sources on {target}"
            zero.update(zip(group, zero_shot_scores(model, tokenizer, data, [others[s] for s in group], settings, device,
                                                    desc=desc)))
        tuned = read_tuned_scores(root, [target], list(others), "best")
        out["Performance"] = performance_scores(tuned, {target: zero}, [target], list(others))[target]
    return out


def read_part(plan: StudyPlan, method, target) -> dict:
    path = plan.part_path(method, target)
    if not path.is_file():
        raise StudyError(f"{path}: target {target} has no similarity scores yet (run --steps similarity)")
    return read_json(path, "similarity part")


def write_similarity_files(plan: StudyPlan, method, options):
    """{method}/similarity/{score}/result.tsv (+ scores.json) over every target scored so far."""
    parts = {t: read_part(plan, method, t) for t in plan.all_targets if plan.part_path(method, t).is_file()}
    for score in plan.scores:
        table = {t: part["scores"][score] for t, part in parts.items() if score in part["scores"]}
        if not table:
            continue  # no target has this score yet (another method's, or not run)
        spec = score_spec(score)
        write_similarity(plan.out / method / "similarity" / score, score, {"": table},
                         higher_is_more_similar=spec.higher_is_more_similar, reduction=spec.reduction,
                         options=dataclasses.asdict(options), sources=list(next(iter(table.values()))),
                         model=plan.model, task_dir=plan.target_task_dir)
