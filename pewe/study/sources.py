"""Step ``sources``: every study task's source delta, tuned on its full split (or reused from
``source_dir``); the one place the study lists the source deltas."""
from __future__ import annotations

import logging

from delta_modules import DeltaError
from pewe.layout import source_checkpoints
from pewe.sources import check_sources_fit
from pewe.study.plan import StudyError, StudyPlan

log = logging.getLogger("pewe")


def study_sources(plan: StudyPlan, method, model=None) -> dict:
    """{task: source delta} for every study task; all must exist (run the sources step first). With
    ``model``, reused sources are checked to fit the run: the delta config and the backbone."""
    root = plan.source_root(method)
    if not root.is_dir():
        raise StudyError(f"{root}: no source deltas yet (run --steps sources first)")
    try:
        found = source_checkpoints(root, plan.tasks)
    except DeltaError as e:  # a task without its checkpoint
        raise StudyError(f"{e} (run --steps sources first)") from None
    if model is not None and plan.source_dir:
        try:
            check_sources_fit(found, plan.deltas[method], model)
        except DeltaError as e:
            raise StudyError(f"{e}; these sources cannot serve this run (--source_dir '' tunes sources of this "
                             f"config on this backbone)") from None
    return found


def step_sources(bench, plan: StudyPlan, method):
    if plan.source_dir:
        found = study_sources(plan, method, bench.base)
        log.info("%s: reusing %d source deltas from %s", method, len(found), plan.source_root(method))
        return
    log.info("%s: sources on %s: %s", method, plan.source_task_dir, ", ".join(plan.source_tasks))
    bench.tune(plan.source_task_dir, plan.source_root(method), plan.source_tasks, plan.source_seed,
               plan.source_train_iters)
