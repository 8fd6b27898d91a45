"""Step ``random``: every target tuned on its few-shot split from a random init, once per seed: the
"random" baseline, and (first seed) the reference delta that KL and the weight Cosine need. A target's
seeds come one after another, so a lockstep group holds one target's runs where it can."""
from __future__ import annotations

import logging

from pewe.study.plan import StudyPlan

log = logging.getLogger("pewe")


def step_random(bench, plan: StudyPlan, method):
    log.info("%s: random init, seeds %s: %s", method, ", ".join(map(str, plan.seeds)), ", ".join(plan.targets))
    jobs = {seed: bench.jobs(plan.target_task_dir, plan.tuned_dir(method, "random", seed), plan.targets, seed,
                             plan.target_train_iters, budgets=plan.budgets) for seed in plan.seeds}
    bench.run([jobs[seed][i] for i in range(len(plan.targets)) for seed in plan.seeds])
