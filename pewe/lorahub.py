"""LoraHub's weight search (Huang et al. 2023, sail-sg/lorahub), for any delta method.

One weight per source, w in [-bound, bound]^n, found by nevergrad's ``NGOpt`` with a budget of
``budget`` evaluations, minimising

    loss(sum_i w_i delta_i) + l1 * mean_i |w_i|

where the loss is that of the combined delta on the target's few-shot TRAIN split (never dev or
test). The combination is LoraHub's: the weighted sum of the delta tensors, parameter by parameter
(for LoRA A and B separately, as the paper's rule), so it works for adapters, LoRA and prefix
alike. The result is nevergrad's recommendation, as LoraHub returns it. Defaults are LoraHub's:
start at 0, bound 1.5, budget 40, l1 0.05.

The loss (``TrainSplitLoss``): the mean cross-entropy over every label token of the split
(``loss_mode="mean"``, the default), which is LoraHub's when its default single batch holds every
example; LoraHub's own formula, the sum of the batch-mean losses divided by the number of examples
(``loss_mode="lorahub"``), divides that again by the number of examples. For LoraHub's 5 examples
this is a factor 1/5; for a 64-shot split 1/64, which would leave the L1 term dominant and the
weights near 0, so it is an option and not the default.

Seeded: nevergrad draws from ``parametrization.random_state``, set to ``RandomState(seed)``
(LoraHub seeds numpy's global generator instead; the global generators are left alone here). With
LoraHub's budget and a noise-free objective, NGOpt (nevergrad 1.0.12) hands the search to a
deterministic optimizer (scipy's COBYLA), so there the seed changes nothing: the
same inputs give the same weights whatever the seed.
"""
from __future__ import annotations

import dataclasses
import math
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from delta_modules import delta_named_parameters, delta_state_dict, load_delta_state
from pewe.data import batches
from pewe.errors import UserError
from pewe.model import autocast

LORAHUB_DEFAULTS = {
    "lorahub_budget": 40,  # loss evaluations of the search (LoraHub: 40 for 20 modules)
    "lorahub_bound": 1.5,  # each weight in [-bound, bound] (LoraHub: 1.5)
    "lorahub_l1": 0.05,  # coefficient of mean |w| added to the loss (LoraHub: 0.05)
    "lorahub_loss": "mean",  # "mean": token-mean loss of the split; "lorahub": sum of batch means / examples
    "lorahub_batch_size": 16,  # rows per forward of the loss (the value does not change "mean")
}
LOSS_MODES = ("mean", "lorahub")


class LoraHubError(UserError):
    """A LoraHub search that cannot be run (bad option, no loss to evaluate)."""


def check_lorahub_params(params: dict) -> dict:
    """LORAHUB_DEFAULTS updated with ``params``, each checked."""
    out = dict(LORAHUB_DEFAULTS)
    for k, v in params.items():
        if k not in LORAHUB_DEFAULTS:
            raise LoraHubError(f"unknown LoraHub option {k!r}; expected one of {', '.join(LORAHUB_DEFAULTS)}")
        out[k] = v
    for k in ("lorahub_budget", "lorahub_batch_size"):
        if isinstance(out[k], bool) or not isinstance(out[k], int) or out[k] < 1:
            raise LoraHubError(f"{k} must be a whole number >= 1, not {out[k]!r}")
    for k in ("lorahub_bound", "lorahub_l1"):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise LoraHubError(f"{k} must be a finite number >= 0, not {v!r}")
    if out["lorahub_bound"] == 0:
        raise LoraHubError("lorahub_bound must be > 0")
    if out["lorahub_loss"] not in LOSS_MODES:
        raise LoraHubError(f"lorahub_loss must be one of {', '.join(LOSS_MODES)}, not {out['lorahub_loss']!r}")
    return out


@dataclasses.dataclass
class SearchResult:
    weights: list  # nevergrad's recommendation, one per source
    evaluations: int  # calls of the loss
    best_objective: float  # the smallest objective evaluated (loss + l1 term)
    seconds: float


def search(loss_of, n: int, start=None, *, budget=40, bound=1.5, l1=0.05, seed=0) -> SearchResult:
    """LoraHub's search: ``NGOpt`` over w in [-bound, bound]^n from ``start`` (default 0) with
    ``budget`` evaluations of loss_of(w) + l1 * mean|w|; ``loss_of`` takes a list of n floats."""
    import nevergrad as ng  # imported here: it pulls in scipy and scikit-learn, which nothing else needs

    w0 = np.zeros(n) if start is None else np.clip(np.asarray(start, dtype=np.float64), -bound, bound)
    if w0.shape != (n,):
        raise LoraHubError(f"start weights have shape {w0.shape}, expected ({n},)")
    parametrization = ng.p.Array(init=w0, lower=-bound, upper=bound)
    parametrization.random_state = np.random.RandomState(int(seed) % (2 ** 32))
    optimizer = ng.optimizers.NGOpt(parametrization=parametrization, budget=int(budget))
    seen = []

    def objective(w):
        value = float(loss_of([float(x) for x in w])) + l1 * float(np.abs(w).mean())
        if not math.isfinite(value):
            value = float("inf")  # a combination that overflows: the worst, not an error
        seen.append(value)
        return value

    start_time = time.perf_counter()
    with warnings.catch_warnings():  # scipy's COBYLA, under NGOpt, warns of its own defaults at every search
        warnings.filterwarnings("ignore", message=".*COBYLA: Invalid RHOEND.*")
        recommendation = optimizer.minimize(objective)
    return SearchResult([float(x) for x in recommendation.value], len(seen), min(seen),
                        time.perf_counter() - start_time)


class TrainSplitLoss:
    """loss_of(weights) for one target: the loss of sum_s w_s delta_s on its few-shot train rows.

    ``deltas``: {source: {key: tensor}}, stacked once into (n_sources, P) on the model's device;
    each call loads the combination into the model's delta and runs one no-grad forward per batch.
    Use it as a context manager: the model's own delta is put back at the end."""

    def __init__(self, model, tokenizer, rows, deltas: dict, device, precision="fp32", batch_size=16,
                 mode="mean"):
        if mode not in LOSS_MODES:
            raise LoraHubError(f"lorahub_loss must be one of {', '.join(LOSS_MODES)}, not {mode!r}")
        self.model, self.device, self.precision, self.mode = model, device, precision, mode
        self.sources = list(deltas)
        self.keys = [k for k, _ in delta_named_parameters(model)]
        self.shapes = {k: tuple(p.shape) for k, p in delta_named_parameters(model)}
        first = deltas[self.sources[0]]
        if set(first) != set(self.keys):
            raise LoraHubError("the source deltas' tensors are not the model's delta")
        self.stack = torch.stack([torch.cat([deltas[s][k].reshape(-1).to(torch.float32) for k in self.keys])
                                  for s in self.sources]).to(device)  # (n_sources, P)
        self.batches = list(batches(rows, batch_size, tokenizer.pad_token_id))
        self.n_examples = len(rows.examples)
        self.calls = 0
        self._saved = None

    def __enter__(self):
        self._saved = {k: v.clone() for k, v in delta_state_dict(self.model).items()}
        return self

    def __exit__(self, *exc):
        load_delta_state(self.model, self._saved)
        self._saved = None
        return False

    def combined(self, weights) -> dict:
        w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=self.stack.device)
        flat = w @ self.stack  # (P,)
        sizes = [math.prod(s) for s in self.shapes.values()]
        return {k: part.view(shape) for (k, shape), part in zip(self.shapes.items(), flat.split(sizes))}

    @torch.no_grad()
    def __call__(self, weights) -> float:
        """The loss of the combination with ``weights`` (a list in source order, or {source: w})."""
        if isinstance(weights, dict):
            weights = [weights.get(s, 0.0) for s in self.sources]
        self.calls += 1
        load_delta_state(self.model, self.combined(weights))
        self.model.eval()
        total, tokens, batch_means = 0.0, 0, 0.0
        for batch in self.batches:
            inputs = {k: batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels")}
            with autocast(self.device, self.precision):
                logits = self.model(**inputs, use_cache=False).logits
            labels = inputs["labels"]
            ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                 reduction="sum")
            count = int((labels != -100).sum())
            total, tokens = total + float(ce), tokens + count
            batch_means += float(ce) / max(count, 1)
        if self.mode == "lorahub":
            return batch_means / max(self.n_examples, 1)
        return total / max(tokens, 1)
