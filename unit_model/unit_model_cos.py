"""Initial deltas for every target from the cosine similarity of weights (the original's
unit_model_cos.py): score(source, target) = mean over tensors of cos(source delta, the delta tuned on
the target from random init), weights softmax(+score / tem) over the sources other than the target.

    bash scripts/adapter.sh                      # each target tuned from random init -> runs/adapter/random
    python unit_model/unit_model_cos.py
    python tune_hps_singletask.py --do_train --do_predict --train_checkpoint runs/adapter/init/Cosine \
        --output_dir runs/adapter/from_Cosine

Writes the score matrix (result.tsv, the similarity layout, every source of a target including itself;
and scores.json) next to the averaged deltas; unit_model_others.py can reuse it. Every tunable below
can be overridden as --name=value; `--help` lists them. In the path defaults {delta} stands for that
tunable.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: run from anywhere
from pewe.model import REPO  # noqa: E402

_RUNS = REPO / "runs" / "{delta}"  # where the scripts of this repo put their outputs ({delta} = the tunable below)
_METRIC = "Cosine"  # pewe.scores: higher = closer

delta = "adapter"  # adapter, lora or prefix: the kind of every delta
tem = 0.001  # softmax temperature (the paper: 0.001)
origin_data_path = str(REPO / "data" / "fewshot")  # folder of task folders: their names are the targets
source_ckpt_path = str(_RUNS / "sources")  # {task}/checkpoint-best*.safetensors (a tune_hps_singletask.py output_dir)
random_tuned_ckpt_path = str(_RUNS / "random")  # {task}/checkpoint-best*.safetensors: each target tuned from random init
save_ckpt_path = str(_RUNS / "init" / "Cosine")  # output folder: result.tsv, without_{task}_checkpoint.safetensors, heat map
task_list = []  # sources and targets (default: the task folders that have a source checkpoint)


def main(argv=None):
    from pewe.configurator import configure
    from pewe.cli import run_cli

    a = configure(globals(), __file__, argv)
    return run_cli(_run, a)


def _run(a):
    from pewe import delta_scores as S
    from pewe import ensemble as E
    from pewe import layout as L
    from pewe import weights as W
    from pewe.scores import check_temperature

    E.check_delta_name(a.delta)
    check_temperature(a.tem)
    fields = {"delta": a.delta}
    source_dir, save_dir = E.fill_path(a.source_ckpt_path, **fields), E.fill_path(a.save_ckpt_path, **fields)
    random_dir = E.fill_path(a.random_tuned_ckpt_path, **fields)
    tasks = E.find_tasks(a.origin_data_path, source_dir, a.task_list)
    checkpoints = L.source_checkpoints(source_dir, tasks)
    tuned = L.source_checkpoints(random_dir, tasks)  # {target: its delta tuned from random init}
    scores = S.cosine_scores(tuned, checkpoints, expect_method=a.delta)
    sim = E.write_score_file(save_dir, scores, _METRIC, sources=str(source_dir), tuned=str(random_dir))
    weights = W.loo_weights(scores, tasks, W.metric_sign(_METRIC), a.tem, targets=tasks, where=str(sim))
    E.write_ensemble(save_dir, weights, checkpoints, method="softmax", expect_method=a.delta, scores=scores,
                     temperature=a.tem, metric=_METRIC, similarity=str(sim.resolve()))
    print(f"{sim}: {len(weights)} targets x {len(tasks)} sources, softmax(+cosine/{a.tem:g})")
    for target, w in weights.items():
        print(E.summary_line(target, w))
    print(f"wrote {save_dir}/without_{{task}}_checkpoint.safetensors, final_weight.txt, weights.csv, hot_pic_all.png")
    print(f"tune from them: python tune_hps_singletask.py --do_train --train_checkpoint {save_dir} ...")


if __name__ == "__main__":
    sys.exit(main())
