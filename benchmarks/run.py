"""Performance figures, each a ratio of peers timed in the same run (see docs/PERFORMANCE.md).

    .venv/bin/python benchmarks/run.py --quick     # under 5 minutes on 2 cores
    .venv/bin/python benchmarks/run.py             # full sizes
    .venv/bin/python benchmarks/run.py --only steps similarity
    .venv/bin/python benchmarks/run.py --quick --only batched      # lockstep runs (pewe/stacked.py)

Prints one ``name: value`` line per figure; lines starting with ``#`` give the context (machine, load
average, absolute medians) and are not figures.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (REPO, DELTAS, Stepper, interleave, load_average, machine, median,  # noqa: E402
                    paired_ratio, random_batch, steppers, SHAPES)

import torch  # noqa: E402

# quick / full sizes of every benchmark
MODES = {
    "quick": dict(step_shapes=["mini"], step_reps=8, batch=8, in_len=128, out_len=16,
                  sim_sources=4, sim_reps=3, ens_sources=12, ens_reps=3, flops_reps=5, mm_size=1536,
                  omp_reps=2, omp_steps=2, batched_demo_updates=12, batched_test_rows=64, batched_reps=2,
                  batched_ks=[1, 2, 4, 8], batched_row_reps=3, batched_decode_rows=0),
    "full": dict(step_shapes=["mini", "small"], step_reps=20, batch=8, in_len=128, out_len=16,
                 sim_sources=12, sim_reps=3, ens_sources=32, ens_reps=5, flops_reps=10, mm_size=2048,
                 omp_reps=3, omp_steps=3, batched_demo_updates=100, batched_test_rows=500, batched_reps=3,
                 batched_ks=[1, 2, 4, 8, 12], batched_row_reps=6, batched_decode_rows=0),
}
SIM_METRICS = ["Loss", "KL", "EL2N", "Cosine_of_Logits_and_Labels"]
SIM_TARGET = "babi-qa1"
T5_BASE = dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
               num_heads=12, feed_forward_proj="gated-gelu")


def figure(name, value):
    print(f"{name}: {value:.3f}", flush=True)


def note(text):
    print(f"# {text}", flush=True)


# --------------------------------------------------------------------------- training steps

def bench_steps(cfg):
    """Step time of our LoRA over peft's LoRA, and of our adapter and prefix over our LoRA."""
    for shape in cfg["step_shapes"]:
        suffix = "" if shape == "mini" else f"_{shape}"
        batch = random_batch(SHAPES[shape]["vocab_size"], cfg["batch"], cfg["in_len"], cfg["out_len"])
        steps = steppers(shape, ["lora", "peft_lora", "adapter", "prefix", "adapter_eager"], batch)
        times = interleave(steps, cfg["step_reps"], warmup=2)
        note(f"steps on {shape} (batch {cfg['batch']}, input {cfg['in_len']}, target {cfg['out_len']}, fp32), "
             f"median s/step: " + ", ".join(f"{m} {median(t):.4f}" for m, t in times.items()))
        figure(f"lora_step_ratio_vs_peft{suffix}", paired_ratio(times, "lora", "peft_lora"))
        figure(f"adapter_step_ratio_vs_lora{suffix}", paired_ratio(times, "adapter", "lora"))
        figure(f"prefix_step_ratio_vs_lora{suffix}", paired_ratio(times, "prefix", "lora"))
        # the prefix runs through T5's eager attention; the others use what a T5 gets by default (sdpa)
        figure(f"eager_over_sdpa_adapter_step_ratio{suffix}", paired_ratio(times, "adapter_eager", "adapter"))
        del steps


# --------------------------------------------------------------------------- similarity

def make_tokenizer():
    """A 4,000-piece unigram tokenizer (+100 sentinels) trained on a few bundled tasks (seconds)."""
    from pewe.backbone import train_tokenizer
    from pewe.data import read_tsv, source_text

    texts = []
    for task in ("babi-qa1", "babi-qa6", "csqa2", "numer_sense"):
        for ex in read_tsv(REPO / "data" / "fewshot" / task / f"{task}_64_42_train.tsv"):
            texts += [source_text(task, ex.input), *ex.answers]
    return train_tokenizer(texts, vocab_size=4000)


def random_delta(model, seed):
    """Random values for every delta tensor of ``model`` (as a trained delta would have)."""
    import delta_modules as dm

    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(p.shape, generator=g) * 0.05 for n, p in dm.delta_named_parameters(model)}


def write_similarity_fixture(root: Path, n_sources: int):
    """backbone/ (mini shape), sources/{task}/checkpoint-best.safetensors, reference/{target}/...,
    and for the original's way the same deltas as full torch.save'd checkpoints in pt/ (delta +
    an optimizer state of the delta's size + args, as the original's checkpoint-best.pt)."""
    import delta_modules as dm
    from pewe.backbone import build_model, save_backbone, small_config

    tok = make_tokenizer()
    save_backbone(build_model(small_config(tok), seed=0), tok, root / "backbone")
    config = dm.DeltaConfig(**DELTAS["adapter"])
    shell = dm.attach_delta(build_model(small_config(tok), seed=0), config)
    names = [f"source{i:02d}" for i in range(n_sources)] + ["reference"]
    for i, name in enumerate(names):
        delta = random_delta(shell, seed=i)
        folder = "reference/" + SIM_TARGET if name == "reference" else f"sources/{name}"
        dm.save_delta(root / folder / "checkpoint-best.safetensors", delta, config, task=name)
        full = {"args": {"tune_method": "adapter", "adapter_size": 12}, "adapter": delta,
                "optimizer": {k: v.abs() for k, v in delta.items()}, "current_state": {"num_updates": 1000}}
        (root / "pt").mkdir(exist_ok=True)
        torch.save(full, root / "pt" / f"{name}.pt")
    return names[:-1]


def sim_options():
    from pewe.similarity import ScoreOptions

    return ScoreOptions(num_batches=0, batch_size=32, quiet=True)  # every dev batch (64 rows: 2 batches)


def similarity_ours(root: Path, sources):
    """Our engine: the backbone loaded once, the reference outputs once, per source one delta swap and
    one forward per batch for all four scores."""
    from pewe.model import load_backbone
    from pewe.similarity import SimilarityEngine, attach_from_sources

    model, tok = load_backbone(root / "backbone")
    ckpts = {s: root / "sources" / s / "checkpoint-best.safetensors" for s in sources}
    attach_from_sources(model, ckpts)
    engine = SimilarityEngine(model, tok, torch.device("cpu"), sim_options())
    refs = {SIM_TARGET: root / "reference" / SIM_TARGET / "checkpoint-best.safetensors"}
    res = engine.score_tasks([SIM_TARGET], REPO / "data" / "fewshot", ckpts, SIM_METRICS, refs)
    return {m: res[m][""][SIM_TARGET] for m in SIM_METRICS}


@torch.no_grad()
def _label_logits(model, batch):
    model.eval()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    logits = model(**inputs, use_cache=False).logits.float()
    mask = inputs["labels"] != -100
    return logits[mask], inputs["labels"][mask]


def similarity_original_way(root: Path, sources):
    """The original's way: one script per score; each builds its model from the backbone and reads the
    target's data, then for every source ``torch.load``s the full checkpoint and runs its forwards
    (KL also loads the target's reference checkpoint once)."""
    import delta_modules as dm
    from pewe.data import batches
    from pewe.model import load_backbone
    from pewe.scores import TokenOutputs, score_spec
    from pewe.similarity import load_dev_rows

    out = {}
    for metric in SIM_METRICS:
        spec = score_spec(metric)
        model, tok = load_backbone(root / "backbone")
        dm.attach_delta(model, dm.DeltaConfig(**DELTAS["adapter"]))
        rows = load_dev_rows(REPO / "data" / "fewshot", SIM_TARGET, tok, sim_options())
        dev = list(batches(rows, 32, tok.pad_token_id))
        refs = None
        if spec.needs_reference:
            dm.load_delta_state(model, torch.load(root / "pt" / "reference.pt", weights_only=True)["adapter"])
            refs = [_label_logits(model, b)[0] for b in dev]
        out[metric] = {}
        for s in sources:
            dm.load_delta_state(model, torch.load(root / "pt" / f"{s}.pt", weights_only=True)["adapter"])
            total, n = 0.0, 0
            for i, b in enumerate(dev):
                logits, labels = _label_logits(model, b)
                total += float(spec.fn(TokenOutputs(logits, labels, refs[i] if refs else None)))
                n += len(labels)
            out[metric][s] = total / n if spec.reduction == "mean" else total
    return out


def bench_similarity(cfg):
    with tempfile.TemporaryDirectory(prefix="pewe-bench-sim-") as tmp:
        root = Path(tmp)
        sources = write_similarity_fixture(root, cfg["sim_sources"])
        ours, theirs = similarity_ours(root, sources), similarity_original_way(root, sources)
        for m in SIM_METRICS:  # both ways must compute the same numbers, or the timing means nothing
            for s in sources:
                assert math.isclose(ours[m][s], theirs[m][s], rel_tol=1e-4, abs_tol=1e-5), (m, s, ours[m][s], theirs[m][s])
        times = interleave({"ours": lambda: similarity_ours(root, sources),
                            "original_way": lambda: similarity_original_way(root, sources)},
                           cfg["sim_reps"], warmup=0)
    note(f"similarity: {len(sources)} sources x 1 target ({SIM_TARGET} dev, 64 rows, 2 batches), "
         f"{len(SIM_METRICS)} scores, mini backbone; median s: ours {median(times['ours']):.2f}, "
         f"original way {median(times['original_way']):.2f}")
    figure("similarity_onepass_speedup", paired_ratio(times, "original_way", "ours"))


# --------------------------------------------------------------------------- ensembling

def t5_base_adapter_shapes() -> dict:
    """{name: shape} of the paper's adapter on T5-base (1,105,920 parameters), from a meta-device model."""
    import delta_modules as dm
    from transformers import T5Config, T5ForConditionalGeneration

    with torch.device("meta"):
        model = T5ForConditionalGeneration(T5Config(**T5_BASE))
    dm.attach_delta(model, dm.DeltaConfig(**DELTAS["adapter"]))
    shapes = {n: tuple(p.shape) for n, p in dm.delta_named_parameters(model)}
    assert sum(math.prod(s) for s in shapes.values()) == 1_105_920
    return shapes


def write_ensemble_fixture(root: Path, n: int):
    """n T5-base-sized adapter checkpoints and leave-one-out softmax weights over random scores."""
    import delta_modules as dm
    from pewe.weights import loo_weights

    shapes = t5_base_adapter_shapes()
    config = dm.DeltaConfig(**DELTAS["adapter"])
    tasks = [f"task{i:02d}" for i in range(n)]
    g = torch.Generator().manual_seed(0)
    for t in tasks:
        dm.save_delta(root / "src" / t / "checkpoint-best.safetensors",
                      {k: torch.randn(s, generator=g) * 0.02 for k, s in shapes.items()}, config, task=t)
    rng = random.Random(0)
    scores = {t: {s: rng.uniform(0.5, 3.0) for s in tasks} for t in tasks}
    weights = loo_weights(scores, tasks, -1, 0.1)
    (root / "weights.json").write_text(json.dumps(weights))


def _vm_kb(field) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def ensemble_child(method: str, root: Path):
    """Run one averaging method in this (fresh) process; print its time and memory as JSON."""
    import delta_modules as dm
    from pewe import averaging as A
    from pewe.layout import init_path

    weights = json.loads((root / "weights.json").read_text())
    ckpts = {t: root / "src" / t / "checkpoint-best.safetensors" for t in weights}
    out = root / f"out-{method}"
    baseline = _vm_kb("VmRSS")
    t0 = time.perf_counter()
    if method == "one_pass":  # the library as write_ensemble runs it now
        A.write_averages(out, weights, ckpts, meta={"method": "softmax"}, expect_method="adapter")
    elif method == "per_target":  # the library before the fix: a check pass, then every source re-read per target
        A.check_sources(ckpts.values(), "adapter")
        for target, w in weights.items():
            tensors, config = A.weighted_average([(ckpts[s], x) for s, x in w.items()], "adapter")
            dm.save_delta(init_path(out, target), tensors, config, task=target, weights=w)
    elif method == "deepcopy":  # the original's way: every source in memory, deep-copied per target
        tasks = list(ckpts)
        states = [dm.read_delta(ckpts[t])[0] for t in tasks]
        config = dm.read_delta(ckpts[tasks[0]])[1]
        for i, target in enumerate(tasks):
            others = copy.deepcopy(states)
            others.pop(i)
            w = [weights[target][s] for s in tasks if s != target]
            avg = {}
            for k, v in states[0].items():
                acc = v - v
                for j, state in enumerate(others):
                    acc += state[k] * w[j]
                avg[k] = acc
            dm.save_delta(init_path(out, target), avg, config, task=target)
    else:
        raise SystemExit(f"unknown ensemble method {method}")
    seconds = time.perf_counter() - t0
    print(json.dumps({"seconds": seconds, "peak_kb": _vm_kb("VmHWM"), "baseline_kb": baseline}))


def run_child(method, root) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--ensemble-child", method, str(root)],
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ensemble_methods():
    return ["one_pass", "per_target", "deepcopy"]


def bench_ensemble(cfg):
    """Leave-one-out averages of N T5-base adapters for N targets, each method in its own process:
    wall time of the averaging and writing, and peak RSS (VmHWM)."""
    methods = ensemble_methods()
    ours = methods[0]
    with tempfile.TemporaryDirectory(prefix="pewe-bench-ens-") as tmp:
        root = Path(tmp)
        write_ensemble_fixture(root, cfg["ens_sources"])
        runs = {m: [] for m in methods}
        for r in range(cfg["ens_reps"]):
            for m in (methods if r % 2 == 0 else methods[::-1]):
                runs[m].append(run_child(m, root))
        check_same_outputs(root, methods)
    times = {m: [x["seconds"] for x in rs] for m, rs in runs.items()}
    peak = {m: median(x["peak_kb"] for x in rs) / 1024 for m, rs in runs.items()}
    above = {m: median(x["peak_kb"] - x["baseline_kb"] for x in rs) / 1024 for m, rs in runs.items()}
    n = cfg["ens_sources"]
    note(f"ensemble: {n} sources x {n} targets, T5-base adapters (1,105,920 float32 each); median s: "
         + ", ".join(f"{m} {median(t):.2f}" for m, t in times.items()))
    note("peak RSS MiB (above the RSS after imports): "
         + ", ".join(f"{m} {peak[m]:.0f} ({above[m]:.0f})" for m in methods))
    figure("ensemble_speedup", paired_ratio(times, "deepcopy", ours))
    figure("ensemble_peak_mem_ratio", peak[ours] / peak["deepcopy"])
    figure("ensemble_peak_mem_above_baseline_ratio", above[ours] / above["deepcopy"])
    if ours != "per_target":
        figure("ensemble_speedup_vs_previous_streaming", paired_ratio(times, "per_target", ours))
        figure("ensemble_peak_mem_ratio_vs_previous_streaming", peak[ours] / peak["per_target"])


def check_same_outputs(root: Path, methods):
    """Every method wrote the same averages (up to float32 summation order)."""
    import delta_modules as dm

    ref = root / f"out-{methods[0]}"
    for path in sorted(ref.glob("*.safetensors")):
        a = dm.read_delta(path)[0]
        for m in methods[1:]:
            b = dm.read_delta(root / f"out-{m}" / path.name)[0]
            assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a), (m, path.name)


# --------------------------------------------------------------------------- FLOPs

def matmul_peak(size: int, dtype, reps: int) -> float:
    """FLOP/s of the fastest of ``reps`` (size x size) @ (size x size) products."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    torch.matmul(a, b)
    best = min(_timed(lambda: torch.matmul(a, b)) for _ in range(reps))
    return 2 * size ** 3 / best


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def step_flops(stepper: Stepper) -> int:
    """Matmul FLOPs of one forward + backward (what FlopCounterMode counts; the optimizer and
    elementwise work are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        stepper.loss_backward()
    stepper.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def bench_flops(cfg):
    """Achieved FLOP/s of an adapter step (fp32 and bf16 autocast) over the measured matmul peak."""
    shape = "mini"
    batch = random_batch(SHAPES[shape]["vocab_size"], cfg["batch"], cfg["in_len"], cfg["out_len"])
    steps = {p: steppers(shape, ["adapter"], batch, precision=p)["adapter"] for p in ("fp32", "bf16")}
    flops = step_flops(steps["fp32"])
    times = interleave(steps, cfg["flops_reps"], warmup=2)
    peak = {"fp32": matmul_peak(cfg["mm_size"], torch.float32, cfg["flops_reps"]),
            "bf16": matmul_peak(cfg["mm_size"], torch.bfloat16, cfg["flops_reps"])}
    achieved = {p: flops / median(times[p]) for p in steps}
    note(f"adapter step on {shape}: {flops / 1e9:.2f} GFLOP (matmuls, fwd+bwd); median s/step "
         + ", ".join(f"{p} {median(t):.4f}" for p, t in times.items())
         + f"; achieved GFLOP/s fp32 {achieved['fp32'] / 1e9:.1f}, bf16 {achieved['bf16'] / 1e9:.1f}; "
         f"matmul peak ({cfg['mm_size']}^3) GFLOP/s fp32 {peak['fp32'] / 1e9:.1f}, bf16 {peak['bf16'] / 1e9:.1f}")
    figure("train_step_flops_fraction", achieved["fp32"] / peak["fp32"])
    figure("train_step_flops_fraction_bf16", achieved["bf16"] / peak["bf16"])
    figure("bf16_step_speedup", paired_ratio(times, "fp32", "bf16"))


# --------------------------------------------------------------------------- lockstep runs

def demo_target_jobs(root: Path, base, config, cfg, tag):
    """The earlier demo's target step (adapter, 100 updates) for one target, babi-qa1: 2 initialisations
    (delta files, as the average and Loss inits are) x 2 seeds = the 4 runs a lockstep group holds.
    quick: 12 updates, budgets 0/4/8, a validation at 12, 64 test rows; full: the demo's 100 updates,
    budgets 0/25/50, a validation at 100, the 500 test rows."""
    import delta_modules as dm
    from pewe.data import TextOptions, read_tsv
    from pewe.trainer import TrainSettings
    from pewe.tuning import TuneJob, initial_delta_state

    iters, budgets = (100, (0, 25, 50, 100)) if cfg["batched_demo_updates"] == 100 else \
        (cfg["batched_demo_updates"], tuple(range(0, cfg["batched_demo_updates"] + 1, cfg["batched_demo_updates"] // 3)))
    tasks = root / "tasks"
    if not (tasks / SIM_TARGET).is_dir():
        src = REPO / "data" / "fewshot" / SIM_TARGET
        for split in ("train", "dev", "test"):
            rows = read_tsv(src / f"{SIM_TARGET}_64_42_{split}.tsv")[:cfg["batched_test_rows"] if split == "test" else None]
            (tasks / SIM_TARGET).mkdir(parents=True, exist_ok=True)
            (tasks / SIM_TARGET / f"{SIM_TARGET}_64_42_{split}.tsv").write_text(
                "".join(f"{ex.input}\t{chr(9).join(ex.answers)}\n" for ex in rows))
        for i, init in enumerate(("average", "Loss")):  # stand-ins for the two initial deltas
            dm.save_delta(root / "init" / init / f"without_{SIM_TARGET}_checkpoint.safetensors",
                          initial_delta_state(base, config, 100 + i), config)
    jobs = []
    for init in ("average", "Loss"):
        for seed in (42, 43):
            s = TrainSettings(learning_rate=5e-4, batch_size=8, train_iters=iters, valid_interval=iters,
                              log_interval=iters, early_stop=0, predict_batch_size=80, max_output_length=8, seed=seed,
                              progress=False)
            jobs.append(TuneJob(SIM_TARGET, f"{SIM_TARGET}_64_42", str(tasks), root / tag / init / str(seed), s,
                                TextOptions(512, 8), "t5-mini", train_checkpoint=str(root / "init" / init),
                                step_budgets=budgets))
    return jobs


def bench_batched(cfg):
    """The demo's target step with its runs in lockstep (pewe.trainer.train_runs, --batch_runs 4)
    over one at a time, timed in the same process, interleaved; then the cost per row of one
    training update and of greedy decoding against the number of runs K sharing the forward."""
    import shutil

    import delta_modules as dm
    from pewe.data import load_split, TextOptions, collate
    from pewe.model import DEFAULT_MODEL, load_backbone
    from pewe.stacked import StackedDeltas
    from pewe.trainer import Run, TrainSettings, _OwnDelta, _StackedRuns, predict, predict_runs
    from pewe.tuning import initial_delta_state, run_jobs

    base, tok = load_backbone(DEFAULT_MODEL)
    model = dm.attach_delta(copy.deepcopy(base), dm.DeltaConfig("adapter"))  # the demo's delta
    with tempfile.TemporaryDirectory(prefix="pewe-bench-batched-") as tmp:
        root = Path(tmp)
        count = [0]

        def step(batch_runs):
            count[0] += 1
            tag = f"rep{count[0]}"
            jobs = demo_target_jobs(root, base, model.delta_config, cfg, tag)
            results = run_jobs(model, tok, jobs, torch.device("cpu"), lambda job: initial_delta_state(
                base, model.delta_config, job.settings.seed), batch_runs)
            assert all(r["test_score"] is not None for r in results)
            shutil.rmtree(root / tag)

        times = interleave({"batched": lambda: step(4), "one_at_a_time": lambda: step(1)}, cfg["batched_reps"], warmup=0)
        jobs = demo_target_jobs(root, base, model.delta_config, cfg, "probe")
    s0 = jobs[0].settings
    note(f"demo target step, {SIM_TARGET}: 4 runs (2 inits x 2 seeds), {s0.train_iters} updates of 8 rows, dev decoded "
         f"at {', '.join(map(str, jobs[0].step_budgets))}, {cfg['batched_test_rows']} test rows; median s: "
         f"batched {median(times['batched']):.1f}, one at a time {median(times['one_at_a_time']):.1f}")
    figure("study_targets_batched_speedup", paired_ratio(times, "one_at_a_time", "batched"))

    # per-row cost against K: one update of K runs x 8 rows; greedy decoding of K runs x 64 dev rows
    text = TextOptions(512, 8)
    train_rows = load_split(REPO / "data" / "fewshot", SIM_TARGET, f"{SIM_TARGET}_64_42", "train", tok, text, True)
    dev_rows = load_split(REPO / "data" / "fewshot", SIM_TARGET, f"{SIM_TARGET}_64_42", "dev", tok, text, False)
    ks = cfg["batched_ks"]
    settings = TrainSettings(batch_size=8, progress=False)
    groups, stacks = {}, {}
    for k in ks:
        runs = [Run(train_rows, dev_rows, "EM", settings, Path(f"/nonexistent/{i}")) for i in range(k)]
        groups[k] = _OwnDelta(model, runs) if k == 1 else _StackedRuns(model, runs)
        stacks[k] = StackedDeltas(model, k)

    def train_update(k):
        model.train()
        group = groups[k]
        parts = [(j, collate(train_rows, list(range(8 * (j % 8), 8 * (j % 8) + 8)), tok.pad_token_id), 1.0)
                 for j in range(k)]
        group.forward_backward(parts, torch.device("cpu"), "fp32", tok.pad_token_id)
        group.step(list(range(k)), 0.1)

    def decode(k):
        if k == 1:
            predict(model, tok, dev_rows, 80, 8, torch.device("cpu"))
        else:
            predict_runs(model, stacks[k], tok, [(j, dev_rows) for j in range(k)], 80, 8, torch.device("cpu"),
                         max_rows=cfg["batched_decode_rows"] or 80 * k)

    train_t = interleave({k: (lambda k=k: train_update(k)) for k in ks}, cfg["batched_row_reps"], warmup=1)
    decode_t = interleave({k: (lambda k=k: decode(k)) for k in ks}, max(2, cfg["batched_row_reps"] // 2), warmup=1)
    rows_dev = len(dev_rows.input_ids)
    note("train update, ms per row (8 rows per run): " + ", ".join(
        f"K={k} {1000 * median(train_t[k]) / (8 * k):.1f}" for k in ks))
    note(f"greedy decoding of {rows_dev} dev rows per run, ms per row: " + ", ".join(
        f"K={k} {1000 * median(decode_t[k]) / (rows_dev * k):.1f}" for k in ks))
    for k in ks[1:]:  # per-row cost at K=1 over per-row cost at K
        figure(f"batched_train_row_speedup_k{k}", statistics.median(
            (a / 8) / (b / (8 * k)) for a, b in zip(train_t[1], train_t[k])))
        figure(f"batched_decode_row_speedup_k{k}", statistics.median(
            (a / rows_dev) / (b / (rows_dev * k)) for a, b in zip(decode_t[1], decode_t[k])))


# --------------------------------------------------------------------------- OpenMP wait policy

def omp_child(steps: int):
    """Median s/step of a mini adapter step in this process (its OpenMP policy fixed at start)."""
    batch = random_batch(SHAPES["mini"]["vocab_size"], 8, 128, 16)
    step = steppers("mini", ["adapter"], batch)["adapter"]
    step()  # warm-up
    print(json.dumps({"seconds": median(_timed(step) for _ in range(steps)),
                      "policy": os.environ.get("OMP_WAIT_POLICY", "default")}))


def bench_omp(cfg):
    """The same adapter step in fresh processes with libgomp's default wait policy (spin, then sleep),
    with OMP_WAIT_POLICY=PASSIVE (the entry points' default, pewe/__init__.py) and with ACTIVE (the
    override for dedicated cores): what a shared, loaded CPU does to each."""
    envs = {"default": {**os.environ, "PEWE_BENCH_OMP_DEFAULT": "1"},
            "passive": {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"},
            "active": {**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}}
    envs["default"].pop("OMP_WAIT_POLICY", None)
    times = {k: [] for k in envs}
    for r in range(cfg["omp_reps"]):
        for k in (list(envs) if r % 2 == 0 else list(envs)[::-1]):
            proc = subprocess.run([sys.executable, __file__, "--omp-child", str(cfg["omp_steps"])], env=envs[k],
                                  capture_output=True, text=True, check=True)
            times[k].append(json.loads(proc.stdout.strip().splitlines()[-1])["seconds"])
    note(f"OpenMP wait policy, mini adapter step, {torch.get_num_threads()} threads; median s/step: "
         + ", ".join(f"{k} {median(t):.3f}" for k, t in times.items()))
    figure("omp_default_over_passive_step_ratio", paired_ratio(times, "default", "passive"))
    figure("omp_active_over_passive_step_ratio", paired_ratio(times, "active", "passive"))


# --------------------------------------------------------------------------- main

BENCHMARKS = {"omp": bench_omp, "steps": bench_steps, "similarity": bench_similarity, "ensemble": bench_ensemble,
              "flops": bench_flops, "batched": bench_batched}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repetitions (< 5 min on 2 cores)")
    ap.add_argument("--only", nargs="*", choices=list(BENCHMARKS), help="run only these benchmarks")
    ap.add_argument("--ensemble-child", nargs=2, metavar=("METHOD", "DIR"), help=argparse.SUPPRESS)
    ap.add_argument("--omp-child", type=int, metavar="STEPS", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.omp_child:
        return omp_child(a.omp_child)
    if a.ensemble_child:
        return ensemble_child(a.ensemble_child[0], Path(a.ensemble_child[1]))
    cfg = MODES["quick" if a.quick else "full"]
    info = machine()
    note(f"mode {'quick' if a.quick else 'full'}; cpu {info['cpu']}, {info['cores']} cores, torch {info['torch']}, "
         f"{info['threads']} threads, OMP_WAIT_POLICY={info['omp_wait_policy']}")
    t0 = time.time()
    for name in (a.only or BENCHMARKS):
        note(f"{name}: load average before {load_average()}")
        BENCHMARKS[name](cfg)
    note(f"load average at the end {load_average()}; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
