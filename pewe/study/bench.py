"""The study's workbench: the backbone loaded once, one delta-carrying copy per method, and the tuning
of a list of tasks as tune_hps_singletask.py does it (one split, one lr, one batch size)."""
from __future__ import annotations

import copy
from pathlib import Path

from delta_modules import attach_delta, load_delta_state
from pewe.data import first_prefix, has_split
from pewe.layout import rebuild_result_tsv, run_name
from pewe.study.plan import StudyPlan
from pewe.trainer import TrainSettings
from pewe.tuning import TuneJob, initial_delta_state, keep_best, run_job


class Bench:
    """The backbone loaded once; per method one delta-carrying copy, and per seed its random init."""

    def __init__(self, plan: StudyPlan, base, tokenizer, device, precision):
        self.plan, self.base, self.tokenizer, self.device, self.precision = plan, base, tokenizer, device, precision
        self.method = self.model = None
        self.inits = {}

    def use(self, method):
        """The model carrying ``method``'s delta (the base stays untouched for later methods)."""
        if method != self.method:
            self.model = None  # drop the previous method's copy first
            self.model = attach_delta(copy.deepcopy(self.base), self.plan.deltas[method])
            self.method, self.inits = method, {}
        return self.model

    def random_init(self, seed) -> dict:
        """The delta tune_hps_singletask.py --seed ``seed`` starts from."""
        if seed not in self.inits:
            self.inits[seed] = initial_delta_state(self.base, self.plan.deltas[self.method], seed)
        return self.inits[seed]

    def settings(self, seed, train_iters, valid_interval=None, log_interval=None, early_stop=None) -> TrainSettings:
        p = self.plan
        return TrainSettings(learning_rate=p.learning_rate, batch_size=p.batch_size, train_iters=train_iters,
                             valid_interval=p.valid_interval if valid_interval is None else valid_interval,
                             log_interval=p.log_interval if log_interval is None else log_interval,
                             early_stop=p.early_stop if early_stop is None else early_stop,
                             predict_batch_size=p.predict_batch_size, max_output_length=p.text.max_output_length,
                             seed=seed, precision=self.precision, progress=p.progress)

    def tune(self, task_dir, out_dir, tasks, seed, train_iters, init=None, budgets=()) -> dict:
        """Tune (skip / resume) and test (where it has a test split) every task; ``init``: a folder of without_{task}_checkpoint
        files (None: the seed's random init). {task: result}."""
        p, model, out_dir = self.plan, self.model, Path(out_dir)
        state = self.random_init(seed)
        settings = self.settings(seed, train_iters)
        results = {}
        for task in tasks:
            prefix = first_prefix(task_dir, task)
            job = TuneJob(task, prefix, str(task_dir), out_dir / task / "runs" / run_name(prefix, p.learning_rate,
                          p.batch_size), settings, p.text, p.model, do_predict=has_split(task_dir, task, prefix, "test"),
                          train_checkpoint=init, step_budgets=tuple(budgets), overwrite=p.overwrite)
            results[task] = run_job(model, self.tokenizer, job, self.device, lambda: load_delta_state(model, state))
            keep_best(out_dir / task, [results[task]], [job.run_dir])
        if tasks:
            rebuild_result_tsv(out_dir)
        return results
