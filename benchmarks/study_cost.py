"""An estimate (not a measurement) of the paper-scale study's jobs, GPU-hours and disk.

    .venv/bin/python benchmarks/study_cost.py            # about a minute on a CPU (builds a T5-base shape)
    .venv/bin/python benchmarks/study_cost.py --utilisation 0.2 --tokens_per_example 160

Compute: FLOPs from counts of tokens, 6 N per training token and 2 N per inference token (N = the
backbone's parameters; with the base frozen a step needs about 4 N, and each token only passes the
encoder or the decoder, so this leans high), divided by an assumed sustained rate (``utilisation`` of
``gpu_peak_flops``). Every count of updates, examples and tokens below is an assumption or the
study's default, printed with the result. Disk: the sizes of one delta and one resume.safetensors
measured here by writing them for each method on a randomly initialised T5-base-shaped model (one
Adafactor update, so the optimizer state exists), times the files the study keeps
(pewe/study.py's layout). Jobs: the arrays of scripts/slurm_study.sh with its defaults.
"""
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")

tasks = 32  # the paper's tasks: each a source and, leaving itself out, a target
methods = ["adapter", "lora", "prefix"]  # delta methods
seeds = 3  # target seeds
inits = 11  # initialisations per target: random, average, manual and the 8 scores
score_inits = 10  # of these, the ones with an initial delta file (all but random)
source_updates = 3000  # assumed mean updates of a source run (at most 5000; early stopping ends most)
target_updates = 1500  # assumed mean updates of a target run (at most 3000; early stop after 10 x 100)
pair_updates = 200  # updates of each (target, source) pair tuning (Euclidean, Performance)
batch_size = 8  # examples per update
valid_interval = 100  # updates between validations (sources, targets)
pair_valid_interval = 50  # updates between validations of a pair tuning
tokens_per_example = 256  # assumed tokens of one example as processed (input + answer, with padding)
source_dev_examples = 1000  # assumed dev examples a source validation decodes (full splits)
fewshot_train_examples = 64  # a target's train split (64-shot)
fewshot_dev_examples = 64  # a target's dev split
test_examples = 1000  # assumed test examples scored once per run
sim_batch_examples = 50  # the forward scores read one dev batch of this size
grand_batches = 10  # GraNd: dev batches with a backward each
gpu_peak_flops = 312e12  # bf16 dense peak of the assumed GPU (an A100)
utilisation = 0.10  # assumed sustained fraction of the peak (an H200 ran 59,547 LoRA tokens/s: 8-9 % at 6N per token)
source_shards = 8  # scripts/slurm_study.sh SOURCE_TASKS
target_shards = 32  # scripts/slurm_study.sh TARGET_TASKS


def measure_files(methods):
    """{method: (trainable params, delta bytes, resume bytes)} on a T5-base-shaped model."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    import delta_modules as dm
    from pewe.trainer import make_optimizer, save_resume

    # the shape of google/t5-base-lm-adapt; built from a config, transformers 5 ties lm_head to the
    # embeddings (the checkpoint loads untied: its N adds vocab x d_model, see main)
    config = T5Config(vocab_size=32128, d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12,
                      num_heads=12, feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    sizes, n_base = {}, None
    sizes_config = {"adapter": dict(adapter_type="houlsby", adapter_size=12), "lora": dict(lora_r=10, lora_alpha=16),
                    "prefix": dict(prefix_num=120, prefix_r=24)}
    ids = torch.randint(0, 32128, (1, 8))
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            torch.manual_seed(0)
            model = T5ForConditionalGeneration(config)
            n_base = sum(p.numel() for p in model.parameters())
            dm.attach_delta(model, dm.DeltaConfig(method, **sizes_config[method]))
            params = [p for _, p in dm.delta_named_parameters(model)]
            optimizer = make_optimizer(params, 5e-4)
            model(input_ids=ids, labels=ids[:, :4]).loss.backward()
            optimizer.step()
            delta, resume = Path(tmp) / f"{method}.safetensors", Path(tmp) / f"{method}_resume.safetensors"
            dm.save_delta(delta, dm.delta_state_dict(model), model.delta_config)
            save_resume(resume, model, optimizer, params, {"num_updates": 1})
            sizes[method] = (sum(p.numel() for p in params), delta.stat().st_size, resume.stat().st_size)
            del model, optimizer
    return n_base, sizes


def main(argv=None):
    from pewe.configurator import configure

    a = configure(globals(), __file__, argv)
    print("measuring one delta and one resume file per method on a T5-base-shaped model ...", flush=True)
    n_built, files = measure_files(a.methods)
    n = n_built + 32128 * 768  # + the untied lm_head of the real checkpoint
    m = len(a.methods)
    L = a.tokens_per_example
    train, infer = 6 * n * L, 2 * n * L  # FLOPs per training / inference example
    per_source = (a.source_updates * a.batch_size * train + a.source_updates // a.valid_interval
                  * a.source_dev_examples * infer + a.test_examples * infer)
    per_target = (a.target_updates * a.batch_size * train + a.target_updates // a.valid_interval
                  * a.fewshot_dev_examples * infer + a.test_examples * infer)
    per_pair = (a.pair_updates * a.batch_size * train + a.pair_updates // a.pair_valid_interval
                * a.fewshot_dev_examples * infer + a.fewshot_dev_examples * infer)  # + its zero-shot dev score
    per_score = a.sim_batch_examples * infer + a.grand_batches * a.sim_batch_examples * train
    pairs = a.tasks * (a.tasks - 1)
    runs = a.tasks * a.inits * a.seeds
    parts = [("sources", m * a.tasks, per_source), ("target runs", m * runs, per_target),
             ("pair tunings", m * pairs, per_pair), ("similarity (forward scores, GraNd)", m * pairs, per_score)]
    rate = a.gpu_peak_flops * a.utilisation
    total = sum(count * flops for _, count, flops in parts)

    print(f"\nbackbone N = {n:,} parameters (the built shape's {n_built:,} + an untied lm_head); {L} tokens per example (assumed); 6N per training token, 2N per "
          f"inference token; {a.utilisation:.0%} of {a.gpu_peak_flops / 1e12:.0f} TFLOP/s = {rate / 1e12:.1f} "
          f"TFLOP/s sustained (assumed)")
    print(f"{'piece':<36} {'count':>7} {'PFLOP each':>11} {'GPU-hours':>10}")
    for name, count, flops in parts:
        print(f"{name:<36} {count:>7,} {flops / 1e15:>11.3f} {count * flops / rate / 3600:>10.1f}")
    print(f"{'total':<36} {'':>7} {'':>11} {total / rate / 3600:>10.1f}   ({total:.2e} FLOPs)")
    sources_total = m * a.tasks * per_source
    print(f"  wall time: {a.source_shards} sources array tasks of {sources_total / a.source_shards / rate / 3600:.1f} h, "
          f"then {a.target_shards} targets array tasks of {(total - sources_total) / a.target_shards / rate / 3600:.1f} h "
          f"(one target each, all methods), given that many GPUs")
    print(f"jobs: {a.source_shards} sources + {a.target_shards} targets array tasks + 1 report = "
          f"{a.source_shards + a.target_shards + 1}")

    print(f"\n{'method':<8} {'trainable':>10} {'delta MB':>9} {'resume MB':>10}")
    for method, (k, d, r) in files.items():
        print(f"{method:<8} {k:>10,} {d / 1e6:>9.2f} {r / 1e6:>10.2f}")
    # files kept per method: each tuning run (source or target) its best delta twice (the run's
    # and the task folder's copy) and its resume.safetensors; each pair tuning its best and last
    # delta (its resume file is removed when done); each initialisation one delta per target
    deltas = 2 * (a.tasks + runs) + 2 * pairs + a.score_inits * a.tasks
    resumes = a.tasks + runs
    disk = sum(deltas * d + resumes * r for _, d, r in files.values())
    print(f"per method: {deltas:,} delta files, {resumes:,} resume files; all methods: {disk / 1e9:.1f} GB "
          f"(plus predictions, JSON and logs: small)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
