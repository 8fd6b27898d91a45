"""The one training loop and the one evaluation loop for delta modules.

Training follows the original: Adafactor(lr, scale_parameter=False, relative_step=False,
warmup_init=False) with a constant schedule (the original passes ``warmup_steps`` to a constant
schedule, which ignores it), gradient-norm clipping at 0.1, validation on dev every
``valid_interval`` updates keeping the best delta, and a stop after ``early_stop`` validations
without improvement (or once the mean train loss is below 1e-7). Two deliberate changes: the first
validation always becomes the best (the original starts from a best of 0, so a task whose dev score
stays 0 never wrote a checkpoint), and a batch larger than 16 is accumulated from micro-batches
correctly (the original stepped after the first micro-batch).

Resumable: at every validation the delta, the optimizer state, the RNG state and the counters go
into one ``resume.safetensors`` written atomically; a killed run started again continues from the
last validation and ends with the same best delta as an uninterrupted run. A finished run that used
its whole budget, started again with a larger ``train_iters``, continues from its last update (the
schedule is constant and the data order a function of the epoch, so it ends as a run given the
larger budget from the start would); a run that stopped early stays finished.

Lockstep (``train_runs``): K runs of one delta config share every forward. The loop below is the
one loop for K = 1 and K > 1; what differs is only where the deltas live. With one run the model's
own delta is trained with transformers' Adafactor, exactly as always. With K runs their deltas are
stacked (``pewe.stacked``), each run's rows go through its own delta, and ``StackedAdafactor`` /
``clip_grad_norms`` keep every optimizer statistic and the gradient-norm clip per run. Each run
keeps its own data order (its seed), counters, validations, best checkpoint, early stopping, step
budget scores and resume file; the runs that validate at the same update are decoded together, and
a run that stops leaves the batch. With dropout off, K runs in lockstep end as the same runs one at
a time up to float rounding (tests/test_lockstep.py); with dropout on they draw their masks from one
stream for the whole batch, so their draws differ from a run alone.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import re
import time
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save
from tqdm.auto import tqdm
from transformers.optimization import Adafactor

from delta_modules import delta_named_parameters, delta_state_dict, load_delta, load_delta_state, save_delta
from pewe.atomic import atomic_write_bytes, atomic_write_text
from pewe.data import batches, collate, epoch_order
from pewe.errors import UserError
from pewe.metrics import evaluate
from pewe.model import autocast

log = logging.getLogger("pewe")
MICRO_BATCH = 16  # the original's largest per-step batch; larger batches are accumulated
MAX_FORWARD_ROWS = 256  # rows of one lockstep training forward; more runs' rows go into several forwards
PRECISIONS = ("fp32", "bf16")
AUTO_BATCH_RUNS_GPU = 16  # --batch_runs auto on a GPU
DECODE_RUNS_GPU = 16  # on a GPU a generate call holds predict_batch_size rows of up to this many runs
_SENTINEL = re.compile(r"<extra_id_\d+>")


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    learning_rate: float = 5e-4
    batch_size: int = 8
    train_iters: int = 100000
    valid_interval: int = 100
    log_interval: int = 100
    early_stop: int = 10
    max_grad_norm: float = 0.1
    predict_batch_size: int = 80
    max_output_length: int = 64
    seed: int = 42
    precision: str = "fp32"
    progress: bool = True  # progress bars

    def __post_init__(self):
        """Refuse settings that would train wrongly or never end, before any work."""
        for name in ("batch_size", "train_iters", "valid_interval", "log_interval", "predict_batch_size",
                     "max_output_length"):
            value, least = getattr(self, name), 0 if name == "train_iters" else 1  # 0 updates: evaluate the init
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise UserError(f"{name} must be a whole number >= {least}, not {value!r}")
        for name in ("learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise UserError(f"{name} must be a positive finite number, not {value!r}")
        if self.precision not in PRECISIONS:
            raise UserError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")


def resolve_batch_runs(value, device) -> int:
    """``--batch_runs``: how many runs train in lockstep. ``auto``: 1 on a CPU (a small step already
    runs near its matmul peak there, docs/PERFORMANCE.md), 16 on a GPU (one run fills a few per cent
    of it); a number >= 1 as given (1: one run at a time)."""
    if str(value).strip().lower() == "auto":
        return AUTO_BATCH_RUNS_GPU if torch.device(device).type == "cuda" else 1
    try:
        k = int(str(value))
    except ValueError:
        k = 0
    if k < 1:
        raise UserError(f"--batch_runs must be auto or a whole number >= 1, not {value!r}")
    return k


def make_optimizer(params, lr):
    return Adafactor(params, lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)


def set_seed(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# --------------------------------------------------------------------------- evaluation

def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items() if k != "index"}


def _texts(tokenizer, ids) -> list:
    """Generated ids as answer strings (sentinels, padding and end-of-sequence stripped)."""
    out = []
    for text in tokenizer.batch_decode(ids, skip_special_tokens=False):
        text = _SENTINEL.sub("", text)
        for tok in (tokenizer.pad_token, tokenizer.eos_token):
            if tok:
                text = text.replace(tok, "")
        out.append(text.strip())
    return out


@torch.no_grad()
def predict(model, tokenizer, rows, batch_size, max_output_length, device, precision="fp32", desc=None,
            progress=False):
    """Greedy decoding of every row; returns one string per row (sentinels stripped)."""
    model.eval()
    out = []
    n = len(rows.input_ids)
    for batch in tqdm(batches(rows, batch_size, tokenizer.pad_token_id), total=math.ceil(n / batch_size),
                      desc=desc or "predict", disable=not progress, leave=False):
        with autocast(device, precision):
            ids = model.generate(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device),
                                 max_new_tokens=max_output_length, num_beams=1, do_sample=False)
        out.extend(_texts(tokenizer, ids))
    return out


def concat_batches(parts, pad_id: int) -> dict:
    """One batch of several collated batches (the rows of several runs, block after block), each
    padded to the widest as ``collate`` pads: input ``pad_id``, attention 0, labels -100."""
    def widen(t, width, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    width_in = max(b["input_ids"].shape[1] for b in parts)
    width_out = max(b["labels"].shape[1] for b in parts)
    return {"input_ids": torch.cat([widen(b["input_ids"], width_in, pad_id) for b in parts]),
            "attention_mask": torch.cat([widen(b["attention_mask"], width_in, 0) for b in parts]),
            "labels": torch.cat([widen(b["labels"], width_out, -100) for b in parts]),
            "index": [i for b in parts for i in b["index"]]}


def decode_rows(settings: TrainSettings, device, runs: int) -> int:
    """Rows per generate call when ``runs`` runs are decoded together: on a CPU one run's
    ``predict_batch_size`` (larger batches cost more per row there: docs/PERFORMANCE.md), on a GPU
    ``predict_batch_size`` of each of up to ``DECODE_RUNS_GPU`` runs."""
    if torch.device(device).type == "cuda":
        return settings.predict_batch_size * max(1, min(runs, DECODE_RUNS_GPU))
    return settings.predict_batch_size


@torch.no_grad()
def predict_runs(model, deltas, tokenizer, items, batch_size, max_output_length, device, precision="fp32",
                 desc=None, progress=False, max_rows=None) -> list:
    """Greedy decoding of several runs' rows together: ``items`` is [(run k of ``deltas``, rows)].
    The runs advance together: rows [b * batch_size, (b + 1) * batch_size) of every run, then the
    next b; these are cut into generate calls of at most ``max_rows`` rows (default: one batch of
    every run), each call's rows block by block per run, each row decoded with its own run's delta
    (``pewe.stacked``). One list of strings per item."""
    model.eval()
    order = []  # (item, row) in decoding order
    most = max(math.ceil(len(rows.input_ids) / batch_size) for _, rows in items)
    for b in range(most):
        for i, (_, rows) in enumerate(items):
            order += [(i, r) for r in range(b * batch_size, min(len(rows.input_ids), (b + 1) * batch_size))]
    max_rows = max_rows or batch_size * len(items)
    out = [[] for _ in items]
    for start in tqdm(range(0, len(order), max_rows), desc=desc or "predict", disable=not progress, leave=False):
        chunk = order[start:start + max_rows]
        blocks = []  # (item, its row indices) of each run's contiguous rows in this call
        for i, r in chunk:
            if blocks and blocks[-1][0] == i:
                blocks[-1][1].append(r)
            else:
                blocks.append((i, [r]))
        parts = [collate(items[i][1], rows, tokenizer.pad_token_id) for i, rows in blocks]
        batch = concat_batches(parts, tokenizer.pad_token_id)
        sizes = [len(rows) for _, rows in blocks]
        with deltas.rows([items[i][0] for i, _ in blocks], sizes), autocast(device, precision):
            ids = model.generate(input_ids=batch["input_ids"].to(device),
                                 attention_mask=batch["attention_mask"].to(device),
                                 max_new_tokens=max_output_length, num_beams=1, do_sample=False)
        texts = _texts(tokenizer, ids)
        at = 0
        for (i, _), size in zip(blocks, sizes):
            out[i].extend(texts[at:at + size])
            at += size
    return out


def score_rows(model, tokenizer, rows, metric, settings, device, desc=None):
    """(score, predictions) of a split tokenised one row per example."""
    preds = predict(model, tokenizer, rows, settings.predict_batch_size, settings.max_output_length, device,
                    settings.precision, desc=desc, progress=settings.progress)
    return evaluate(preds, [ex.answers for ex in rows.examples], metric), preds


def score_deltas(model, tokenizer, items, settings, device, desc=None) -> list:
    """(score, predictions) of each (delta, rows, metric) of ``items``, a delta being a checkpoint
    file or a state dict. One item: loaded into the model and decoded as ``score_rows`` does;
    several: stacked (``pewe.stacked``) and decoded together."""
    if len(items) == 1:
        (delta, rows, metric), = items
        if isinstance(delta, dict):
            load_delta_state(model, delta)
        else:
            load_delta(model, delta)
        return [score_rows(model, tokenizer, rows, metric, settings, device, desc=desc)]
    from pewe.stacked import StackedDeltas  # noqa: PLC0415

    deltas = StackedDeltas(model, len(items))
    for k, (delta, _, _) in enumerate(items):
        if isinstance(delta, dict):
            deltas.load_state(k, delta)
        else:
            deltas.load_file(k, delta)
    preds = predict_runs(model, deltas, tokenizer, [(k, rows) for k, (_, rows, _) in enumerate(items)],
                         settings.predict_batch_size, settings.max_output_length, device, settings.precision,
                         desc=desc, progress=settings.progress, max_rows=decode_rows(settings, device, len(items)))
    return [(evaluate(p, [ex.answers for ex in rows.examples], metric), p) for p, (_, rows, metric) in zip(preds, items)]


def groups_of(items, size: int) -> list:
    """``items`` in consecutive groups of ``size`` (the last one smaller)."""
    items = list(items)
    return [items[i:i + size] for i in range(0, len(items), max(1, size))]


# --------------------------------------------------------------------------- resume state

def _optimizer_tensors(states):
    """Flatten Adafactor state to tensors; python scalars become float64 0-d tensors. ``states``:
    (parameter index, that parameter's state dict) pairs."""
    tensors, kinds = {}, {}
    for i, st in states:
        for k, v in st.items():
            key = f"optim.{i}.{k}"
            if isinstance(v, torch.Tensor):
                tensors[key] = v.detach().cpu().contiguous()
            else:
                tensors[key] = torch.tensor(float(v), dtype=torch.float64)
                kinds[key] = type(v).__name__
    return tensors, kinds


def _optimizer_states(tensors, kinds, device) -> dict:
    """{parameter index: its state dict} from a resume file's ``optim.*`` tensors (file order)."""
    out = {}
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        _, i, k = key.split(".", 2)
        kind = kinds.get(key)
        out.setdefault(int(i), {})[k] = v.to(device) if kind is None else (int(v.item()) if kind == "int"
                                                                          else float(v.item()))
    return out


def _restore_optimizer(optimizer, params, tensors, kinds, device):
    for i, st in _optimizer_states(tensors, kinds, device).items():
        for k, value in st.items():
            optimizer.state[params[i]][k] = value


def _write_resume(path, delta_state: dict, optimizer_states, counters: dict):
    tensors = {f"delta.{k}": v.cpu().contiguous() for k, v in delta_state.items()}
    opt, kinds = _optimizer_tensors(optimizer_states)
    tensors.update(opt)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"counters": json.dumps(counters), "kinds": json.dumps(kinds)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


def save_resume(path, model, optimizer, params, counters: dict):
    index = {id(p): i for i, p in enumerate(params)}
    _write_resume(path, delta_state_dict(model), ((index[id(p)], st) for p, st in optimizer.state.items()), counters)


def _read_resume(path, tensors=True):
    """(metadata, tensors) of a ``resume.safetensors``; a damaged file is one clear error naming it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            out = {k: f.get_tensor(k) for k in f.keys()} if tensors else {}
        return {"counters": json.loads(meta["counters"]), "kinds": json.loads(meta["kinds"])}, out
    except Exception as e:  # safetensors raises its own error types; a missing key or bad JSON too
        raise UserError(f"{path}: not a readable resume file ({type(e).__name__}: {e}); delete it to start "
                        f"this run again from its beginning") from None


def resume_counters(path) -> dict:
    """The counters of a ``resume.safetensors`` (no tensors are read)."""
    return _read_resume(path, tensors=False)[0]["counters"]


def can_extend(counters: dict, train_iters: int) -> bool:
    """Whether a run with these counters continues when asked for ``train_iters`` updates: it is
    finished, it used its whole budget (no early stop) and the new budget is larger."""
    return counters["done"] and not counters.get("stopped_early", False) and counters["num_updates"] < train_iters


def _restore_rng(tensors):
    torch.set_rng_state(tensors["rng.cpu"])
    gpus = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if gpus and torch.cuda.is_available():  # device order (rng.cuda.10 after .2); only the GPUs visible now
        torch.cuda.set_rng_state_all([tensors[k] for k in gpus][:torch.cuda.device_count()])


def load_resume(path, model, optimizer, params, device) -> dict:
    meta, tensors = _read_resume(path)
    load_delta_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("delta.")}, where=str(path))
    _restore_optimizer(optimizer, params, tensors, meta["kinds"], device)
    _restore_rng(tensors)
    return meta["counters"]


# --------------------------------------------------------------------------- where the runs' deltas live

class _OwnDelta:
    """One run: the model's own delta, transformers' Adafactor, the plain forward (the loop as it
    always ran)."""

    def __init__(self, model, runs):
        self.model = model
        self.params = [p for _, p in delta_named_parameters(model)]
        self.optimizer = make_optimizer(self.params, runs[0].settings.learning_rate)

    def load_state(self, k, tensors, where):
        load_delta_state(self.model, tensors, where=where)

    def load_checkpoint(self, k, path):
        load_delta(self.model, path)

    def load_optimizer(self, k, tensors, kinds, device):
        _restore_optimizer(self.optimizer, self.params, tensors, kinds, device)

    def state(self, k) -> dict:
        return delta_state_dict(self.model)

    def optimizer_states(self, k):
        index = {id(p): i for i, p in enumerate(self.params)}
        return [(index[id(p)], st) for p, st in self.optimizer.state.items()]

    def forward_backward(self, parts, device, precision, pad_id) -> list:
        (_, mb, scale), = parts
        with autocast(device, precision):
            loss = self.model(**_to(mb, device)).loss * scale
        loss.backward()
        return [loss.item()]

    def step(self, ks, max_grad_norm):
        torch.nn.utils.clip_grad_norm_(self.params, max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def predict(self, tokenizer, items, settings, device, desc) -> list:
        (_, rows), = items
        return [predict(self.model, tokenizer, rows, settings.predict_batch_size, settings.max_output_length, device,
                        settings.precision, desc=desc, progress=settings.progress)]


class _StackedRuns:
    """K runs: their deltas stacked (``pewe.stacked``), one forward for all, every optimizer
    statistic and the gradient clip per run. Every run starts from the delta the model carries."""

    def __init__(self, model, runs):
        from pewe.stacked import StackedAdafactor, StackedDeltas  # noqa: PLC0415 (only lockstep groups need it)

        self.model = model
        self.deltas = StackedDeltas(model, len(runs))
        for k in range(len(runs)):
            self.deltas.copy_from_model(k)
        self.optimizer = StackedAdafactor(self.deltas.parameters(), [r.settings.learning_rate for r in runs])

    def load_state(self, k, tensors, where):
        self.deltas.load_state(k, tensors, where=where)

    def load_checkpoint(self, k, path):
        self.deltas.load_file(k, path)

    def load_optimizer(self, k, tensors, kinds, device):
        found = _optimizer_states(tensors, kinds, device)
        self.optimizer.load_run_state(k, [found.get(i, {}) for i in range(len(self.deltas.names))])

    def state(self, k) -> dict:
        return self.deltas.state(k)

    def optimizer_states(self, k):
        return [(i, st) for i, st in enumerate(self.optimizer.run_state(k)) if st]

    def forward_backward(self, parts, device, precision, pad_id) -> list:
        """One forward of every part's rows (block by block, each through its run's delta); each run's
        loss is the token mean over its own rows, as the model's own loss of its batch alone."""
        batch = concat_batches([mb for _, mb, _ in parts], pad_id)
        sizes = [len(mb["index"]) for _, mb, _ in parts]
        inputs = _to(batch, device)
        labels = inputs.pop("labels")
        with self.deltas.rows([k for k, _, _ in parts], sizes), autocast(device, precision):
            logits = self.model(**inputs, decoder_input_ids=self.model._shift_right(labels), use_cache=False).logits
            losses = [torch.nn.functional.cross_entropy(lg.reshape(-1, lg.shape[-1]), lb.reshape(-1), ignore_index=-100)
                      * scale for lg, lb, (_, _, scale) in zip(logits.split(sizes), labels.split(sizes), parts)]
            total = torch.stack(losses).sum()
        total.backward()
        return torch.stack([x.detach().float() for x in losses]).tolist()

    def step(self, ks, max_grad_norm):
        from pewe.stacked import clip_grad_norms  # noqa: PLC0415

        clip_grad_norms(self.deltas.parameters(), max_grad_norm, ks)
        self.optimizer.step(ks)
        self.deltas.zero_grad()

    def predict(self, tokenizer, items, settings, device, desc) -> list:
        return predict_runs(self.model, self.deltas, tokenizer, items, settings.predict_batch_size,
                            settings.max_output_length, device, settings.precision, desc=desc,
                            progress=settings.progress, max_rows=decode_rows(settings, device, len(items)))


# --------------------------------------------------------------------------- training

@dataclasses.dataclass
class Run:
    """One run of ``train_runs``: what ``train`` takes, for one run."""
    train_rows: object
    dev_rows: object
    metric: str
    settings: TrainSettings
    out_dir: Path
    init_checkpoint: object = None  # start from this delta file (unless the run resumes)
    init_state: dict | None = None  # else from these tensors (None: the delta the model carries)
    meta: dict | None = None  # recorded in the checkpoints
    step_budgets: tuple = ()  # update counts at which the dev score is also recorded


# a lockstep group shares its batches and its decoding, so these settings must be the same
SHARED_SETTINGS = ("batch_size", "max_grad_norm", "predict_batch_size", "max_output_length", "precision", "progress")


def check_group(runs):
    """Refuse a lockstep group whose runs cannot share their forwards."""
    if not runs:
        raise ValueError("no runs to train")
    for name in SHARED_SETTINGS:
        values = {getattr(r.settings, name) for r in runs}
        if len(values) > 1:
            raise UserError(f"runs trained together must share {name} (got {sorted(map(str, values))})")
    dirs = [str(Path(r.out_dir).resolve()) for r in runs]
    if len(set(dirs)) != len(dirs):
        raise UserError(f"two runs of one group write into the same folder ({dirs})")


class _RunState:
    """One run's own everything in the loop: counters, data order, losses, files."""

    def __init__(self, k, run: Run):
        self.k, self.run, self.s = k, run, run.settings
        self.out_dir = Path(run.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.resume_path = self.out_dir / "resume.safetensors"
        self.best_path = self.out_dir / "checkpoint-best.safetensors"
        self.meta = dict(run.meta or {})
        self.task = self.meta.get("task", "")
        self.n_rows = len(run.train_rows.input_ids)
        self.per_epoch = math.ceil(self.n_rows / self.s.batch_size)
        self.budgets = set(map(str, run.step_budgets))
        self.c = {"num_updates": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "best_step": 0, "bad": 0,
                  "done": False, "stopped_early": False, "budget_scores": {}, "history": []}
        self.losses = []  # this call's train losses, one per update
        self.stop = False
        self._order, self._order_epoch = None, None

    def start(self, group, device, restore_rng) -> bool:
        """Resume, or load the initial delta; whether the RNG state was restored from a resume file."""
        run, k = self.run, self.k
        if run.init_state is not None:
            group.load_state(k, run.init_state, where=f"{self.out_dir}: initial delta")
        if self.resume_path.exists():
            meta, tensors = _read_resume(self.resume_path)
            group.load_state(k, {n[6:]: v for n, v in tensors.items() if n.startswith("delta.")},
                             where=str(self.resume_path))
            group.load_optimizer(k, tensors, meta["kinds"], device)
            if restore_rng:
                _restore_rng(tensors)
            c = self.c = meta["counters"]
            log.info("resuming %s at update %d (best %s at %d)", self.out_dir, c["num_updates"], c["best"], c["best_step"])
            if can_extend(c, self.s.train_iters):
                c["done"] = False
                if c.get("best_from_last"):  # no validation ran: a run given the larger budget has no best yet
                    c.update(best=None, best_step=0, best_from_last=False)
                log.info("extending %s from %d to %d updates", self.out_dir, c["num_updates"], self.s.train_iters)
            return True
        if run.init_checkpoint is not None:
            group.load_checkpoint(k, run.init_checkpoint)
            log.info("initialised the delta from %s", run.init_checkpoint)
        return False

    def next_rows(self) -> list:
        """The row indices of this run's next update (its own order: a function of its seed and epoch)."""
        c = self.c
        if c["batch_in_epoch"] >= self.per_epoch:
            c["epoch"] += 1
            c["batch_in_epoch"] = 0
        if self._order_epoch != c["epoch"]:
            self._order, self._order_epoch = epoch_order(self.n_rows, self.s.seed, c["epoch"]), c["epoch"]
        start = c["batch_in_epoch"] * self.s.batch_size
        return self._order[start:start + self.s.batch_size]

    def count_update(self, total, t0):
        """After an update: counters and the log; whether this update is decoded (a budget, a validation)."""
        c, s = self.c, self.s
        c["batch_in_epoch"] += 1
        c["num_updates"] += 1
        self.losses.append(total)
        n = c["num_updates"]
        if n % s.log_interval == 0:
            mean = sum(self.losses[-s.log_interval:]) / len(self.losses[-s.log_interval:])
            log.info("%s update %d: train loss %.4f (%.2fs/update)", self.task, n, mean,
                     (time.time() - t0) / max(1, len(self.losses)))
        return str(n) in self.budgets or bool(s.valid_interval and n % s.valid_interval == 0)

    def after_update(self, score, group):
        """A budget score, a validation (best delta, early stopping, resume file); ``stop`` when done."""
        c, s = self.c, self.s
        n = c["num_updates"]
        if str(n) in self.budgets:  # a budget that falls on a validation step is decoded once
            c["budget_scores"][str(n)] = score
        if s.valid_interval and n % s.valid_interval == 0:
            recent = self.losses[-s.valid_interval:]
            train_loss = sum(recent) / len(recent)
            c["history"].append([n, score, train_loss])
            if c["best"] is None or (score > c["best"] and train_loss >= 1e-7):
                c.update(best=score, best_step=n, bad=0)
                save_delta(self.best_path, group.state(self.k), group.model.delta_config,
                           **{**self.meta, "dev_score": score, "step": n})
                log.info("%s update %d: dev %.4f (new best)", self.task, n, score)
            else:
                c["bad"] += 1
                log.info("%s update %d: dev %.4f, no gain %d/%d (best %.4f at %d)", self.task, n, score, c["bad"],
                         s.early_stop, c["best"], c["best_step"])
            if s.early_stop > 0 and c["bad"] >= s.early_stop:
                self.stop = c["stopped_early"] = True
            self.save(group)
        if self.stop or n >= s.train_iters:
            self.stop = True
            self.close_epoch()

    def close_epoch(self):
        """A run that leaves at the end of an epoch records the next one (as the loop always has)."""
        if self.c["batch_in_epoch"] >= self.per_epoch:
            self.c["epoch"] += 1
            self.c["batch_in_epoch"] = 0

    def save(self, group):
        _write_resume(self.resume_path, group.state(self.k), group.optimizer_states(self.k), self.c)


def _validate(group, tokenizer, states, device) -> list:
    """The dev score of each run in ``states`` (decoded together), the model back in training mode."""
    if not states:
        return []
    preds = group.predict(tokenizer, [(st.k, st.run.dev_rows) for st in states], states[0].s, device, "dev")
    group.model.train()
    return [evaluate(p, [ex.answers for ex in st.run.dev_rows.examples], st.run.metric) for st, p in zip(states, preds)]


def _finish(group, tokenizer, states, device):
    """Runs that leave: a run without a validation keeps its last delta as its best; done."""
    need = [st for st in states if st.c["best"] is None]  # fewer updates than one validation interval
    for st, score in zip(need, _validate(group, tokenizer, need, device)):
        c = st.c
        c["best"], c["best_step"], c["best_from_last"] = score, c["num_updates"], True
        save_delta(st.best_path, group.state(st.k), group.model.delta_config,
                   **{**st.meta, "dev_score": score, "step": c["num_updates"]})
    for st in states:
        st.c["done"] = True
        st.save(group)


def train(model, tokenizer, train_rows, dev_rows, metric, settings: TrainSettings, out_dir, device,
          init_checkpoint=None, meta=None, step_budgets=()):
    """Tune the model's delta on ``train_rows``; returns a summary dict.

    Writes ``checkpoint-best.safetensors`` (+ .json) and ``resume.safetensors`` in ``out_dir``.
    ``step_budgets``: update counts at which the dev score is also recorded (fixed-budget protocol).
    """
    run = Run(train_rows, dev_rows, metric, settings, Path(out_dir), init_checkpoint, None, meta, tuple(step_budgets))
    return train_runs(model, tokenizer, [run], device)[0]


def train_runs(model, tokenizer, runs, device) -> list:
    """Train ``runs`` (one delta config, on ``model``'s backbone) in lockstep: every forward holds
    one update's rows of every active run. One run trains the model's own delta; several train in
    ``pewe.stacked`` deltas, and the model's own delta is only their scratch buffer. Returns each
    run's summary (its counters), in order."""
    runs = list(runs)
    check_group(runs)
    group = _OwnDelta(model, runs) if len(runs) == 1 else _StackedRuns(model, runs)
    states = [_RunState(k, run) for k, run in enumerate(runs)]
    set_seed(runs[0].settings.seed)  # dropout: one stream for the group (a run alone: its own seed's)
    restored = False
    for st in states:
        restored = st.start(group, device, restore_rng=not restored) or restored
    todo = [st for st in states if not st.c["done"]]
    if todo:
        _train(group, tokenizer, todo, device)
    return [st.c for st in states]


def _forward_chunks(sizes) -> list:
    """(start, end) of consecutive parts whose rows add up to at most ``MAX_FORWARD_ROWS`` (a part is
    never split: each run's gradient still comes from its whole micro-batch)."""
    chunks, start, rows = [], 0, 0
    for i, n in enumerate(sizes):
        if i > start and rows + n > MAX_FORWARD_ROWS:
            chunks.append((start, i))
            start, rows = i, 0
        rows += n
    chunks.append((start, len(sizes)))
    return chunks


def _train(group, tokenizer, todo, device):
    model, s = group.model, todo[0].s
    need = [st for st in todo if "0" in st.budgets and "0" not in st.c["budget_scores"]]
    for st, score in zip(need, _validate(group, tokenizer, need, device)):
        st.c["budget_scores"]["0"] = score
    model.train()
    t0 = time.time()
    bar = tqdm(total=sum(st.s.train_iters for st in todo), initial=sum(st.c["num_updates"] for st in todo),
               desc=todo[0].meta.get("task", "train") if len(todo) == 1 else f"{len(todo)} runs",
               disable=not s.progress, dynamic_ncols=True)
    # a run killed between its last validation and its final write comes back stopped: it only finishes
    active = [st for st in todo if st.c["num_updates"] < st.s.train_iters and not st.c.get("stopped_early")]
    micro = min(s.batch_size, MICRO_BATCH)
    pad_id = tokenizer.pad_token_id
    done = [st for st in todo if st not in active]
    for st in done:
        if st.c.get("stopped_early"):
            st.close_epoch()
    while active:
        rows = [st.next_rows() for st in active]
        totals = [0.0] * len(active)
        for start in range(0, max(len(r) for r in rows), micro):  # a batch above 16 rows: micro-batches
            parts, where = [], []
            for i, (st, r) in enumerate(zip(active, rows)):
                chunk = r[start:start + micro]
                if chunk:
                    parts.append((st.k, collate(st.run.train_rows, chunk, pad_id), len(chunk) / len(r)))
                    where.append(i)
            for lo, hi in _forward_chunks([len(mb["index"]) for _, mb, _ in parts]):  # many runs: several forwards
                for i, value in zip(where[lo:hi], group.forward_backward(parts[lo:hi], device, s.precision, pad_id)):
                    totals[i] += value
        for st, total in zip(active, totals):
            if not math.isfinite(total):  # a NaN would reach every parameter and be saved as the best delta
                raise UserError(f"{st.out_dir}: update {st.c['num_updates'] + 1}: the training loss is {total} "
                                f"(learning rate {st.s.learning_rate:g}); stopped before the update, the run keeps "
                                f"its last validation (try a smaller learning rate)")
        group.step([st.k for st in active], s.max_grad_norm)
        bar.update(len(active))
        decode = [st for st, total in zip(active, totals) if st.count_update(total, t0)]
        scores = dict(zip(map(id, decode), _validate(group, tokenizer, decode, device)))
        for st in active:
            if id(st) in scores or st.c["num_updates"] >= st.s.train_iters:
                st.after_update(scores.get(id(st)), group)
        leaving = [st for st in active if st.stop]
        active = [st for st in active if not st.stop]
        if not active:
            bar.close()
        _finish(group, tokenizer, leaving, device)
    bar.close()
    _finish(group, tokenizer, done, device)


def write_predictions(path, predictions, examples):
    lines = [f"{p}\t{' | '.join(ex.answers)}" for p, ex in zip(predictions, examples)]
    atomic_write_text(path, "prediction\tgold\n" + "\n".join(lines) + "\n")
