"""Initial deltas for every target by one of the peers' ways of combining the source deltas instead of
the paper's weighted average: LoraHub's search, the merges of mergekit and peft (task arithmetic,
TIES, DARE), the exact LoRA product, AdapterSoup's soup of the k best sources.

    python unit_model/unit_model_merge.py --method ties --metric Loss --delta lora
    python unit_model/unit_model_merge.py --method lorahub --delta adapter
    python tune_hps_singletask.py --do_train --do_predict --train_checkpoint runs/lora/init/ties=Loss \
        --output_dir runs/lora/from_ties=Loss

It writes what unit_model_others.py writes, in {save_ckpt_path}: without_{task}_checkpoint.safetensors
(+ .json: the weights that fed the combination, its parameters, its compute time; for LoRA the
relative error of the paper's rule against the exact product at these weights), final_weight.txt,
weights.csv and the heat map hot_pic_all.png.

Methods (what each computes and why: pewe/merges.py, pewe/lorahub.py, pewe/inits.py):
  task_arithmetic, ties, dare_linear, dare_ties  mergekit's rules; LoRA in deltaW = scale B A space,
                       back to rank r by SVD; adapters and prefix on the raw parameters
  lora_exact           sum_i w_i scale B_i A_i back to rank r (LoRA only)
  topk                 the plain average of the topk_k best sources by --metric (needs --metric)
  lorahub              LoraHub: NGOpt over one weight per source from 0, on each target's few-shot
                       train split (loads the backbone: model, tokenizer_path)
  lorahub_from         the same search started from --metric's softmax weights (needs --metric)
--metric "" gives the merges uniform weights 1/n; a metric gives softmax(sign * score / tem) read
from sim_path, as unit_model_others.py. Every tunable below can be overridden as --name=value;
`--help` lists them. In the path defaults {delta}, {metric} and {init} (the method, or
method=metric) stand for those values.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repo root: run from anywhere
from pewe.model import DEFAULT_MODEL, REPO  # noqa: E402

_RUNS = REPO / "runs" / "{delta}"  # where the scripts of this repo put their outputs ({delta} = the tunable below)

delta = "adapter"  # adapter, lora or prefix: the kind of every source delta
method = "ties"  # task_arithmetic, ties, dare_linear, dare_ties, lora_exact, topk, lorahub or lorahub_from
metric = ""  # score whose softmax weights feed the combination (topk ranks by it); "": uniform 1/n (lorahub: from 0)
tem = 0.1  # softmax temperature of the metric's weights (paper: 0.1 for Loss, Euclidean; 0.001 for Cosine, Performance)
seed = 42  # seeds DARE's random drops and LoraHub's search: the same seed gives the same deltas
merge_lambda = 1.0  # mergekit's lambda: the merged task vector's scale (task_arithmetic, ties, dare_*)
ties_density = 0.2  # ties: share of each delta's entries kept, the largest |x| (peft's guide: 0.2)
dare_drop = 0.8  # dare_*: probability of dropping an entry, kept ones x 1/(1 - p) (peft's guide: density 0.2)
topk_k = 3  # topk: how many of the best sources are averaged
lorahub_budget = 40  # lorahub: loss evaluations of the search (LoraHub: 40)
lorahub_bound = 1.5  # lorahub: each weight in [-bound, bound] (LoraHub: 1.5)
lorahub_l1 = 0.05  # lorahub: coefficient of mean |w| added to the loss (LoraHub: 0.05)
lorahub_loss = "mean"  # lorahub: mean (token-mean loss of the split) or lorahub (sum of batch means / examples)
lorahub_batch_size = 16  # lorahub: rows per forward of the loss
origin_data_path = str(REPO / "data" / "fewshot")  # folder of task folders: their names are the targets (lorahub: their train splits)
source_ckpt_path = str(_RUNS / "sources")  # {task}/checkpoint-best*.safetensors (a tune_hps_singletask.py output_dir)
sim_path = str(_RUNS / "similarity" / "{metric}" / "result.tsv")  # similarity result.tsv of the metric (read only with a metric)
save_ckpt_path = str(_RUNS / "init" / "{init}")  # output folder: without_{task}_checkpoint.safetensors, final_weight.txt, heat map
task_list = []  # sources and targets (default: the task folders that have a source checkpoint)
model = str(DEFAULT_MODEL)  # lorahub: backbone, a Hugging Face T5 name or a local folder
tokenizer_path = str(DEFAULT_MODEL)  # lorahub: tokenizer, a Hugging Face name or a local folder
max_input_length = 512  # lorahub: input tokens kept
max_output_length = 64  # lorahub: answer tokens kept
truncation_side = "auto"  # lorahub: auto (left for bAbI, right otherwise), left or right
device = "auto"  # lorahub: auto (cuda if available), cpu or cuda
precision = "auto"  # lorahub: auto (bf16 autocast where the hardware has it), fp32 or bf16
progress = True  # a progress bar over the targets


def main(argv=None):
    from pewe.configurator import configure
    from pewe.cli import run_cli

    a = configure(globals(), __file__, argv)
    return run_cli(_run, a)


def merge_options(a) -> list:
    """The tunables above as pewe.inits.parse_merge_options items."""
    names = ("ties_density", "dare_drop", "topk_k", "lorahub_budget", "lorahub_bound", "lorahub_l1", "lorahub_loss",
             "lorahub_batch_size")
    return [f"lambda={a.merge_lambda}", *(f"{n}={getattr(a, n)}" for n in names)]


def _run(a):
    import contextlib
    import time

    from tqdm.auto import tqdm

    from pewe import ensemble as E
    from pewe import layout as L
    from pewe import weights as W
    from pewe.averaging import read_sources, write_averages, write_merges
    from pewe.inits import InitInputs, canonical_init_name, init_spec, parse_merge_options
    from pewe.merges import MergeError, lora_product_error, merge_rng
    from pewe.scores import check_temperature
    from pewe.weight_reports import write_weight_reports

    E.check_delta_name(a.delta)
    name = canonical_init_name(f"{a.method}={a.metric}" if a.metric else a.method)
    spec = init_spec(name, parse_merge_options(merge_options(a)))
    fields = {"delta": a.delta, "metric": spec.score or "", "init": name}
    source_dir, save_dir = E.fill_path(a.source_ckpt_path, **fields), E.fill_path(a.save_ckpt_path, **fields)
    tasks = E.find_tasks(a.origin_data_path, source_dir, a.task_list)
    checkpoints = L.source_checkpoints(source_dir, tasks)
    scores, sim = {}, None
    if spec.score is not None:
        check_temperature(a.tem)
        files = L.similarity_files(E.fill_path(a.sim_path, **fields))
        if len(files) != 1 or files[0][1]:
            raise E.EnsembleError(f"{E.fill_path(a.sim_path, **fields)}: give one result.tsv, not a folder of block files")
        sim = files[0][0]
        scores = L.read_similarity(sim)
        # the same checks as unit_model_others.py, naming the file: every target scores every other source
        W.loo_weights(scores, tasks, W.file_sign(sim, spec.score), a.tem, targets=tasks, where=str(sim))
    # every source checked before any work; all of them in memory (the merges and LoraHub read them together)
    deltas, config = read_sources([checkpoints[t] for t in tasks], a.delta)
    deltas = dict(zip(tasks, deltas))
    if spec.lora_only and config.method != "lora":
        raise MergeError(f"{name}: for LoRA deltas only, not {config.method}")
    loss_for = _train_losses(a, spec, config, deltas) if spec.needs_loss else None

    weights, metas = {}, {}
    for target in tqdm(tasks, desc=name, disable=not a.progress):
        start = time.perf_counter()
        loss = loss_for(target) if loss_for is not None else contextlib.nullcontext(None)
        with loss as loss_of:
            x = InitInputs(target, tuple(tasks), {}, {spec.score: scores[target]} if spec.score else {},
                           {spec.score: (a.tem, a.tem)} if spec.score else {}, loss_of=loss_of, seed=a.seed)
            w, meta = spec.weights(x)
        weights[target], metas[target] = w, {**meta, "compute_seconds": time.perf_counter() - start,
                                             "seed": a.seed, "similarity": str(sim.resolve()) if sim else None}
        if config.method == "lora":
            metas[target]["lora_product_error"] = lora_product_error([deltas[s] for s in w], [float(w[s]) for s in w],
                                                                     config)
    if spec.combine is None:
        write_averages(save_dir, weights, checkpoints, meta=metas.get, expect_method=a.delta)
    else:
        write_merges(save_dir, weights, checkpoints, metas.get, spec.combine, lambda t: merge_rng(a.seed, t),
                     expect_method=a.delta)
    title = f"{name}" + (f", T = {a.tem:g}" if spec.score else "")
    write_weight_reports(save_dir, weights, tasks, scores or None, title)
    print(f"{name}: {len(weights)} targets x {len(tasks)} sources, {config.method} deltas"
          + (f", weights from {sim}" if sim else ""))
    for target, w in weights.items():
        print(E.summary_line(target, w))
    print(f"wrote {save_dir}/without_{{task}}_checkpoint.safetensors, final_weight.txt, weights.csv, hot_pic_all.png")
    print(f"tune from them: python tune_hps_singletask.py --do_train --train_checkpoint {save_dir} ...")


def _train_losses(a, spec, config, deltas: dict):
    """For LoraHub: target -> a TrainSplitLoss over the other sources on the target's train split."""
    from delta_modules import attach_delta
    from pewe.data import TextOptions, first_prefix, load_split
    from pewe.lorahub import TrainSplitLoss
    from pewe.model import load_backbone, pick_device, resolve_precision

    device = pick_device(a.device)
    precision = resolve_precision(a.precision, device)
    model, tokenizer = load_backbone(a.model, a.tokenizer_path, device)
    attach_delta(model, config)
    text = TextOptions(a.max_input_length, a.max_output_length, a.truncation_side)

    def loss_for(target):
        rows = load_split(a.origin_data_path, target, first_prefix(a.origin_data_path, target, warn=True), "train",
                          tokenizer, text, True)
        others = {s: d for s, d in deltas.items() if s != target}
        return TrainSplitLoss(model, tokenizer, rows, others, device, precision, batch_size=spec.params["lorahub_batch_size"],
                              mode=spec.params["lorahub_loss"])

    return loss_for


if __name__ == "__main__":
    sys.exit(main())
