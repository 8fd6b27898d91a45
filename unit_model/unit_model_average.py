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
origin_data_path = str(REPO / "data" / "fewshot")  # folder of task folders: their names are the targets
source_ckpt_path = str(_RUNS / "sources")  # {task}/checkpoint-best*.safetensors (a tune_hps_singletask.py output_dir)
save_ckpt_path = str(_RUNS / "init" / "{division}")  # output folder: without_{task}_checkpoint.safetensors, final_weight.txt, heat map
task_list = []  # sources and targets (default: the groups' tasks, or the task folders with a source checkpoint)
groups = []  # manual division: groups ("a b c" or a+b+c); a target averages its group's other members


def main(argv=None):
    from pewe.configurator import configure
    from pewe.cli import run_cli

    a = configure(globals(), __file__, argv)
    return run_cli(_run, a)


def _run(a):
    from pewe import ensemble as E
    from pewe import layout as L
    from pewe import weights as W

    E.check_delta_name(a.delta)
    groups = W.parse_groups(a.groups)
    division = "manual" if groups else "average"
    fields = {"delta": a.delta, "division": division}
    source_dir, save_dir = E.fill_path(a.source_ckpt_path, **fields), E.fill_path(a.save_ckpt_path, **fields)
    grouped = W.group_weights(groups) if groups else {}  # the groups themselves, checked before any file
    tasks = E.find_tasks(a.origin_data_path, source_dir, a.task_list or list(grouped))
    checkpoints = L.source_checkpoints(source_dir, tasks)
    weights = W.group_weights(groups, tasks) if groups else W.average_weights(tasks)
    E.write_ensemble(save_dir, weights, checkpoints, method=division, expect_method=a.delta,
                     groups=groups or None)
    what = f"{len(groups)} groups" if groups else "all other sources"
    print(f"{len(weights)} targets, plain average of {what} ({len(tasks)} sources)")
    for target, w in weights.items():
        print(f"  {target}: {', '.join(w)}")
    print(f"wrote {save_dir}/without_{{task}}_checkpoint.safetensors, final_weight.txt, weights.csv, hot_pic_all.png")
    print(f"tune from them: python tune_hps_singletask.py --do_train --train_checkpoint {save_dir} ...")


if __name__ == "__main__":
    sys.exit(main())
