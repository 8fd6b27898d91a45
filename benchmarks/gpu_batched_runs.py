"""Lockstep runs on a GPU: runs/s, peak memory and model-FLOP utilisation of K runs of one delta on a
T5-base-shaped model sharing every forward (pewe/stacked.py), K = 1, 4, 16, 64.

    .venv/bin/python benchmarks/gpu_batched_runs.py                         # cuda, bf16, T5-base shape
    .venv/bin/python benchmarks/gpu_batched_runs.py --methods lora --ks 1 16
    .venv/bin/python benchmarks/gpu_batched_runs.py --device cpu --tiny     # a smoke run of the same code

Each K runs the trainer's own code: one lockstep update is ``forward_backward`` over every run's
micro-batch (at most pewe.trainer.MAX_FORWARD_ROWS rows a forward) and the per-run clip and
Adafactor step of ``pewe.trainer`` (K = 1: the model's own delta and transformers' Adafactor, as a
run alone trains); one decode is ``predict_runs`` (K = 1: ``predict``) of every run's dev rows with
the trainer's rows per generate call (``decode_rows``). Inputs are random token ids (throughput does
not depend on them) and decoding always generates ``--decode_tokens`` tokens (no end-of-sequence).

A run is the study's target run as benchmarks/study_cost.py assumes it: ``--updates`` updates of 8
rows, a validation (dev decode) every ``--valid_interval`` updates and one decode of ``--test_rows``
test rows, so runs/s(K) = K / (updates x t_update(K) + decodes x t_decode(K)). Model FLOPs are the
matmul FLOPs of one update as torch.utils.flop_counter counts them (forward and backward, the frozen
weights get no gradient), over the update time, as a fraction of the measured bf16 (or fp32) matmul
peak of the device (and of the vendor's dense peak where the device is known). Prints
``name: value`` lines; ``#`` lines are context.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (DELTAS, SHAPES, add_device_options, build_t5, load_average, machine, median,  # noqa: E402
                    open_device, sync)

import torch  # noqa: E402

VENDOR_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # dense bf16 FLOP/s


class Tokens:
    """What the trainer's decoding needs of a tokenizer here (the text of random ids is not read)."""
    pad_token_id, pad_token, eos_token = 0, "<pad>", "</s>"

    def batch_decode(self, ids, skip_special_tokens=False):
        return ["x"] * len(ids)


def random_rows(vocab, n, in_len, out_len, seed):
    """n rows of random ids, as pewe.data.Rows (one example per row, one gold answer each)."""
    from pewe.data import Example, Rows

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (n, in_len), generator=g).tolist()
    labels = torch.randint(2, vocab, (n, out_len), generator=g).tolist()
    return Rows(ids, labels, list(range(n)), [Example("x", ("x",), i + 1) for i in range(n)])


def matmul_peak(device, dtype, size, reps=5) -> float:
    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * size ** 3 / best


def timed(fn, reps, device) -> float:
    """Median seconds of ``fn`` over ``reps`` calls (after one warm-up call)."""
    fn()
    sync(device)
    out = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return median(out)


def bench_method(method, a, shape, device) -> dict:
    """{K: {update_s, decode_s, flops, peak_gib}} of one delta method (None for a K that ran out of memory)."""
    import delta_modules as dm
    from pewe.stacked import StackedDeltas
    from pewe.trainer import (Run, TrainSettings, _forward_chunks, _OwnDelta, _StackedRuns, collate, decode_rows,
                              predict, predict_runs)

    model = dm.attach_delta(build_t5(shape, seed=0, device=device), dm.DeltaConfig(**DELTAS[method]))
    model.generation_config.eos_token_id = None  # always decode_tokens tokens: a stable cost
    vocab = SHAPES[shape]["vocab_size"]
    settings = TrainSettings(batch_size=a.batch, predict_batch_size=a.predict_batch_size, precision=a.precision,
                             progress=False)
    train = random_rows(vocab, a.batch, a.in_len, a.out_len, seed=0)
    dev = random_rows(vocab, a.dev_rows, a.in_len, a.out_len, seed=1)
    tok = Tokens()
    out = {}
    for k in a.ks:
        group = stacked = None
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            runs = [Run(train, dev, "EM", settings, Path(f"/nonexistent/{i}")) for i in range(k)]
            group = _OwnDelta(model, runs) if k == 1 else _StackedRuns(model, runs)
            parts = [(j, collate(train, list(range(a.batch)), tok.pad_token_id), 1.0) for j in range(k)]

            def update():
                model.train()
                for lo, hi in _forward_chunks([a.batch] * k):
                    group.forward_backward(parts[lo:hi], device, a.precision, tok.pad_token_id)
                group.step(list(range(k)), 0.1)

            stacked = StackedDeltas(model, k) if k > 1 else None

            def decode():
                if k == 1:
                    predict(model, tok, dev, a.predict_batch_size, a.decode_tokens, device, a.precision)
                else:
                    predict_runs(model, stacked, tok, [(j, dev) for j in range(k)], a.predict_batch_size,
                                 a.decode_tokens, device, a.precision, max_rows=decode_rows(settings, device, k))

            update_s = timed(update, a.reps, device)
            decode_s = timed(decode, max(1, a.reps // 4), device)
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            model.train()
            with counter:
                for lo, hi in _forward_chunks([a.batch] * k):
                    group.forward_backward(parts[lo:hi], device, a.precision, tok.pad_token_id)
            flops = counter.get_total_flops()
            peak = torch.cuda.max_memory_allocated(device) / 2 ** 30 if device.type == "cuda" else float("nan")
            out[k] = {"update_s": update_s, "decode_s": decode_s, "flops": flops, "peak_gib": peak}
        except torch.OutOfMemoryError as e:
            print(f"# {method} K={k}: out of memory ({str(e).splitlines()[0][:120]})", flush=True)
            out[k] = None
        group = stacked = None  # free this K's stacked deltas and optimizer state before the next
    model = None
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_options(ap, "a tiny T5 shape and short inputs (smoke run of the script)")
    ap.add_argument("--methods", nargs="+", default=["lora", "adapter", "prefix"])
    ap.add_argument("--ks", nargs="+", type=int, default=[1, 4, 16, 64], help="runs per lockstep group")
    ap.add_argument("--batch", type=int, default=8, help="rows per run per update (the study's batch size)")
    ap.add_argument("--in_len", type=int, default=256, help="input tokens per row")
    ap.add_argument("--out_len", type=int, default=32, help="target tokens per row")
    ap.add_argument("--dev_rows", type=int, default=64, help="dev rows per run (a 64-shot target)")
    ap.add_argument("--predict_batch_size", type=int, default=80, help="the study's rows per run per generate call")
    ap.add_argument("--decode_tokens", type=int, default=16, help="tokens generated per row")
    ap.add_argument("--updates", type=int, default=1500, help="updates of one run (benchmarks/study_cost.py's target run)")
    ap.add_argument("--valid_interval", type=int, default=100, help="updates between dev decodes")
    ap.add_argument("--test_rows", type=int, default=1000, help="test rows decoded once per run")
    ap.add_argument("--reps", type=int, default=8, help="timed updates per K (decodes: a quarter)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.in_len, a.out_len, a.dev_rows, a.decode_tokens, a.reps = min(a.in_len, 32), min(a.out_len, 8), \
            min(a.dev_rows, 16), min(a.decode_tokens, 4), min(a.reps, 2)
    device, shape, name = open_device(a)
    info = machine()
    print(f"# device {name}; torch {info['torch']}; shape {shape} {SHAPES[shape]}; {a.batch} rows x ({a.in_len} + "
          f"{a.out_len}) tokens per run and update, {a.precision} autocast; {a.dev_rows} dev rows per run, "
          f"{a.decode_tokens} tokens decoded; load average {load_average()}", flush=True)
    dtype = torch.bfloat16 if a.precision == "bf16" else torch.float32
    peak = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 1024)
    vendor = next((v for key, v in VENDOR_PEAK.items() if key in name), None) if device.type == "cuda" else None
    print(f"# measured {a.precision} matmul peak {peak / 1e12:.1f} TFLOP/s"
          + (f"; vendor dense bf16 peak {vendor / 1e12:.0f} TFLOP/s" if vendor else ""), flush=True)
    decodes = a.updates // a.valid_interval + a.test_rows / a.dev_rows  # in units of one dev decode
    for method in a.methods:
        res = bench_method(method, a, shape, device)
        base = res.get(1)
        for k, r in res.items():
            if r is None:
                continue
            runs_per_s = k / (a.updates * r["update_s"] + decodes * r["decode_s"])
            print(f"# {method} K={k}: update {1000 * r['update_s']:.1f} ms, decode {1000 * r['decode_s']:.1f} ms, "
                  f"{r['flops'] / 1e9:.2f} GFLOP per update (matmuls)", flush=True)
            print(f"{method}_k{k}_runs_per_s: {runs_per_s:.5f}")
            print(f"{method}_k{k}_run_updates_per_s: {k / r['update_s']:.2f}")
            print(f"{method}_k{k}_mfu_of_measured_peak: {r['flops'] / r['update_s'] / peak:.4f}")
            if vendor:
                print(f"{method}_k{k}_mfu_of_vendor_peak: {r['flops'] / r['update_s'] / vendor:.4f}")
            if device.type == "cuda":
                print(f"{method}_k{k}_peak_mem_gib: {r['peak_gib']:.2f}")
            if base is not None and k != 1:
                base_rate = 1 / (a.updates * base["update_s"] + decodes * base["decode_s"])
                print(f"{method}_k{k}_runs_per_s_speedup: {runs_per_s / base_rate:.3f}")
                print(f"{method}_k{k}_train_speedup: {k * base['update_s'] / r['update_s']:.3f}")
                print(f"{method}_k{k}_decode_speedup: {k * base['decode_s'] / r['decode_s']:.3f}")
    print(f"# load average at the end {load_average()}", flush=True)


if __name__ == "__main__":
    main()
