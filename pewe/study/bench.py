"""The study's workbench: the backbone loaded once, one delta-carrying copy per method, and the tuning
of a list of tasks as tune_hps_singletask.py does it (one split, one lr, one batch size), the runs
``plan.batch_runs`` at a time in lockstep (``pewe.trainer.train_runs``)."""
from __future__ import annotations

import copy
from pathlib import Path

from delta_modules import attach_delta
from pewe.data import first_prefix, has_split
from pewe.layout import rebuild_result_tsv, run_name
from pewe.study.plan import StudyPlan
from pewe.trainer import TrainSettings, resolve_batch_runs
from pewe.tuning import TuneJob, initial_delta_state, keep_best, run_jobs


class Bench:
    """The backbone loaded once; per method one delta-carrying copy, and per seed its random init."""

    def __init__(self, plan: StudyPlan, base, tokenizer, device, precision):
        self.plan, self.base, self.tokenizer, self.device, self.precision = plan, base, tokenizer, device, precision
        self.method = self.model = None
        self.inits = {}
        self.batch_runs = resolve_batch_runs(plan.batch_runs, device)  # runs per lockstep group

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

    def jobs(self, task_dir, out_dir, tasks, seed, train_iters, init=None, budgets=()) -> list:
        """One TuneJob per task into ``out_dir`` (a tune_hps_singletask.py output_dir); ``init``: a folder of
        without_{task}_checkpoint files (None: the seed's random init). Tested where there is a test split."""
        p, out_dir = self.plan, Path(out_dir)
        settings = self.settings(seed, train_iters)
        out = []
        for task in tasks:
            prefix = first_prefix(task_dir, task)
            out.append(TuneJob(task, prefix, str(task_dir), out_dir / task / "runs" / run_name(prefix, p.learning_rate,
                               p.batch_size), settings, p.text, p.model, do_predict=has_split(task_dir, task, prefix, "test"),
                               train_checkpoint=init, step_budgets=tuple(budgets), overwrite=p.overwrite))
        return out

    def run(self, jobs) -> list:
        """Tune (skip / resume) and test every job, ``batch_runs`` at a time; each task's best delta is copied
        to ``{out_dir}/{task}/`` as it finishes and every output folder's result.tsv rebuilt at the end."""
        def done(job, result):
            task_out = Path(job.run_dir).parent.parent  # {out_dir}/{task}/runs/{run}
            keep_best(task_out, [result], [job.run_dir])

        results = run_jobs(self.model, self.tokenizer, jobs, self.device, lambda job: self.random_init(job.settings.seed),
                           self.batch_runs, on_done=done)
        for out_dir in dict.fromkeys(Path(job.run_dir).parents[2] for job in jobs):
            rebuild_result_tsv(out_dir)
        return results

    def tune(self, task_dir, out_dir, tasks, seed, train_iters, init=None, budgets=()) -> dict:
        """Tune (skip / resume) and test (where it has a test split) every task: {task: result}."""
        results = self.run(self.jobs(task_dir, out_dir, tasks, seed, train_iters, init, budgets))
        return dict(zip(tasks, results))
