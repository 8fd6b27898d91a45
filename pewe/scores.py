"""The score table: every way of scoring a source delta for a target, declared once.

A declaration says what a score is: its direction (``higher_is_more_similar``), what it needs
(``kind``: a forward pass, a gradient, the hidden states, the delta files, or a short tuning of each
(target, source) pair; ``needs_reference``: the delta tuned on the target from random init), how it
is reduced, its default softmax temperature and the unit of that temperature. The similarity engine
(``pewe.similarity``), the weight-file scores (``pewe.delta_scores``), the weighting
(``pewe.weights``, ``pewe.inits``), the study and its report, and the entry scripts all read it.
Adding a score is one function plus its ``@register(...)`` line.

What each score computes (on the target's dev data unless said), and our changes to the original
(telxt/Delta_search, ``t5_trainer.py``):

- ``Loss``: mean token cross-entropy of the source delta on the target's dev labels. Original: the
  model's loss on the first dev batch only (a token mean over that batch). Same; over several batches
  it is the token mean over all of them.
- ``KL``: sum over label tokens of KL(P_target || Q_source), P from the delta tuned on the target from
  random init, Q from the source delta: the original's direction (``scipy.stats.entropy(pk=P, qk=Q)``).
  The original deletes vocabulary entries where either float32 softmax underflows to 0 and
  renormalises; we compute the exact KL from log-softmax, which differs only there.
- ``EL2N``: sum over label tokens of ||softmax(logits) - one_hot(label)||_2.
- ``Cosine_of_Logits_and_Labels``: sum over label tokens of cos(softmax(logits), one_hot(label))
  (= p_label / ||p||_2, eps 1e-6 as torch's CosineSimilarity). Higher = more similar; the original's
  weighting negated it with every other score, which inverted it.
- ``GraNd``: sum over dev batches of the L2 norm of the gradient of the batch loss w.r.t. the delta
  parameters (per block / layer site in those modes), dropout on as the original (seeded here).
- ``block`` (``get_block.py``): per T5 block, sum over dev rows of the cosine between the row's hidden
  states under the source delta and under the random-init-tuned target delta.
- ``Cosine`` (weights): mean over tensors k of cos(flat target_k, flat source_k), target = the delta
  tuned on the target from random init; each tensor counts once whatever its size, as the original.
- ``Euclidean``: sum over tensors k of ||source_k - tuned_k||_2, tuned = the source delta after the
  short tuning on the target. The original sums per-tensor norms (not the norm of the concatenation).
- ``Performance``: dev score after the short tuning minus the source's zero-shot dev score; as the
  original, its initialisation averages the *tuned* deltas (``init_from_tuned``).

Temperatures (``temperature`` in ``temperature_unit``): Loss 0.1, weight Cosine 0.001, Euclidean 0.1
and Performance 0.001 are the paper's. KL, EL2N and the cosine of logits and labels are sums over
label tokens, GraNd a sum over batches, so their scale grows with the answer length or the batch
count; their temperature is per label token (per batch): T_eff = T * count, the softmax of the
per-token mean at T. KL 0.1: KL(P||Q) = CE(P, Q) - H(P) is a cross-entropy in nats per token like
Loss. EL2N and the cosine of logits and labels 0.05: per token they are bounded (<= sqrt 2, <= 1) and,
for a label probability between 0.2 and 0.8, move about half as much as -log p does. GraNd 1.0 per
batch: no reference value exists; the report's "effective sources" shows whether it is degenerate.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable

import torch
import torch.nn.functional as F

from delta_modules import DeltaError
from pewe.errors import UserError

KINDS = {"logits": "a forward pass (label-token logits)", "grad": "a backward pass (delta gradients)",
         "hidden": "a forward pass (hidden states of every block)", "weights": "the delta files",
         "pairs": "a short tuning of every (target, source) pair"}
UNITS = ("", "token", "batch")  # "" = T applies to the score itself; "token" = label token


class ScoreError(UserError):
    """An unknown score, a temperature that cannot be used, or weights that cannot be made from scores."""


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
    name: str
    fn: Callable
    higher_is_more_similar: bool
    kind: str  # a key of KINDS: what computing it needs
    reduction: str  # "sum", "mean" or "difference": how the values are reduced ...
    over: str  # ... over what (label tokens, batches, dev rows, tensors, dev scores)
    needs_reference: bool = False  # compares with the delta tuned on the target from random init
    temperature: float | None = None  # default softmax temperature (None: none is known)
    temperature_unit: str = ""  # T is per this unit when the study's per_token is on
    study: bool = True  # offered by run_study.py (block is an analysis score only)
    init_from_tuned: bool = False  # its initialisation averages the pair-tuned deltas, not the sources

    @property
    def sign(self) -> int:
        """+1: a higher score means a closer source; -1: a lower one does (losses, distances)."""
        return 1 if self.higher_is_more_similar else -1

    @property
    def needs(self) -> str:
        return KINDS[self.kind] + (" and the random-init delta tuned on the target" if self.needs_reference else "")


SCORES: dict = {}


def register(name, *, higher_is_more_similar, kind, reduction, over, needs_reference=False, temperature=None,
             temperature_unit="", study=True, init_from_tuned=False):
    """Declare a score function under ``name``: its one declaration, read everywhere."""
    if kind not in KINDS or temperature_unit not in UNITS:
        raise ValueError(f"score {name}: unknown kind {kind!r} or temperature unit {temperature_unit!r}")

    def deco(fn):
        SCORES[name] = ScoreSpec(name, fn, higher_is_more_similar, kind, reduction, over, needs_reference, temperature,
                                 temperature_unit, study, init_from_tuned)
        return fn
    return deco


# --------------------------------------------------------------------------- forward scores

@dataclasses.dataclass
class TokenOutputs:
    """One dev batch seen by one delta, at its label tokens only (labels != -100, row-major)."""
    logits: torch.Tensor  # (N, V) float32
    labels: torch.Tensor  # (N,)
    ref_logits: torch.Tensor | None = None  # (N, V) float32: the random-init-tuned target delta's


@register("Loss", higher_is_more_similar=False, kind="logits", reduction="mean", over="label tokens", temperature=0.1)
def loss_score(t: TokenOutputs):
    return F.cross_entropy(t.logits, t.labels, reduction="sum")


@register("KL", higher_is_more_similar=False, kind="logits", reduction="sum", over="label tokens", needs_reference=True,
          temperature=0.1, temperature_unit="token")
def kl_score(t: TokenOutputs):
    logp = t.ref_logits.log_softmax(-1)  # P: the target's own delta (reference)
    logq = t.logits.log_softmax(-1)  # Q: the source delta
    return (logp.exp() * (logp - logq)).sum()


@register("EL2N", higher_is_more_similar=False, kind="logits", reduction="sum", over="label tokens", temperature=0.05,
          temperature_unit="token")
def el2n_score(t: TokenOutputs):
    err = t.logits.softmax(-1)
    err[torch.arange(len(err)), t.labels] -= 1.0  # softmax - one_hot
    return err.norm(dim=-1).sum()


@register("Cosine_of_Logits_and_Labels", higher_is_more_similar=True, kind="logits",
          reduction="sum", over="label tokens", temperature=0.05, temperature_unit="token")
def cosine_logits_labels_score(t: TokenOutputs):
    p = t.logits.softmax(-1)
    p_label = p.gather(1, t.labels[:, None]).squeeze(1)  # p . one_hot = p_label; ||one_hot|| = 1
    return (p_label / p.norm(dim=-1).clamp_min(1e-6)).sum()


@register("GraNd", higher_is_more_similar=False, kind="grad", reduction="sum", over="batches", temperature=1.0,
          temperature_unit="batch")
def grand_score(batch_group_sq):
    """``batch_group_sq``: per batch, {group: squared L2 norm of the gradient of that group's delta
    parameters}. Per batch the norm of each group, summed over batches (as the original)."""
    out = {}
    for sq in batch_group_sq:
        for group, value in sq.items():
            out[group] = out.get(group, 0.0) + math.sqrt(value)
    return out


@register("block", higher_is_more_similar=True, kind="hidden", reduction="sum", over="dev rows", needs_reference=True,
          study=False)
def block_cosine_score(h, ref, mask):
    """h, ref (B, T, d) one block's hidden states under the source / reference delta; mask (B, T) the
    valid tokens. Sum over rows of cos(row's valid tokens flattened), eps 1e-6 as torch's."""
    m = mask.unsqueeze(-1).to(h.dtype)
    h, ref = (h * m).flatten(1), (ref * m).flatten(1)  # padding set to 0 adds nothing to dots or norms
    dot = (h * ref).sum(1)
    return (dot / (h.norm(dim=1) * ref.norm(dim=1)).clamp_min(1e-6)).sum()


# --------------------------------------------------------------------------- scores of delta files

def check_same_tensors(a: dict, b: dict, where="deltas"):
    """Two deltas compared tensor by tensor must have the same tensor names and shapes."""
    if set(a) != set(b):
        missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        raise DeltaError(f"{where}: the two deltas have different tensors (only in the first {missing[:3]}, "
                         f"only in the second {extra[:3]})")
    for k in a:
        if a[k].shape != b[k].shape:
            raise DeltaError(f"{where}: {k} has shape {tuple(a[k].shape)} in one delta, {tuple(b[k].shape)} in the other")


def tensor_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """cos(flat x, flat y) in float64; 0 when either is all zeros (as torch's CosineSimilarity)."""
    x, y = x.reshape(-1).double(), y.reshape(-1).double()
    nx, ny = x.norm(), y.norm()
    if nx == 0 or ny == 0:
        return 0.0
    return float(x @ y / (nx * ny))


@register("Cosine", higher_is_more_similar=True, kind="weights", reduction="mean", over="tensors",
          needs_reference=True, temperature=0.001)
def delta_cosine(a: dict, b: dict, where="deltas") -> float:
    """Mean over tensors k of cos(flat a_k, flat b_k): each tensor counts once, whatever its size."""
    check_same_tensors(a, b, where)
    sims = [tensor_cosine(a[k], b[k]) for k in a]
    return math.fsum(sims) / len(sims)


@register("Euclidean", higher_is_more_similar=False, kind="pairs", reduction="sum", over="tensors", temperature=0.1)
def delta_distance(a: dict, b: dict, where="deltas") -> float:
    """Sum over tensors k of ||a_k - b_k||_2 (Frobenius norm of each difference, then summed)."""
    check_same_tensors(a, b, where)
    return math.fsum(float((a[k].double() - b[k].double()).norm()) for k in a)


@register("Performance", higher_is_more_similar=True, kind="pairs", reduction="difference", over="dev scores",
          temperature=0.001, init_from_tuned=True)
def performance_gain(tuned: float, zero_shot: float) -> float:
    """Dev score after the short tuning on the target minus the zero-shot dev score."""
    return float(tuned) - float(zero_shot)


# --------------------------------------------------------------------------- lookups

_ALIASES = {"kl_divergence": "KL", "cosine_of_logits_and_labels": "Cosine_of_Logits_and_Labels",
            "cos": "Cosine", "perf": "Performance"}
STUDY_SCORES = tuple(name for name, s in SCORES.items() if s.study)
DEFAULT_TEMPERATURES = {name: s.temperature for name, s in SCORES.items() if s.study}


def score_spec(name) -> ScoreSpec:
    """The declaration of ``name``; case, spaces and dashes are ignored ("KL-divergence" is KL)."""
    if name in SCORES:
        return SCORES[name]
    key = re.sub(r"[\s\-]+", "_", str(name).strip()).lower()
    found = {k.lower(): k for k in SCORES}.get(key) or _ALIASES.get(key)
    if found is None:
        raise ScoreError(f"unknown metric {name!r}; expected one of {', '.join(SCORES)}")
    return SCORES[found]


def check_temperature(tem, name="temperature"):
    """Refuse a softmax temperature that is not a positive finite number, before any work."""
    if isinstance(tem, bool) or not (isinstance(tem, (int, float)) and math.isfinite(tem) and tem > 0):
        raise ScoreError(f"{name} must be a positive finite number, not {tem!r}")
    return tem


def effective_temperature(spec: ScoreSpec, temperature: float, per_unit: bool, label_tokens: int,
                          batches: int) -> float:
    """T of softmax(sign * score / T): ``temperature`` times the count of its unit when ``per_unit``."""
    if not per_unit or spec.temperature_unit == "":
        return temperature
    return temperature * max(1, label_tokens if spec.temperature_unit == "token" else batches)


def temperature_text(spec: ScoreSpec, temperature: float, per_unit: bool) -> str:
    unit = f" per {spec.temperature_unit}" if per_unit and spec.temperature_unit else ""
    return f"{temperature:g}{unit}"
