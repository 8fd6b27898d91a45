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
from pewe.data import batches, epoch_order
from pewe.errors import UserError
from pewe.metrics import evaluate
from pewe.model import autocast

log = logging.getLogger("pewe")
MICRO_BATCH = 16  # the original's largest per-step batch; larger batches are accumulated
PRECISIONS = ("fp32", "bf16")
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
        for text in tokenizer.batch_decode(ids, skip_special_tokens=False):
            text = _SENTINEL.sub("", text)
            for tok in (tokenizer.pad_token, tokenizer.eos_token):
                if tok:
                    text = text.replace(tok, "")
            out.append(text.strip())
    return out


def score_rows(model, tokenizer, rows, metric, settings, device, desc=None):
    """(score, predictions) of a split tokenised one row per example."""
    preds = predict(model, tokenizer, rows, settings.predict_batch_size, settings.max_output_length, device,
                    settings.precision, desc=desc, progress=settings.progress)
    return evaluate(preds, [ex.answers for ex in rows.examples], metric), preds


# --------------------------------------------------------------------------- resume state

def _optimizer_tensors(optimizer, params):
    """Flatten Adafactor state to tensors; python scalars become float64 0-d tensors."""
    index = {id(p): i for i, p in enumerate(params)}
    tensors, kinds = {}, {}
    for p, st in optimizer.state.items():
        for k, v in st.items():
            key = f"optim.{index[id(p)]}.{k}"
            if isinstance(v, torch.Tensor):
                tensors[key] = v.detach().cpu().contiguous()
            else:
                tensors[key] = torch.tensor(float(v), dtype=torch.float64)
                kinds[key] = type(v).__name__
    return tensors, kinds


def _restore_optimizer(optimizer, params, tensors, kinds, device):
    for key, v in tensors.items():
        if not key.startswith("optim."):
            continue
        _, i, k = key.split(".", 2)
        p = params[int(i)]
        kind = kinds.get(key)
        value = v.to(device) if kind is None else (int(v.item()) if kind == "int" else float(v.item()))
        optimizer.state[p][k] = value


def save_resume(path, model, optimizer, params, counters: dict):
    tensors = {f"delta.{k}": v.cpu().contiguous() for k, v in delta_state_dict(model).items()}
    opt, kinds = _optimizer_tensors(optimizer, params)
    tensors.update(opt)
    tensors["rng.cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    meta = {"counters": json.dumps(counters), "kinds": json.dumps(kinds)}
    atomic_write_bytes(path, save(tensors, metadata=meta))


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


def load_resume(path, model, optimizer, params, device) -> dict:
    meta, tensors = _read_resume(path)
    load_delta_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("delta.")}, where=str(path))
    _restore_optimizer(optimizer, params, tensors, meta["kinds"], device)
    torch.set_rng_state(tensors["rng.cpu"])
    gpus = sorted((k for k in tensors if k.startswith("rng.cuda.")), key=lambda k: int(k.rsplit(".", 1)[1]))
    if gpus and torch.cuda.is_available():  # device order (rng.cuda.10 after .2); only the GPUs visible now
        torch.cuda.set_rng_state_all([tensors[k] for k in gpus][:torch.cuda.device_count()])
    return meta["counters"]


# --------------------------------------------------------------------------- training

def train(model, tokenizer, train_rows, dev_rows, metric, settings: TrainSettings, out_dir, device,
          init_checkpoint=None, meta=None, step_budgets=()):
    """Tune the model's delta on ``train_rows``; returns a summary dict.

    Writes ``checkpoint-best.safetensors`` (+ .json) and ``resume.safetensors`` in ``out_dir``.
    ``step_budgets``: update counts at which the dev score is also recorded (fixed-budget protocol).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resume_path = out_dir / "resume.safetensors"
    best_path = out_dir / "checkpoint-best.safetensors"
    meta = dict(meta or {})
    params = [p for _, p in delta_named_parameters(model)]
    optimizer = make_optimizer(params, settings.learning_rate)
    micro = min(settings.batch_size, MICRO_BATCH)
    n_rows = len(train_rows.input_ids)
    per_epoch = math.ceil(n_rows / settings.batch_size)

    c = {"num_updates": 0, "epoch": 0, "batch_in_epoch": 0, "best": None, "best_step": 0, "bad": 0,
         "done": False, "stopped_early": False, "budget_scores": {}, "history": []}
    set_seed(settings.seed)
    if resume_path.exists():
        c = load_resume(resume_path, model, optimizer, params, device)
        log.info("resuming %s at update %d (best %s at %d)", out_dir, c["num_updates"], c["best"], c["best_step"])
        if can_extend(c, settings.train_iters):
            c["done"] = False
            if c.get("best_from_last"):  # no validation ran: a run given the larger budget has no best yet
                c.update(best=None, best_step=0, best_from_last=False)
            log.info("extending %s from %d to %d updates", out_dir, c["num_updates"], settings.train_iters)
    elif init_checkpoint is not None:
        load_delta(model, init_checkpoint)
        log.info("initialised the delta from %s", init_checkpoint)
    if c["done"]:
        return c

    def validate():
        score, _ = score_rows(model, tokenizer, dev_rows, metric, settings, device, desc="dev")
        model.train()
        return score

    if 0 in step_budgets and "0" not in c["budget_scores"]:
        c["budget_scores"]["0"] = validate()
    model.train()
    losses, t0 = [], time.time()
    bar = tqdm(total=settings.train_iters, initial=c["num_updates"], desc=meta.get("task", "train"),
               disable=not settings.progress, dynamic_ncols=True)
    stop = False
    while not stop and c["num_updates"] < settings.train_iters:
        order = epoch_order(n_rows, settings.seed, c["epoch"])
        while c["batch_in_epoch"] < per_epoch:
            start = c["batch_in_epoch"] * settings.batch_size
            rows = order[start:start + settings.batch_size]
            total = 0.0
            for mb in batches(train_rows, micro, tokenizer.pad_token_id, order=rows):
                with autocast(device, settings.precision):
                    loss = model(**_to(mb, device)).loss * (len(mb["index"]) / len(rows))
                loss.backward()
                total += loss.item()
            if not math.isfinite(total):  # a NaN would reach every parameter and be saved as the best delta
                raise UserError(f"{out_dir}: update {c['num_updates'] + 1}: the training loss is {total} (learning rate "
                                f"{settings.learning_rate:g}); stopped before the update, the run keeps its last "
                                f"validation (try a smaller learning rate)")
            torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            c["batch_in_epoch"] += 1
            c["num_updates"] += 1
            losses.append(total)
            bar.update(1)
            n = c["num_updates"]
            if n % settings.log_interval == 0:
                mean = sum(losses[-settings.log_interval:]) / len(losses[-settings.log_interval:])
                bar.set_postfix(loss=f"{mean:.4f}")
                log.info("%s update %d: train loss %.4f (%.2fs/update)", meta.get("task", ""), n, mean,
                         (time.time() - t0) / max(1, len(losses)))
            score = None  # a budget that falls on a validation step is decoded once
            if str(n) in map(str, step_budgets):
                score = c["budget_scores"][str(n)] = validate()
            if settings.valid_interval and n % settings.valid_interval == 0:
                recent = losses[-settings.valid_interval:]
                train_loss = sum(recent) / len(recent)
                score = validate() if score is None else score
                c["history"].append([n, score, train_loss])
                if c["best"] is None or (score > c["best"] and train_loss >= 1e-7):
                    c.update(best=score, best_step=n, bad=0)
                    save_delta(best_path, delta_state_dict(model), model.delta_config,
                               **{**meta, "dev_score": score, "step": n})
                    log.info("%s update %d: dev %.4f (new best)", meta.get("task", ""), n, score)
                else:
                    c["bad"] += 1
                    log.info("%s update %d: dev %.4f, no gain %d/%d (best %.4f at %d)", meta.get("task", ""),
                             n, score, c["bad"], settings.early_stop, c["best"], c["best_step"])
                if settings.early_stop > 0 and c["bad"] >= settings.early_stop:
                    stop = c["stopped_early"] = True
                save_resume(resume_path, model, optimizer, params, c)
            if stop or n >= settings.train_iters:
                stop = True
                break
        if c["batch_in_epoch"] >= per_epoch:
            c["epoch"] += 1
            c["batch_in_epoch"] = 0
    bar.close()
    if c["best"] is None:  # fewer updates than one validation interval: the last delta is the best
        c["best"] = validate()
        c["best_step"] = c["num_updates"]
        c["best_from_last"] = True
        save_delta(best_path, delta_state_dict(model), model.delta_config,
                   **{**meta, "dev_score": c["best"], "step": c["num_updates"]})
    c["done"] = True
    save_resume(resume_path, model, optimizer, params, c)
    return c


def write_predictions(path, predictions, examples):
    lines = [f"{p}\t{' | '.join(ex.answers)}" for p, ex in zip(predictions, examples)]
    atomic_write_text(path, "prediction\tgold\n" + "\n".join(lines) + "\n")
