"""Training throughput of the three deltas on a T5-base-shaped model, with peft's LoRA as a peer.

Prepared for a GPU machine (not run on one yet, see docs/PERFORMANCE.md):

    .venv/bin/python benchmarks/gpu_t5_base.py                        # cuda, bf16 autocast, T5-base shape
    .venv/bin/python benchmarks/gpu_t5_base.py --device cpu --tiny    # a smoke run of the same code on a CPU

The model is randomly initialised from a config (d_model 768, d_ff 2048, 12+12 layers, 12 heads,
vocab 32128, gated-gelu): throughput does not depend on the weights. Per method: the peak of
``torch.cuda.max_memory_allocated`` over a few steps with only that model on the device, then the
step time with all four models resident, interleaved (lora, peft_lora, adapter, prefix, then
reversed, ...), median over the rounds. Prints ``name: value`` lines; ``#`` lines are context.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (METHODS, SHAPES, Stepper, add_device_options, build_t5, load_average, machine,  # noqa: E402
                    median, open_device, paired_ratio, random_batch, sync, with_delta)

import torch  # noqa: E402


def make_stepper(method, shape, batch, precision, device) -> Stepper:
    """``{m}_eager``: method m on T5's eager attention instead of the default sdpa (the prefix always
    runs through its own eager attention function)."""
    model = build_t5(shape, seed=0, device=device)
    if method.endswith("_eager"):
        model.set_attn_implementation("eager")
    model, params = with_delta(model, method.removesuffix("_eager"))
    return Stepper(model, params, batch, precision, device)


def peak_memory(method, shape, batch, precision, device, steps=3) -> float:
    """GiB: the most memory allocated during ``steps`` updates with only this model on the device."""
    if device.type != "cuda":
        return float("nan")
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    step = make_stepper(method, shape, batch, precision, device)
    for _ in range(steps):
        step()
    sync(device)
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 30
    del step
    gc.collect()
    torch.cuda.empty_cache()
    return peak


def timed_steps(steps: dict, reps: int, warmup: int, device) -> dict:
    """{method: [seconds per update]}, interleaved rounds (order reversed every other round)."""
    names = list(steps)
    for n in names:
        for _ in range(warmup):
            steps[n]()
    sync(device)
    times = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            sync(device)
            t0 = time.perf_counter()
            steps[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_options(ap, "a tiny T5 shape (smoke run of the script)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--in_len", type=int, default=256, help="input tokens per row")
    ap.add_argument("--out_len", type=int, default=32, help="target tokens per row")
    ap.add_argument("--reps", type=int, default=20, help="timed rounds (each method once per round)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--eager", action="store_true", help="also time adapter and LoRA on eager attention")
    a = ap.parse_args(argv)
    methods = list(METHODS) + (["lora_eager", "adapter_eager"] if a.eager else [])
    if a.tiny:
        a.batch, a.in_len, a.out_len, a.reps, a.warmup = min(a.batch, 4), min(a.in_len, 32), min(a.out_len, 8), \
            min(a.reps, 4), min(a.warmup, 1)
    device, shape, name = open_device(a)
    info = machine()
    print(f"# device {name}; torch {info['torch']}; shape {shape} {SHAPES[shape]}; batch {a.batch}, input "
          f"{a.in_len}, target {a.out_len}, {a.precision} autocast; load average {load_average()}", flush=True)
    batch = random_batch(SHAPES[shape]["vocab_size"], a.batch, a.in_len, a.out_len, device=device)

    mem, steps = {}, {}
    for m in methods:  # a method that fails here (e.g. another transformers version) is reported, not fatal
        try:
            mem[m] = peak_memory(m, shape, batch, a.precision, device)
            steps[m] = make_stepper(m, shape, batch, a.precision, device)
        except Exception as e:  # noqa: BLE001
            print(f"# {m} failed: {type(e).__name__}: {e}", flush=True)
    times = timed_steps(steps, a.reps, a.warmup, device)

    tokens = a.batch * (a.in_len + a.out_len)
    for m in steps:
        t = median(times[m])
        print(f"{m}_steps_per_s: {1 / t:.3f}")
        print(f"{m}_tokens_per_s: {tokens / t:.1f}")
        if device.type == "cuda":
            print(f"{m}_peak_mem_gib: {mem[m]:.3f}")
    for name, x, y in (("lora_step_ratio_vs_peft", "lora", "peft_lora"), ("adapter_step_ratio_vs_lora", "adapter", "lora"),
                       ("prefix_step_ratio_vs_lora", "prefix", "lora"),
                       ("eager_over_sdpa_lora_step_ratio", "lora_eager", "lora"),
                       ("eager_over_sdpa_adapter_step_ratio", "adapter_eager", "adapter")):
        if x in times and y in times:
            print(f"{name}: {paired_ratio(times, x, y):.3f}")
    if device.type == "cuda" and "lora" in mem and "peft_lora" in mem:
        print(f"lora_peak_mem_ratio_vs_peft: {mem['lora'] / mem['peft_lora']:.3f}")
    print(f"# versions: transformers {__import__('transformers').__version__}, peft {__import__('peft').__version__}")
    print(f"# load average at the end {load_average()}", flush=True)


if __name__ == "__main__":
    main()
