"""Initial deltas for every target: the leave-one-out weighted average of the source deltas, with
weights softmax(sign * score / tem) read from a similarity result.tsv (sign from --metric).

    python unit_model/unit_model_others.py --metric Loss --tem 0.1
    python tune_hps_singletask.py --do_train --do_predict --train_checkpoint runs/adapter/init/Loss \
        --output_dir runs/adapter/from_Loss

sim_path may also be a folder of block / layer files (*_result.tsv): one set of averaged deltas per
file, in {save_ckpt_path}/{file stem}/. Every tunable below can be overridden as --name=value;
`--help` lists them. In the path defaults {delta} and {metric} stand for those tunables.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: run from anywhere
from pewe.model import REPO  # noqa: E402

_RUNS = REPO / "runs" / "{delta}"  # where the scripts of this repo put their outputs ({delta} = the tunable below)

delta = "adapter"  # adapter, lora or prefix: the kind of every source delta
tem = 0.1  # softmax temperature (paper: 0.1 for Loss, Euclidean; 0.001 for Cosine, Performance)
metric = "Loss"  # similarity metric, gives the sign (pewe.scores): Loss, KL, EL2N, GraNd, Cosine, ...
origin_data_path = str(REPO / "data" / "fewshot")  # folder of task folders: their names are the targets
source_ckpt_path = str(_RUNS / "sources")  # {task}/checkpoint-best*.safetensors (a tune_hps_singletask.py output_dir)
sim_path = str(_RUNS / "similarity" / "{metric}" / "result.tsv")  # similarity result.tsv, or a folder of *_result.tsv (block / layer) files
save_ckpt_path = str(_RUNS / "init" / "{metric}")  # output folder: without_{task}_checkpoint.safetensors, final_weight.txt, heat map
task_list = []  # sources and targets (default: the task folders that have a source checkpoint)


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
    sign = W.metric_sign(a.metric)
    fields = {"delta": a.delta, "metric": a.metric}
    source_dir, save_dir = E.fill_path(a.source_ckpt_path, **fields), E.fill_path(a.save_ckpt_path, **fields)
    files = L.similarity_files(E.fill_path(a.sim_path, **fields))
    tasks = E.find_tasks(a.origin_data_path, source_dir, a.task_list)
    checkpoints = L.source_checkpoints(source_dir, tasks)
    # every file's weights first, so a bad file stops the run before anything is written
    plans = []
    for sim, sub in files:
        scores = L.read_similarity(sim)
        weights = W.loo_weights(scores, tasks, W.file_sign(sim, a.metric), a.tem, targets=tasks, where=str(sim))
        plans.append((sim, save_dir / sub if sub else save_dir, scores, weights))
    for sim, out, scores, weights in plans:
        E.write_ensemble(out, weights, checkpoints, method="softmax", expect_method=a.delta, scores=scores,
                         temperature=a.tem, metric=a.metric, similarity=str(sim.resolve()))
        print(f"{sim}: {len(weights)} targets x {len(tasks)} sources, softmax({'+' if sign > 0 else '-'}score/{a.tem:g})")
        for target, w in weights.items():
            print(E.summary_line(target, w))
        print(f"wrote {out}/without_{{task}}_checkpoint.safetensors, final_weight.txt, weights.csv, hot_pic_all.png")
    print(f"tune from them: python tune_hps_singletask.py --do_train --train_checkpoint {plans[0][1]} ...")


if __name__ == "__main__":
    sys.exit(main())
