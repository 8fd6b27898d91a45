"""Pretraining the embedded backbone: T5 span corruption on bundled train text, mixed with a supervised
multi-task stage on *upstream* tasks (which are then kept out of every transfer study, as T5's own
pre-training mixture was kept apart from its downstream tasks). Dev and test splits are never seen.
"""
from __future__ import annotations

import json
import logging
import math
import random
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from pewe.data import read_tsv, source_text, target_text, tokenize, truncation_side_for
from pewe.metrics import evaluate, metric_for
from pewe.trainer import predict

log = logging.getLogger("pewe")


def span_corrupt(ids, sentinel_ids, rng, noise_density=0.15, mean_span=3.0):
    """T5 span corruption of one token sequence (no EOS): (input ids, target ids).

    ``noise_density`` of the tokens, in spans of ``mean_span`` on average, are replaced in the input by
    one sentinel each; the target lists each sentinel followed by the tokens it replaced.
    """
    n = len(ids)
    n_noise = max(1, round(n * noise_density))
    n_spans = max(1, min(round(n_noise / mean_span), n - n_noise, len(sentinel_ids)))
    # random split of the noise tokens and of the kept tokens into n_spans non-empty segments each
    def segments(total, parts):
        cuts = sorted(rng.sample(range(1, total), parts - 1)) if parts > 1 else []
        return [b - a for a, b in zip([0] + cuts, cuts + [total])]
    noise, keep = segments(n_noise, n_spans), segments(n - n_noise, n_spans)
    inp, tgt, pos = [], [], 0
    for i in range(n_spans):
        inp += ids[pos:pos + keep[i]]
        pos += keep[i]
        inp.append(sentinel_ids[i])
        tgt.append(sentinel_ids[i])
        tgt += ids[pos:pos + noise[i]]
        pos += noise[i]
    tgt.append(sentinel_ids[n_spans])
    return inp, tgt


def load_texts(text_dirs, split="train", exclude=()):
    """(task, input, answers) of every ``*_{split}.tsv`` under the task folders of ``text_dirs``."""
    out = []
    for d in text_dirs:
        for f in sorted(Path(d).glob(f"*/*_{split}.tsv")):
            task = f.parent.name
            if task in exclude:
                continue
            out += [(task, ex.input, ex.answers) for ex in read_tsv(f)]
    return out


class Mixture:
    """Batches of span-corruption and supervised examples, tokenised once."""

    def __init__(self, tokenizer, corpus, supervised, max_input_length, max_target_length, seed):
        self.tok = tokenizer
        self.rng = random.Random(seed)
        self.max_in, self.max_out = max_input_length, max_target_length
        self.sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(100)])
        self.eos = tokenizer.eos_token_id
        self.corpus = [self._ids(task, text) for task, text, _ in corpus]
        self.supervised = [(self._ids(task, text), tokenizer(target_text(a), add_special_tokens=True,
                                                             max_length=max_target_length,
                                                             truncation=True)["input_ids"])
                           for task, text, answers in supervised for a in answers]

    def _ids(self, task, text):
        side = truncation_side_for(task)
        ids = self.tok(source_text(task, text), add_special_tokens=False)["input_ids"]
        limit = self.max_in - 1
        return (ids[-limit:] if side == "left" else ids[:limit]) if len(ids) > limit else ids

    def corrupted(self, ids):
        if len(ids) < 4:
            ids = ids + ids[:4]
        inp, tgt = span_corrupt(ids, self.sentinels, self.rng)
        return inp + [self.eos], (tgt + [self.eos])[: self.max_out]

    def batch(self, size, supervised_fraction):
        pairs = []
        for _ in range(size):
            if self.supervised and self.rng.random() < supervised_fraction:
                src, tgt = self.rng.choice(self.supervised)
                pairs.append((src + [self.eos], tgt))
            else:
                pairs.append(self.corrupted(self.rng.choice(self.corpus)))
        return collate_pairs(pairs, self.tok.pad_token_id)


def supervised_batches(tokenizer, rows, count, size, max_input_length, max_target_length, seed=0):
    """``count`` batches of ``size`` supervised examples drawn from (task, input, answers) rows: fixed
    batches for measuring a model (order_sensitivity), not for training it."""
    mix = Mixture(tokenizer, [], rows, max_input_length, max_target_length, seed)
    return [mix.batch(size, 1.0) for _ in range(count)]


def collate_pairs(pairs, pad_id):
    width_in = max(len(s) for s, _ in pairs)
    width_out = max(len(t) for _, t in pairs)
    input_ids = torch.full((len(pairs), width_in), pad_id, dtype=torch.long)
    mask = torch.zeros_like(input_ids)
    labels = torch.full((len(pairs), width_out), -100, dtype=torch.long)
    for i, (s, t) in enumerate(pairs):
        input_ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
        labels[i, :len(t)] = torch.tensor(t)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


@torch.no_grad()
def heldout_loss(model, batches, device, autocast):
    """Mean token loss over fixed held-out span-corruption batches."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for b in batches:
        with autocast:
            out = model(**{k: v.to(device) for k, v in b.items()})
        n = int((b["labels"] != -100).sum())
        total += out.loss.item() * n
        count += n
    model.train(was)
    return total / count


def shuffled_inputs(batches, seed=0):
    """The same batches with each row's real input tokens in a random order (padding stays last).

    A model blind to word order gives exactly the same output on them (order_sensitivity measures
    the change row by row; the mean loss alone can hide it)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in batches:
        ids = b["input_ids"].clone()
        for i, n in enumerate(b["attention_mask"].sum(1).tolist()):
            ids[i, :n] = ids[i, torch.randperm(n, generator=g)]
        out.append(dict(b, input_ids=ids))
    return out


@torch.no_grad()
def row_losses(model, batch, device, autocast) -> torch.Tensor:
    """Mean token loss of each row of one batch, shape (rows,)."""
    with autocast:
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits.float()
    labels = batch["labels"].to(device)
    mask = labels != -100
    logp = logits.log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return -(logp * mask).sum(1) / mask.sum(1)


def order_sensitivity(model, batches, device, autocast, seed=0) -> float:
    """Mean absolute change of each row's loss when its input words are shuffled: exactly 0 for a
    model blind to word order. (The mean loss itself can stay put while every row changes.)"""
    was = model.training
    model.eval()
    diffs = [(row_losses(model, b, device, autocast) - row_losses(model, s, device, autocast)).abs()
             for b, s in zip(batches, shuffled_inputs(batches, seed))]
    model.train(was)
    return torch.cat(diffs).mean().item()


def position_bias_groups(model, weight_decay=0.01, position_lr_scale=1.0):
    """AdamW parameter groups: T5's relative position bias tables apart, with ``lr_scale``.

    Adam moves a parameter by about the learning rate per update whatever its gradient, and a bias
    entry starts near 0 (std d_model**-0.5); to make attention prefer some distances it must reach
    several units. At lr 6e-4 a few thousand updates cannot get it there, and the model stays
    blind to word order (docs/BACKBONE.md), so these tables get a larger rate and no weight decay."""
    bias, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (bias if "relative_attention_bias" in name else rest).append(p)
    return [{"params": rest, "weight_decay": weight_decay, "lr_scale": 1.0},
            {"params": bias, "weight_decay": 0.0, "lr_scale": position_lr_scale}]


def task_scores(model, tokenizer, examples_by_task, device, precision, max_input_length=512,
                max_output_length=64, batch_size=80):
    """Greedy score of the bare model on each task's examples: {task: (metric, score in [0, 1])}."""
    was = model.training
    out = {}
    for task, examples in examples_by_task.items():
        rows = tokenize(examples, tokenizer, task, max_input_length, max_output_length, one_row_per_answer=False)
        preds = predict(model, tokenizer, rows, batch_size, max_output_length, device, precision)
        metric = metric_for(task)
        out[task] = metric, evaluate(preds, [ex.answers for ex in examples], metric)
    model.train(was)
    return out


def pretrain(model, mixture, heldout, steps, batch_size, lr, warmup, supervised_fraction, device, autocast,
             log_every=100, progress=True, max_seconds=0, position_lr_scale=1.0, probe=None, probe_every=0,
             keep_best_probe=False):
    """AdamW with linear warm-up and cosine decay to 10 %; returns the loss history. ``max_seconds``
    (> 0) ends the run early, after a held-out evaluation, once that much time has passed. The
    relative position bias learns at ``position_lr_scale`` times the rate (position_bias_groups).

    ``probe(model) -> {name: score}`` (higher is better) runs every ``probe_every`` updates and at the
    end; its scores and their mean go into the history row. With ``keep_best_probe`` the model ends
    with the weights of the probe with the best mean (earliest on ties) instead of the last ones, and
    that row is marked ``"kept": True``."""
    groups = position_bias_groups(model, 0.01, position_lr_scale)
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98))

    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        t = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    history, recent, t0, best = [], [], time.time(), None  # best: (probe mean, update, weights)
    model.train()
    bar = tqdm(range(steps), desc="pretrain", disable=not progress, dynamic_ncols=True)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["lr_scale"]
        b = mixture.batch(batch_size, supervised_fraction)
        with autocast:
            loss = model(**{k: v.to(device) for k, v in b.items()}).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        recent.append(loss.item())
        out_of_time = max_seconds > 0 and time.time() - t0 > max_seconds
        last = step + 1 == steps or out_of_time
        probing = probe is not None and (last or (probe_every > 0 and (step + 1) % probe_every == 0))
        if (step + 1) % log_every == 0 or last or probing:
            held = heldout_loss(model, heldout, device, autocast)
            row = {"step": step + 1, "train_loss": sum(recent) / max(1, len(recent)), "heldout_loss": held,
                   "lr": lr_at(step), "seconds": round(time.time() - t0, 1)}
            if probing:
                row["probe"] = probe(model)
                row["probe_mean"] = sum(row["probe"].values()) / max(1, len(row["probe"]))
                if keep_best_probe and (best is None or row["probe_mean"] > best[0]):
                    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    best = row["probe_mean"], step + 1, weights
            history.append(row)
            recent = []
            bar.set_postfix(train=f"{row['train_loss']:.3f}", heldout=f"{held:.3f}",
                            **({"probe": f"{row['probe_mean']:.3f}"} if probing else {}))
            log.info(json.dumps(row))
        if out_of_time:
            log.warning("stopped after %d of %d updates: max_seconds=%s reached", step + 1, steps, max_seconds)
            break
    if best is not None:
        next(row for row in history if row["step"] == best[1])["kept"] = True
        if best[1] != history[-1]["step"]:
            model.load_state_dict(best[2])
            log.info("kept the weights of update %d (best mean probe score %.4f)", best[1], best[0])
    return history
