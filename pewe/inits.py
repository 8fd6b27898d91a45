"""Initialisations of a target's delta from the pool of source deltas, declared once each.

An initialisation is a small function of ``InitInputs`` (the target, the other sources, their scores
for this target, the manual groups) that returns the weights of the source deltas and the fields
that describe them in the checkpoint's sidecar, or None when it has nothing for this target (a
target alone in its manual group). The weighted sum of the source deltas, parameter by parameter,
is the initial delta (``pewe.averaging``). Adding one is a function plus its ``@register_init`` line.

Every score of ``pewe.scores`` is also an initialisation under its own name: softmax(sign * score /
T) over the other sources (``softmax_by_score``), with T per the score's unit.

The peers' ways of combining deltas are initialisations too, named ``NAME`` or ``NAME=SCORE`` (the
score whose softmax weights they use; ``parse_init_name``); each name is a folder under init/ and a
row of the study's report:

- the merges of ``pewe.merges`` (``task_arithmetic``, ``ties``, ``dare_linear``, ``dare_ties``,
  ``lora_exact``): the spec's ``combine`` merges the deltas (not a weighted sum). Without a score
  their weights are uniform, 1/n each (sum 1): the merged delta is then on the scale of one source
  delta, as every other initialisation here; the peers' usual weights of 1 each would add up n
  deltas (20 sources for each of the study's 21 default tasks: a start 20 times a tuned delta's size).
- ``topk=SCORE``: the plain average of the k best sources by the score (AdapterSoup's uniform soup
  of a selected subset; ``topk_k`` = 3 by default, our choice: AdapterSoup selects by text
  clustering, not a fixed k).
- ``lorahub``: LoraHub's search (``pewe.lorahub``) of one weight per source from 0, on the loss of
  the weighted sum on the target's few-shot train split (``InitInputs.loss_of``);
  ``lorahub_from=SCORE`` starts it from the score's softmax weights instead.

Their parameters are options (``MERGE_OPTIONS``: the peers' defaults); a merge's sidecar records the
parameters it used and the weights that fed it.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable

from pewe import lorahub as hub
from pewe.merges import MERGE_DEFAULTS, MERGES, MergeError, check_merge_params, merge_deltas
from pewe.scores import SCORES, ScoreError, score_spec
from pewe.weights import average_weights, group_weights, loo_weights


@dataclasses.dataclass(frozen=True)
class InitInputs:
    """What an initialisation may read for one target."""
    target: str
    sources: tuple  # the pool of source tasks, in pool order (the target's own is left out by the rules)
    groups: dict  # {group name: member tasks}: the manual division
    scores: dict  # {score: {source: value}} of this target (what the similarity step computed)
    temperatures: dict  # {score: (T applied to the score, T per the score's unit)}
    # ({source: w}) -> the loss of sum_s w_s delta_s on the target's few-shot TRAIN split (what
    # LoraHub minimises); given only to initialisations with ``needs_loss``
    loss_of: Callable | None = None
    seed: int = 0  # seeds the searches and random drops (the study's source_seed, a script's seed)


@dataclasses.dataclass(frozen=True)
class InitSpec:
    name: str
    weights: Callable  # (InitInputs) -> ({source: weight}, sidecar fields) or None
    score: str | None = None  # the score whose values it reads, if any
    covers: Callable = None  # (target, groups) -> whether it has an initialisation for ``target``
    # (deltas: list of {key: tensor}, weights: list of floats, DeltaConfig, torch.Generator) -> the
    # initial delta; None: the paper's sum_s w_s delta_s, streamed by pewe.averaging
    combine: Callable | None = None
    params: dict = dataclasses.field(default_factory=dict)  # the merge's parameters (its sidecar's "merge")
    needs_loss: bool = False  # reads InitInputs.loss_of
    # (InitInputs) -> what fixes its weights before any loss is evaluated: a delta written before is
    # checked against it instead of searching again
    search_key: Callable | None = None
    lora_only: bool = False


INITS: dict = {}


def every_target(target, groups) -> bool:
    return True


def in_a_group(target, groups) -> bool:
    return any(target in members for members in groups.values())


def register_init(name, *, covers=every_target):
    def deco(fn):
        INITS[name] = InitSpec(name, fn, covers=covers)
        return fn
    return deco


@register_init("average")
def average_init(x: InitInputs):
    """The plain average of every other source delta."""
    return average_weights(x.sources, [x.target])[x.target], {"method": "average"}


@register_init("manual", covers=in_a_group)
def manual_init(x: InitInputs):
    """The plain average of the other members of the target's manual group."""
    group = next(((g, m) for g, m in x.groups.items() if x.target in m), None)
    if group is None:
        return None
    return group_weights([group[1]])[x.target], {"method": "manual", "group": group[0]}


def softmax_by_score(score: str) -> InitSpec:
    """softmax(sign * score / T) over the other sources, for any score of ``pewe.scores``."""
    spec = score_spec(score)

    def weights(x: InitInputs):
        temp, per_unit = x.temperatures[spec.name]
        w = loo_weights({x.target: x.scores[spec.name]}, x.sources, spec.sign, temp, targets=[x.target])[x.target]
        return w, {"method": "softmax", "metric": spec.name, "temperature": temp, "temperature_per_unit": per_unit}

    return InitSpec(spec.name, weights, score=spec.name, covers=every_target)


# --------------------------------------------------------------------------- the peers' combinations

TOPK_DEFAULT = 3
MERGE_OPTIONS = {**MERGE_DEFAULTS, "topk_k": TOPK_DEFAULT, **hub.LORAHUB_DEFAULTS}  # name -> default
NEEDS_SCORE = ("topk", "lorahub_from")
NO_SCORE = ("lorahub",)
PEER_INITS = (*MERGES, "topk", "lorahub", "lorahub_from")
NAME_CHARS = re.compile(r"[A-Za-z0-9_.-]+")  # what a folder name under init/ may hold, besides one "="


def parse_merge_options(items) -> dict:
    """MERGE_OPTIONS updated with "name=value" items (each value typed as its default), checked."""
    out = dict(MERGE_OPTIONS)
    for item in items:
        name, eq, text = str(item).partition("=")
        name = name.strip()
        if not eq or name not in MERGE_OPTIONS:
            raise ScoreError(f"merge option {item!r}: expected name=value with a name among {', '.join(MERGE_OPTIONS)}")
        default = MERGE_OPTIONS[name]
        try:
            out[name] = type(default)(text.strip()) if not isinstance(default, str) else text.strip()
        except ValueError:
            raise ScoreError(f"merge option {item!r}: {text.strip()!r} is not a{'n integer' if isinstance(default, int) else ' number'}") from None
    try:
        check_merge_params({k: out[k] for k in MERGE_DEFAULTS})
        hub.check_lorahub_params({k: out[k] for k in hub.LORAHUB_DEFAULTS})
    except (MergeError, hub.LoraHubError) as e:
        raise ScoreError(f"merge option: {e}") from None
    if isinstance(out["topk_k"], bool) or out["topk_k"] < 1:
        raise ScoreError(f"merge option: topk_k must be a whole number >= 1, not {out['topk_k']!r}")
    return out


def parse_init_name(name) -> tuple:
    """(base, score or None) of an initialisation name ``NAME`` or ``NAME=SCORE``, checked; the
    score is given its declared spelling. Registered ones and scores stand alone."""
    text = str(name).strip()
    base, eq, score = text.partition("=")
    if not eq and (base in INITS or base in SCORES):
        return base, None
    if base not in PEER_INITS:
        raise ScoreError(f"unknown initialisation {text!r}; expected one of {', '.join([*INITS, *SCORES])}, "
                         f"or {', '.join(PEER_INITS)} (NAME or NAME=SCORE)")
    if eq:
        if base in NO_SCORE:
            raise ScoreError(f"initialisation {text!r}: {base} starts from 0 and reads no score "
                             f"(lorahub_from={score} starts from the score's weights)")
        try:
            score = score_spec(score.strip()).name
        except ScoreError as e:
            raise ScoreError(f"initialisation {text!r}: {e}") from None
    elif base in NEEDS_SCORE:
        raise ScoreError(f"initialisation {text!r} needs a score: {base}=SCORE (e.g. {base}=Loss)")
    full = f"{base}={score}" if eq else base
    if not all(NAME_CHARS.fullmatch(part) for part in full.split("=")):
        raise ScoreError(f"initialisation {full!r} is not a valid folder name")
    return base, (score if eq else None)


def canonical_init_name(name) -> str:
    base, score = parse_init_name(name)
    return base if score is None else f"{base}={score}"


def _weights_to_merge(x: InitInputs, score):
    """The weights that feed a merge: the score's softmax weights, or 1/n over the other sources."""
    if score is None:
        return average_weights(x.sources, [x.target])[x.target], {"weights_from": "uniform"}
    w, meta = softmax_by_score(score).weights(x)
    return w, {"weights_from": "softmax", "metric": meta["metric"], "temperature": meta["temperature"],
               "temperature_per_unit": meta["temperature_per_unit"]}


def merge_init(name, merge, score, options) -> InitSpec:
    """A merge of ``pewe.merges`` with the score's softmax weights (or uniform ones)."""
    spec = MERGES[merge]
    params = {k: options[k] for k in spec.params}

    def weights(x: InitInputs):
        w, meta = _weights_to_merge(x, score)
        return w, {"method": merge, **meta, "merge": params}

    def combine(deltas, ws, config, rng):
        return merge_deltas(merge, deltas, ws, config, rng, params)

    return InitSpec(name, weights, score=score, covers=every_target, combine=combine, params=params,
                    lora_only=spec.lora_only)


def topk_init(name, score, options) -> InitSpec:
    """AdapterSoup's soup: 1/k on each of the k sources with the largest softmax weight (the k best
    by the score; equal weights keep pool order), 0 on the rest."""
    k = options["topk_k"]

    def weights(x: InitInputs):
        w, meta = softmax_by_score(score).weights(x)
        best = sorted(w, key=lambda s: -w[s])[:k]  # sorted() is stable: ties in pool order
        return ({s: 1.0 / len(best) for s in best},
                {"method": "topk", "metric": meta["metric"], "temperature": meta["temperature"], "merge": {"topk_k": k}})

    return InitSpec(name, weights, score=score, covers=every_target, params={"topk_k": k})


def lorahub_init(name, score, options) -> InitSpec:
    """LoraHub's search (``pewe.lorahub.search``) from 0, or from the score's softmax weights."""
    params = {k: options[k] for k in hub.LORAHUB_DEFAULTS}

    def start(x: InitInputs):
        others = [s for s in x.sources if s != x.target]
        if score is None:
            return others, [0.0] * len(others)
        w, _ = softmax_by_score(score).weights(x)
        return others, [w[s] for s in others]

    def search_key(x: InitInputs):
        others, w0 = start(x)
        return {"sources": others, "start_weights": w0, "seed": x.seed, "merge": params}

    def weights(x: InitInputs):
        if x.loss_of is None:
            raise hub.LoraHubError(f"{name}: no loss to search on (the caller gave no train-split loss)")
        others, w0 = start(x)
        found = hub.search(lambda w: x.loss_of(dict(zip(others, w))), len(others), w0,
                           budget=params["lorahub_budget"], bound=params["lorahub_bound"], l1=params["lorahub_l1"],
                           seed=x.seed)
        return dict(zip(others, found.weights)), {
            "method": "lorahub", "start": score or "zeros", "metric": score, "merge": params,
            "search": search_key(x), "loss_evaluations": found.evaluations, "best_objective": found.best_objective,
            "search_seconds": found.seconds}

    return InitSpec(name, weights, score=score, covers=every_target, params=params, needs_loss=True,
                    search_key=search_key)


def init_spec(name, options=None) -> InitSpec:
    """The declaration of an initialisation: a registered one, the softmax of a score, or one of the
    peers' combinations (``NAME`` or ``NAME=SCORE``) with ``options`` (``parse_merge_options``;
    default: the peers' defaults)."""
    if name in INITS:
        return INITS[name]
    if name in SCORES:
        return softmax_by_score(name)
    base, score = parse_init_name(name)
    if base in INITS or base in SCORES:
        return init_spec(base)
    options = parse_merge_options([]) if options is None else {**MERGE_OPTIONS, **options}
    full = canonical_init_name(name)
    if base in MERGES:
        return merge_init(full, base, score, options)
    if base == "topk":
        return topk_init(full, score, options)
    return lorahub_init(full, score, options)
