"""The leave-one-out transfer study, end to end, in one process (what ``run_study.py`` runs).

For every delta method, with the backbone loaded once, the steps run in this order, each in its own
file of this package:

  sources     (sources.py)    tune every study task on its full split, or reuse ``source_dir``
  random      (random.py)     tune every target on its few-shot split from a random init, per seed
  similarity  (similarity.py) score every source on every target
  ensemble    (ensemble.py)   the initial deltas per target and initialisation
  targets     (targets.py)    tune every target from every initialisation, per seed
  report      (report.py)     report.md, report.csv, gain.png, heatmaps/ (from the files alone)

``plan.py`` checks the options once into a frozen plan (and holds the folder layout); ``bench.py``
holds the backbone and tunes lists of tasks. Every piece is skipped when its file exists (a run's
result.json, a similarity part, an initial delta), and an interrupted tuning run resumes from its
last validation, so an interrupted study started again with the same command continues where it
stopped. ``shard`` / ``targets`` split the per-target steps over processes, ``source_shard`` the
sources step; the report reads only files, so it can run once at the end (``--steps report``).
"""
from __future__ import annotations

import logging
from pathlib import Path

from pewe.study.bench import Bench
from pewe.study.ensemble import step_ensemble
from pewe.study.plan import STEPS, StudyError, StudyPlan, make_plan, needs_model
from pewe.study.random import step_random
from pewe.study.report import refresh_summaries, step_report
from pewe.study.similarity import step_similarity
from pewe.study.sources import step_sources
from pewe.study.targets import step_targets

log = logging.getLogger("pewe")
# The steps that work with the backbone, in pipeline order; the report reads only files.
WORK_STEPS = (("sources", step_sources), ("random", step_random), ("similarity", step_similarity),
              ("ensemble", step_ensemble), ("targets", step_targets))

__all__ = ["run_study", "needs_model", "make_plan", "StudyPlan", "StudyError", "STEPS"]


def run_study(a, model, tokenizer, device, precision) -> StudyPlan:
    """Run the chosen steps of the study; what run_study.py calls (through pewe.cli.run_entry)."""
    plan = make_plan(a)
    log.info("study: steps %s; methods %s; %d tasks, targets here %s; inits %s; seeds %s", ", ".join(plan.steps),
             ", ".join(plan.methods), len(plan.tasks), ", ".join(plan.targets), ", ".join(plan.all_inits),
             ", ".join(map(str, plan.seeds)))
    if any(step != "report" for step in plan.steps):
        bench = Bench(plan, model, tokenizer, device, precision)
        for method in plan.methods:
            bench.use(method)
            for name, step in WORK_STEPS:
                if name in plan.steps:
                    log.info("== %s: %s", method, name)
                    step(bench, plan, method)
    if "report" in plan.steps:
        refresh_summaries(plan, precision)
        report = step_report(plan)
        print(Path(report).read_text(), end="")
        print(f"report: {report}")
    return plan
