"""CrossFit's task metrics (ACC, EM, QA-F1, Rouge-L, Classification-F1), written from their definitions.

``answers`` is a list of gold-answer tuples (one per example); a prediction scores the best of its
example's answers, except Classification-F1, which is macro F1 over the first gold answers' labels.
Rouge-L is the sentence-level LCS F1 over lower-cased whitespace tokens.
"""
from __future__ import annotations

import re
import string
import warnings
from collections import Counter

# The paper's 32 CrossFit QA tasks (metric as in CrossFit) and the bundled tasks.
METRICS = {
    "adversarialqa": "QA-F1", "hotpot_qa": "QA-F1", "superglue-record": "QA-F1",
    "ai2_arc": "ACC", "codah": "Classification-F1", "commonsense_qa": "ACC", "cosmos_qa": "ACC",
    "dream": "ACC", "hellaswag": "ACC", "openbookqa": "ACC", "qasc": "ACC", "quail": "ACC",
    "quarel": "ACC", "quartz-no_knowledge": "ACC", "quartz-with_knowledge": "ACC",
    "race-high": "ACC", "race-middle": "ACC", "sciq": "ACC", "superglue-copa": "ACC", "swag": "ACC",
    "wino_grande": "ACC", "wiqa": "ACC", "boolq": "ACC", "mc_taco": "ACC",
    "eli5-askh": "Rouge-L", "eli5-asks": "Rouge-L", "eli5-eli5": "Rouge-L",
    "lama-conceptnet": "EM", "lama-google_re": "EM", "numer_sense": "EM", "search_qa": "EM",
    "web_questions": "EM",
    # bundled tasks that CrossFit does not list
    "csqa2": "ACC", "piqa": "ACC", "gsm8k": "EM",
    **{f"babi-qa{i}": "EM" for i in range(1, 21)},
    **{f"planted-babi-qa{i}": "EM" for i in range(1, 21)},  # the planted control's variants (task_list.PLANTED)
}
DEFAULT_METRIC = "EM"
METRIC_NAMES = ("ACC", "EM", "QA-F1", "Rouge-L", "Classification-F1")


def metric_for(task: str) -> str:
    if task not in METRICS:
        warnings.warn(f"task {task!r} has no known metric; scoring it with {DEFAULT_METRIC}", stacklevel=2)
        return DEFAULT_METRIC
    return METRICS[task]


def normalize_answer(s: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, squeeze whitespace."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(pred: str, gold: str) -> float:
    return float(normalize_answer(pred) == normalize_answer(gold))


def accuracy(pred: str, gold: str) -> float:
    return float(pred.strip().lower() == gold.strip().lower())


def qa_f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def _lcs(a, b) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(pred: str, gold: str) -> float:
    p, g = pred.lower().split(), gold.lower().split()
    if not p or not g:
        return 0.0
    lcs = _lcs(p, g)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


def classification_f1(preds, golds) -> float:
    """Macro F1 over the labels that occur in ``golds`` (sklearn's ``labels=unique(gold)``)."""
    scores = []
    for label in sorted(set(golds)):
        tp = sum(p == label and g == label for p, g in zip(preds, golds))
        fp = sum(p == label and g != label for p, g in zip(preds, golds))
        fn = sum(p != label and g == label for p, g in zip(preds, golds))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / len(scores)


_PER_EXAMPLE = {"EM": exact_match, "ACC": accuracy, "QA-F1": qa_f1, "Rouge-L": rouge_l}


def evaluate(predictions, answers, metric: str) -> float:
    """Score of ``predictions`` (strings) against ``answers`` (a tuple of gold strings per example)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} examples")
    if not predictions:
        raise ValueError("nothing to score")
    if metric == "Classification-F1":
        return classification_f1([p.strip() for p in predictions], [a[0].strip() for a in answers])
    if metric not in _PER_EXAMPLE:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRIC_NAMES)}")
    fn = _PER_EXAMPLE[metric]
    return sum(max(fn(p, g) for g in gold) for p, gold in zip(predictions, answers)) / len(predictions)


def majority_answer(answers) -> str:
    """The most frequent first gold answer (the "always say X" baseline)."""
    return Counter(a[0] for a in answers).most_common(1)[0][0]
