"""Initialisations of a target's delta from the pool of source deltas, declared once each.

An initialisation is a small function of ``InitInputs`` (the target, the other sources, their scores
for this target, the manual groups) that returns the weights of the source deltas and the fields
that describe them in the checkpoint's sidecar, or None when it has nothing for this target (a
target alone in its manual group). The weighted sum of the source deltas, parameter by parameter,
is the initial delta (``pewe.averaging``). Adding one is a function plus its ``@register_init`` line.

Every score of ``pewe.scores`` is also an initialisation under its own name: softmax(sign * score /
T) over the other sources (``softmax_by_score``), with T per the score's unit.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

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


@dataclasses.dataclass(frozen=True)
class InitSpec:
    name: str
    weights: Callable  # (InitInputs) -> ({source: weight}, sidecar fields) or None
    score: str | None = None  # the score whose values it reads, if any
    covers: Callable = None  # (target, groups) -> whether it has an initialisation for ``target``


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


def init_spec(name) -> InitSpec:
    """The declaration of an initialisation: a registered one, or the softmax of a score."""
    if name in INITS:
        return INITS[name]
    if name in SCORES:
        return softmax_by_score(name)
    raise ScoreError(f"unknown initialisation {name!r}; expected one of {', '.join([*INITS, *SCORES])}")
