"""Shared pieces of the benchmarks: T5 shapes built locally, delta attachment (ours and peft's), one
training step as pewe.trainer runs it, and an interleaving timer.

On a shared, loaded machine absolute times drift; every figure is therefore a ratio of peers timed in
the same run, interleaved (A, B, B, A, ...) so that a change of load hits both, and reported as the
median of the per-round ratios.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# GNU OpenMP's default wait policy spins for a while at every barrier; on a CPU shared with other
# jobs a spinning thread holds the core its partner needs, and a step became ~25x slower here (see
# docs/PERFORMANCE.md). libgomp reads this once, when torch is loaded: it must be set before.
# (benchmarks/run.py's omp figure starts children with PEWE_BENCH_OMP_DEFAULT=1 to time the default.)
if os.environ.get("PEWE_BENCH_OMP_DEFAULT") != "1":
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

# T5 v1.1 shapes (gated-gelu). "mini" is the embedded default backbone (data/t5-mini); "small" is
# T5-small v1.1 with the same 4,100-token vocabulary (so the LM head does not dominate a CPU step);
# "base" is T5-base (google/t5-base-lm-adapt) with its own vocabulary; "tiny" is for smoke runs.
SHAPES = {
    "tiny": dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=512),
    "mini": dict(d_model=256, d_ff=640, num_layers=3, num_heads=4, d_kv=64, vocab_size=4100),
    "small": dict(d_model=512, d_ff=1024, num_layers=8, num_heads=6, d_kv=64, vocab_size=4100),
    "base": dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12, d_kv=64, vocab_size=32128),
}
# The paper's delta sizes (1,105,920 trainable parameters each on T5-base).
DELTAS = {
    "adapter": dict(method="adapter", adapter_type="houlsby", adapter_size=12),
    "lora": dict(method="lora", lora_r=10, lora_alpha=16),
    "prefix": dict(method="prefix", prefix_num=120, prefix_r=24),
}
METHODS = ("lora", "peft_lora", "adapter", "prefix")


# --------------------------------------------------------------------------- environment

def sync(device):
    """Wait for the device's queued work (a GPU runs asynchronously; a timer must not stop before it)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_device_options(ap, tiny_help: str):
    """The GPU benchmarks' shared options: --device, --tiny (a CPU smoke run) and --precision."""
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    ap.add_argument("--tiny", action="store_true", help=tiny_help)
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="autocast dtype")


def open_device(a):
    """(device, shape, device name) of the GPU benchmarks' options; fp32 matmuls may use TF32 on a GPU, as a
    GPU user would run them."""
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu --tiny for a smoke run")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else machine()["cpu"]
    return device, "tiny" if a.tiny else "base", name


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def machine() -> dict:
    """CPU model, core count, torch version and threads: printed beside every result."""
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}


# --------------------------------------------------------------------------- timing

def interleave(fns: dict, reps: int, warmup: int = 1) -> dict:
    """{name: [seconds per call]}: every fn warmed up, then called ``reps`` times in alternating order
    (A B C, C B A, ...) so that slow drifts of the machine's load fall on all of them alike."""
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    times = {n: [] for n in names}
    for r in range(reps):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs) -> float:
    return statistics.median(xs)


def paired_ratio(times: dict, a: str, b: str) -> float:
    """Median over rounds of time(a) / time(b): each round's two calls saw about the same load."""
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


# --------------------------------------------------------------------------- models and steps

def t5_config(shape: str, dropout: float = 0.1):
    from transformers import T5Config

    s = SHAPES[shape]
    return T5Config(vocab_size=s["vocab_size"], d_model=s["d_model"], d_kv=s["d_kv"], d_ff=s["d_ff"],
                    num_layers=s["num_layers"], num_decoder_layers=s["num_layers"], num_heads=s["num_heads"],
                    feed_forward_proj="gated-gelu", dropout_rate=dropout, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0, tie_word_embeddings=True)


def build_t5(shape: str, seed: int = 0, device="cpu"):
    """A randomly initialised T5ForConditionalGeneration of ``shape`` (the same weights for a seed)."""
    from transformers import T5ForConditionalGeneration
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(seed)
    with torch.device(device):  # initialise where it will run (a T5-base init on a CPU takes seconds)
        return T5ForConditionalGeneration(t5_config(shape))


def with_delta(model, method: str):
    """(model, trainable params) with ``method`` attached: ours (adapter / lora / prefix, the paper's
    sizes) or peft's LoRA on q and v of every attention with the same r and alpha."""
    if method == "peft_lora":
        import peft

        cfg = peft.LoraConfig(r=DELTAS["lora"]["lora_r"], lora_alpha=DELTAS["lora"]["lora_alpha"],
                              target_modules=["q", "v"], lora_dropout=0.0)
        model = peft.get_peft_model(model, cfg)
        return model, [p for p in model.parameters() if p.requires_grad]
    import delta_modules as dm

    dm.attach_delta(model, dm.DeltaConfig(**DELTAS[method]))
    return model, [p for _, p in dm.delta_named_parameters(model)]


def random_batch(vocab: int, batch: int, in_len: int, out_len: int, seed: int = 0, device="cpu") -> dict:
    """input_ids (batch, in_len), attention_mask, labels (batch, out_len): the same for every method."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (batch, in_len), generator=g)
    labels = torch.randint(2, vocab, (batch, out_len), generator=g)
    return {"input_ids": ids.to(device), "attention_mask": torch.ones_like(ids).to(device), "labels": labels.to(device)}


def autocast(device, precision):
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class Stepper:
    """One delta-tuning update exactly as pewe.trainer.train does it: forward with labels, backward,
    grad-norm clip 0.1, Adafactor step (pewe.trainer.make_optimizer), zero_grad."""

    def __init__(self, model, params, batch, precision="fp32", device="cpu"):
        from pewe.trainer import make_optimizer

        self.model, self.params, self.batch = model.train(), params, batch
        self.precision, self.device = precision, device
        self.optimizer = make_optimizer(params, 5e-4)

    def loss_backward(self):
        with autocast(self.device, self.precision):
            loss = self.model(**self.batch).loss
        loss.backward()
        return loss

    def __call__(self):
        self.loss_backward()
        torch.nn.utils.clip_grad_norm_(self.params, 0.1)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def steppers(shape: str, methods, batch: dict, precision="fp32", device="cpu") -> dict:
    """{method: Stepper} on separate copies of the same randomly initialised T5 (same seed).
    A method named ``{m}_eager`` is ``m`` with T5's eager attention instead of the default sdpa."""
    out = {}
    for m in methods:
        model = build_t5(shape, seed=0, device=device)
        if m.endswith("_eager"):
            model.set_attn_implementation("eager")
        model, params = with_delta(model, m.removesuffix("_eager"))
        out[m] = Stepper(model, params, batch, precision, device)
    return out
