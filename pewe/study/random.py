"""Step ``random``: every target tuned on its few-shot split from a random init, once per seed: the
"random" baseline, and (first seed) the reference delta that KL and the weight Cosine need."""
from __future__ import annotations

import logging

from pewe.study.plan import StudyPlan

log = logging.getLogger("pewe")


def step_random(bench, plan: StudyPlan, method):
    for seed in plan.seeds:
        log.info("%s: random init, seed %d: %s", method, seed, ", ".join(plan.targets))
        bench.tune(plan.target_task_dir, plan.tuned_dir(method, "random", seed), plan.targets, seed,
                   plan.target_train_iters, budgets=plan.budgets)
