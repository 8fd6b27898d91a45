"""Step ``targets``: every target tuned from every initialisation, once per seed; the dev score is
recorded at the step budgets and the test score of the early-stopped best delta. The runs are ordered
target by target (every initialisation x seed of one target, then the next), so a lockstep group
holds one target's runs: the same data, the same padding."""
from __future__ import annotations

import logging

from pewe.study.plan import StudyError, StudyPlan

log = logging.getLogger("pewe")


def step_targets(bench, plan: StudyPlan, method):
    jobs = []
    for init in plan.init_names:
        todo = [t for t in plan.targets if plan.covers(init, t)]
        for t in todo:
            if not plan.init_path(method, init, t).is_file():
                raise StudyError(f"{plan.init_path(method, init, t)}: no initialisation yet (run --steps ensemble)")
        for seed in plan.seeds:
            log.info("%s: from %s, seed %d: %s", method, init, seed, ", ".join(todo) or "no target")
            jobs += bench.jobs(plan.target_task_dir, plan.tuned_dir(method, init, seed), todo, seed,
                               plan.target_train_iters, init=plan.init_dir(method, init), budgets=plan.budgets)
    order = {t: i for i, t in enumerate(plan.targets)}
    bench.run(sorted(jobs, key=lambda job: order[job.task]))  # stable: a target's runs keep init x seed order
