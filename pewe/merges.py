"""The peers' ways of merging deltas (mergekit, peft's ``add_weighted_adapter``), as small pure functions.

A merge is one function of a list of same-shape tensors (one per source) and their weights, with
``@register_merge(name, ...)`` above it; ``merge_deltas`` applies it to whole deltas:

- adapters and prefix: parameter by parameter, on the raw tensors (the task vector of a delta is the
  delta itself, base 0, as the paper and LoraHub take it). These deltas are two matrices around a
  nonlinearity (adapter: act(h down) up; prefix: up(tanh(down(E)))), so no product of their
  parameters is the "weight change" of a layer: parameter space is the only place they can be merged.
- LoRA: on each module's delta weight deltaW_i = scale * B_i A_i (out, in), then back to rank r by
  truncated SVD. Trimming by magnitude and electing signs are not defined on A and B (A G and
  G^-1 B give the same deltaW for any invertible G, with other entries and signs), while deltaW is
  what the layer adds; the SVD brings the result back to a LoRA of the same shape, so it is an
  initialisation tune_hps_singletask.py can train. Split: scale * B' A' = the best rank-r
  approximation U_r S_r V_r^T of the merged deltaW, with B' = U_r sqrt(S_r / scale) and
  A' = sqrt(S_r / scale) V_r^T (balanced: B' and A' have the same singular values, so neither
  factor starts much larger than the other). A direction with singular value 0 starts at 0 in both
  factors and then receives no gradient; a merged deltaW of rank >= r (the usual case with two or
  more sources) has none.

The rules and their defaults (``MERGE_DEFAULTS``, overridable per study or script):

- ``task_arithmetic``: lambda * sum_i w_i t_i (mergekit; lambda 1).
- ``ties``: each t_i trimmed to its ``ties_density`` share of largest |entries| (at least one
  entry; peft's guide uses density 0.2), the sign elected per entry as the sign of sum_i w_i t~_i
  (mergekit's "sum"; 0 counts as +), then the disjoint mean sum_i w_i t~_i m_i / sum_i w_i m_i over
  the sources whose w_i t~_i has the elected sign (m_i; an entry nobody keeps stays 0), times lambda.
  This is mergekit's ties (sign from the weighted deltas, normalised by the agreeing weights); peft
  elects on the unweighted trimmed deltas and divides by the number of agreeing sources instead,
  which with weights summing to 1 shrinks the result by the number of sources.
- ``dare_linear``: each t_i has each entry dropped with probability ``dare_drop`` and the rest
  multiplied by 1 / (1 - dare_drop) (DARE's rescale, as peft and the original DARE code; current
  mergekit matches the L1 norm instead), then lambda * sum_i w_i t^_i (mergekit: not normalised).
  Default drop 0.8: peft's guide uses density 0.2 for its DARE example; mergekit's density default
  1.0 drops nothing.
- ``dare_ties``: the same drop and rescale, then the sign election of ``ties`` and
  lambda * sum_i w_i t^_i m_i, not divided by the agreeing weights (mergekit's dare_ties default).
- ``lora_exact``: sum_i w_i scale B_i A_i, exactly, back to rank r (LoRA only). The paper and
  LoraHub instead average A and B separately, scale (sum w_i B_i)(sum w_i A_i), which has cross
  terms B_i A_j; ``lora_product_error`` measures the difference.

Random drops draw from a ``torch.Generator`` (``merge_rng``: the seed and the target's name), key by
key in sorted key order (the order of a file's keys as safetensors loads them can change from one
process to the next), so a merge is a deterministic function of its inputs and seed.
"""
from __future__ import annotations

import dataclasses
import math
import zlib
from typing import Callable

import torch

from pewe.errors import UserError

MERGE_DEFAULTS = {
    "lambda": 1.0,  # mergekit's global scale of the merged task vector (task_arithmetic, ties, dare_*)
    "ties_density": 0.2,  # share of each delta's entries that ties keeps (largest |x|); peft's guide: 0.2
    "dare_drop": 0.8,  # DARE's drop probability p (kept entries x 1/(1-p)); peft's guide: density 0.2
}


class MergeError(UserError):
    """A merge that cannot be made (bad parameter, a method it does not apply to)."""


@dataclasses.dataclass(frozen=True)
class MergeSpec:
    name: str
    fn: Callable  # (tensors: list, weights: list[float], params: dict, rng) -> tensor
    params: tuple  # the names of MERGE_DEFAULTS it reads
    lora_only: bool = False


MERGES: dict = {}


def register_merge(name, *, params=(), lora_only=False):
    def deco(fn):
        MERGES[name] = MergeSpec(name, fn, tuple(params), lora_only)
        return fn
    return deco


# --------------------------------------------------------------------------- per-tensor rules

def weighted_sum(tensors, weights) -> torch.Tensor:
    """sum_i w_i t_i in float32."""
    out = torch.zeros_like(tensors[0], dtype=torch.float32)
    for t, w in zip(tensors, weights):
        out.add_(t.to(torch.float32), alpha=float(w))
    return out


def magnitude_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    """t with all but its k = max(1, int(density * numel)) largest |entries| set to 0."""
    flat = t.reshape(-1)
    k = max(1, int(density * flat.numel()))
    if k >= flat.numel():
        return t.clone()
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat.abs(), k, sorted=False).indices] = True
    return torch.where(keep, flat, torch.zeros_like(flat)).view_as(t)


def random_drop(t: torch.Tensor, drop: float, rng: torch.Generator) -> torch.Tensor:
    """DARE: each entry kept with probability 1 - drop, the kept ones divided by 1 - drop."""
    if drop == 0:
        return t.clone()
    keep = torch.rand(t.shape, generator=rng) >= drop  # P(keep) = 1 - drop
    return torch.where(keep, t / (1 - drop), torch.zeros_like(t))


def elect_and_merge(tensors, weights, normalize: bool) -> torch.Tensor:
    """TIES' sign election and disjoint merge (mergekit's "sum" consensus): the elected sign is that
    of sum_i w_i t_i (>= 0: +); m_i = [sign(w_i t_i) == elected]; the result is
    sum_i w_i t_i m_i, divided by sum_i w_i m_i (0 -> 1) when ``normalize``."""
    weighted = torch.stack([t.to(torch.float32) * float(w) for t, w in zip(tensors, weights)])  # (n, *shape)
    elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    mask = weighted.sign() == elected
    mixed = (weighted * mask).sum(0)
    if not normalize:
        return mixed
    w = torch.tensor([float(x) for x in weights], dtype=torch.float32).view(-1, *[1] * tensors[0].dim())
    divisor = (w * mask).sum(0)
    return mixed / torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)


@register_merge("task_arithmetic", params=("lambda",))
def task_arithmetic(tensors, weights, params, rng=None):
    return params["lambda"] * weighted_sum(tensors, weights)


@register_merge("ties", params=("lambda", "ties_density"))
def ties(tensors, weights, params, rng=None):
    trimmed = [magnitude_trim(t.to(torch.float32), params["ties_density"]) for t in tensors]
    return params["lambda"] * elect_and_merge(trimmed, weights, normalize=True)


@register_merge("dare_linear", params=("lambda", "dare_drop"))
def dare_linear(tensors, weights, params, rng):
    dropped = [random_drop(t.to(torch.float32), params["dare_drop"], rng) for t in tensors]
    return params["lambda"] * weighted_sum(dropped, weights)


@register_merge("dare_ties", params=("lambda", "dare_drop"))
def dare_ties(tensors, weights, params, rng):
    dropped = [random_drop(t.to(torch.float32), params["dare_drop"], rng) for t in tensors]
    return params["lambda"] * elect_and_merge(dropped, weights, normalize=False)


@register_merge("lora_exact", lora_only=True)
def lora_exact(tensors, weights, params, rng=None):
    return weighted_sum(tensors, weights)  # on deltaW = scale * B A: the exact weighted sum of the products


# --------------------------------------------------------------------------- parameters

def check_merge_params(params: dict) -> dict:
    """MERGE_DEFAULTS updated with ``params``, each checked: lambda finite, densities and drop rates in range."""
    out = dict(MERGE_DEFAULTS)
    for k, v in params.items():
        if k not in MERGE_DEFAULTS:
            raise MergeError(f"unknown merge option {k!r}; expected one of {', '.join(MERGE_DEFAULTS)}")
        out[k] = v
    for k in ("lambda", "ties_density", "dare_drop"):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise MergeError(f"{k} must be a finite number, not {v!r}")
    if not 0 < out["ties_density"] <= 1:
        raise MergeError(f"ties_density must be in (0, 1], not {out['ties_density']!r}")
    if not 0 <= out["dare_drop"] < 1:
        raise MergeError(f"dare_drop must be in [0, 1), not {out['dare_drop']!r}")
    return out


def merge_rng(seed: int, target: str) -> torch.Generator:
    """The generator of a target's random drops: a function of the seed and the target's name only."""
    return torch.Generator().manual_seed((int(seed) * 1_000_003 + zlib.crc32(target.encode())) % (2 ** 63))


# --------------------------------------------------------------------------- whole deltas

def lora_pairs(keys) -> dict:
    """{module prefix: (A key, B key)} of a LoRA delta's keys (``....lora.A`` (r, in), ``....lora.B`` (out, r))."""
    keys = set(keys)
    return {k[:-2]: (k, k[:-2] + ".B") for k in sorted(keys) if k.endswith(".A") and k[:-2] + ".B" in keys}


def lora_scale(config) -> float:
    return config.lora_alpha / config.lora_r


def lora_factors(delta_w: torch.Tensor, r: int, scale: float):
    """(B' (out, r), A' (r, in)) with scale * B' A' = the best rank-r approximation of ``delta_w``:
    B' = U_r sqrt(S_r / scale), A' = sqrt(S_r / scale) V_r^T (zero columns / rows past the rank)."""
    u, s, vh = torch.linalg.svd(delta_w.to(torch.float32), full_matrices=False)
    root = torch.sqrt(s[:r] / scale)  # (min(r, rank),)
    b = torch.zeros(delta_w.shape[0], r)
    a = torch.zeros(r, delta_w.shape[1])
    b[:, :len(root)] = u[:, :r] * root
    a[:len(root)] = root[:, None] * vh[:r]
    return b, a


def merge_deltas(merge: str, deltas: list, weights: list, config, rng=None, params=None) -> dict:
    """The merged delta {key: tensor} of ``deltas`` (list of {key: tensor}, same keys and shapes)
    with ``weights`` (one per delta) by the rule ``merge``; LoRA in deltaW space (module docstring)."""
    spec = MERGES[merge]
    if len(deltas) != len(weights) or not deltas:
        raise MergeError(f"{merge}: {len(deltas)} deltas and {len(weights)} weights")
    if spec.lora_only and config.method != "lora":
        raise MergeError(f"{merge} applies to LoRA deltas only, not {config.method}")
    params = check_merge_params(params or {})
    keys = sorted(deltas[0])  # sorted: a loaded file's key order may differ between processes
    out = {}
    pairs = lora_pairs(keys) if config.method == "lora" else {}
    paired = {k for ab in pairs.values() for k in ab}
    scale = lora_scale(config) if pairs else None
    for k in keys:  # random drops are drawn in this order
        if k in paired:
            if not k.endswith(".A"):
                continue
            a_key, b_key = pairs[k[:-2]]
            products = [scale * d[b_key].to(torch.float32) @ d[a_key].to(torch.float32) for d in deltas]  # (out, in)
            merged = spec.fn(products, weights, params, rng)
            out[b_key], out[a_key] = lora_factors(merged, deltas[0][a_key].shape[0], scale)
        else:
            out[k] = spec.fn([d[k] for d in deltas], weights, params, rng).to(torch.float32)
    return {k: out[k].contiguous() for k in deltas[0]}


def lora_product_error(deltas: list, weights: list, config) -> float:
    """How far the paper's rule (and LoraHub's) is from the exact weighted sum of the LoRA products:
    ||s (sum w B)(sum w A) - s sum w B A||_F / ||s sum w B A||_F, both norms over every module of
    the delta at once (the relative error of the whole deltaW, not a mean of per-module ratios);
    NaN when the exact sum is 0. Computed in float64."""
    if config.method != "lora":
        raise MergeError(f"lora_product_error: a {config.method} delta is not a LoRA")
    scale = lora_scale(config)
    num = den = 0.0
    for a_key, b_key in lora_pairs(deltas[0]).values():
        a = [d[a_key].to(torch.float64) for d in deltas]
        b = [d[b_key].to(torch.float64) for d in deltas]
        paper = scale * sum(w * x for w, x in zip(weights, b)) @ sum(w * x for w, x in zip(weights, a))
        exact = scale * sum(w * (x @ y) for w, x, y in zip(weights, b, a))
        num += float(((paper - exact) ** 2).sum())
        den += float((exact ** 2).sum())
    return math.sqrt(num / den) if den > 0 else float("nan")
