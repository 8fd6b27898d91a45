"""The averaging baselines: for every target, the plain average of all other source deltas, or, given
groups (the manual division), the plain average of the other members of the target's group.

    python unit_model/unit_model_average.py
    python unit_model/unit_model_average.py --groups "babi-qa1 babi-qa2 babi-qa3" "csqa2 piqa"
    python tune_hps_singletask.py --do_train --do_predict --train_checkpoint runs/adapter/init/average \
        --output_dir runs/adapter/from_average

Every tunable below can be overridden as --name=value; `--help` lists them. In the path defaults
{delta} stands for that tunable and {division} for "average" (no groups) or "manual" (groups).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: run from anywhere
from pewe.model import REPO  # noqa: E402

_RUNS = REPO / "runs" / "{delta}"  # where the scripts of this repo put their outputs ({delta} = the tunable below)

delta = "adapter"  # adapter, lora or prefix: the kind of every source delta
source_ckpt_path = str(_RUNS / "sources")  # {source}/checkpoint-best*.safetensors (a tune_hps_singletask.py output_dir)
save_ckpt_path = str(_RUNS / "init" / "{division}")  # output folder: without_{task}_checkpoint.safetensors, final_weight.txt, heat map
targets = []  # targets (default: every source, leaving itself out; or, with groups, every group member)
task_list = []  # only these sources and targets (the original's TASK_LIST; default: every source delta found)
groups = []  # manual division: groups ("a b c" or a+b+c); a target averages its group's other members


def main(argv=None):
    from pewe.configurator import configure
    from pewe.cli import run_cli

    a = configure(globals(), __file__, argv)
    return run_cli(_run, a)


def _run(a):
    from pewe import ensemble as E
    from pewe import weights as W

    E.check_delta_name(a.delta)
    groups = W.parse_groups(a.groups)
    division = "manual" if groups else "average"
    fields = {"delta": a.delta, "division": division}
    source_dir, save_dir = E.fill_path(a.source_ckpt_path, **fields), E.fill_path(a.save_ckpt_path, **fields)
    members = [t for g in groups for t in g]
    if groups:
        W.group_weights(groups)  # the groups themselves (sizes, overlaps), checked before any file is read
    # every group member must have a source delta, unless it is named as a target outside the pool
    pool = E.select_pool(source_dir, [t for t in members if t not in a.targets], a.task_list)
    targets = E.select_targets(a.targets, members or pool, a.task_list)
    if groups:
        weights = W.group_weights(groups, pool, targets)
        weights = {t: weights[t] for t in targets if t in weights}
    else:
        weights = W.average_weights(pool, targets)
    E.write_ensemble(save_dir, weights, pool, method=division, expect_method=a.delta, groups=groups or None)
    what = f"{len(groups)} groups" if groups else "all other sources"
    E.report_written(save_dir, weights, f"{len(weights)} targets, plain average of {what} ({len(pool)} sources)")


if __name__ == "__main__":
    sys.exit(main())
