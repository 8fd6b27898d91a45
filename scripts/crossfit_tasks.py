"""The paper's 32 CrossFit QA tasks: where each dataset lives on the Hugging Face hub today, and how
CrossFit turns one of its rows into an ``(input, answers)`` pair, quirks included.

Each formatter follows the task's script in INK-USC/CrossFit ``tasks/*.py`` (commit 56285ca):
the same field names, separators, letters and spacing (cosmos_qa's double space before "(A)",
quail's "(A)text" without spaces, quartz's question glued to its paragraph, search_qa's
"category:" without a space before it). A formatter returns ``None`` for a row CrossFit itself
drops (sciq without support, winogrande without a label) and raises ``FormatError`` where
CrossFit's script would have crashed (an answer key that names no choice).

This module only reads plain rows (dicts); it does not import ``datasets``.
"""
from __future__ import annotations

import dataclasses

PARQUET_REVISION = "refs/convert/parquet"  # the hub's automatic parquet export of a repository
LETTERS = "ABCDEFGH"


class FormatError(ValueError):
    """A row that CrossFit's formatting cannot handle (its script would have crashed)."""


def clean(s: str) -> str:
    """CrossFit's ``tasks/utils.py clean``: newlines (real and the two-character ``\\n``), carriage
    returns and tabs become spaces, then runs of whitespace collapse to one."""
    s = s.strip().replace("\n", " ").replace("\\n", " ").replace("\r", " ").replace("\t", " ")
    return " ".join(s.split())


def columns(value, *keys):
    """Lists of ``keys`` from a nested field, whether it comes as a dict of lists (how ``datasets``
    returns a sequence of structs) or as a list of dicts."""
    if isinstance(value, dict):
        return tuple(list(value[k]) for k in keys)
    return tuple([item[k] for item in value] for k in keys)


def labelled_choices(labels, texts, key):
    """``" (A) t1 (B) t2 ..."`` with the dataset's own labels, and the text whose label is ``key``
    (the last one, as CrossFit's loop overwrites)."""
    out, answer = "", None
    for label, text in zip(labels, texts):
        if label == key:
            answer = text
        out += " (" + label + ") " + text
    if answer is None:
        raise FormatError(f"answer key {key!r} is not among the choice labels {list(labels)}")
    return out, answer


def lettered(texts, sep=" "):
    """``" (A) t0 (B) t1 ..."`` (``sep=""`` gives quail's ``"(A)t0(B)t1"``)."""
    if len(texts) > len(LETTERS):
        raise FormatError(f"{len(texts)} choices; CrossFit letters only {len(LETTERS)}")
    return "".join(sep + "(" + LETTERS[i] + ")" + sep + t for i, t in enumerate(texts))


def nth(texts, index):
    if not isinstance(index, int) or not 0 <= index < len(texts):
        raise FormatError(f"answer index {index!r} outside the {len(texts)} choices")
    return texts[index]


# --- one formatter per CrossFit script: row (dict) -> (input, (answer, ...)) or None -------------

def adversarialqa(row, rng=None):
    texts = row["answers"]["text"]
    if len(texts) != 1:  # CrossFit asserts exactly one answer
        raise FormatError(f"{len(texts)} answers where CrossFit asserts exactly one")
    return "question: " + row["question"] + " context: " + row["context"], (texts[0],)


def hotpot_qa(row, rng=None):
    (support_titles,) = columns(row["supporting_facts"], "title")
    titles, sentences = columns(row["context"], "title", "sentences")
    context = "".join("".join(sents) + " " for sents, title in zip(sentences, titles) if title in support_titles)
    return "question: " + row["question"] + " context: " + context.strip(), (row["answer"],)


def superglue_record(row, rng=None):
    if not row["answers"]:
        raise FormatError("no answers (CrossFit takes answers[0])")
    return ("question: " + row["query"] + " context: " + row["passage"].replace("\n", " "),
            (row["answers"][0],))


def choices_by_key(question_field, clean_question=False):
    """ai2_arc, commonsense_qa, qasc: question + the dataset's labelled choices -> text of answerKey."""
    def fmt(row, rng=None):
        labels, texts = columns(row["choices"], "label", "text")
        choices, answer = labelled_choices(labels, texts, row["answerKey"])
        question = clean(row[question_field]) if clean_question else row[question_field]
        return question + choices, (answer,)
    return fmt


def codah(row, rng=None):
    candidates = list(row["candidate_answers"])
    return row["question_propmt"] + lettered(candidates), (nth(candidates, row["correct_answer_idx"]),)


def cosmos_qa(row, rng=None):
    options = [row[f"answer{i}"] for i in range(4)]
    answer = row["answer" + str(row["label"])] if f"answer{row['label']}" in row else None
    if answer is None:
        raise FormatError(f"label {row['label']!r} names no answer field")
    # " [SEP] " + " (A) ..." : CrossFit's double space before the choices.
    return row["question"] + " [SEP] " + row["context"] + " [SEP] " + lettered(options), (answer,)


def dream(row, rng=None):
    choice = list(row["choice"])
    if len(choice) != 3:  # CrossFit asserts three choices
        raise FormatError(f"{len(choice)} choices where CrossFit asserts 3")
    return (row["question"] + " [SEP] " + " ".join(row["dialogue"]) + " [SEP] " + lettered(choice),
            (row["answer"],))


def hellaswag(row, rng=None):
    endings = list(row["endings"])
    try:
        index = int(row["label"])  # a string on the hub ("0".."3")
    except ValueError:
        raise FormatError(f"label {row['label']!r} is not a number") from None
    return row["ctx"] + lettered(endings), (nth(endings, index),)


def openbookqa(row, rng=None):
    (texts,) = columns(row["choices"], "text")
    labels = ["A", "B", "C", "D"]  # CrossFit overwrites the labels with A-D
    if len(texts) < 4:
        raise FormatError(f"{len(texts)} choices where CrossFit expects 4")
    choices, answer = labelled_choices(labels, texts[:4], row["answerKey"])
    return row["question_stem"] + choices, (answer,)


def quail(row, rng=None):
    answers = list(row["answers"])
    if len(answers) > 4:
        raise FormatError(f"{len(answers)} answers; CrossFit letters only 4")
    return (row["question"].replace("\n", " ") + lettered(answers, sep="") + " [SEP] "
            + row["context"].replace("\n", " "), (nth(answers, row["correct_answer_id"]),))


def quarel(row, rng=None):
    q = row["question"]
    st1, st2 = q.find("(A)"), q.find("(B)")
    answer = q[st1 + 4:st2] if row["answer_index"] == 0 else q[st2 + 4:]
    if answer.endswith("or "):
        answer = answer[:-3]
    return q, (answer.strip(),)


def quartz(with_knowledge):
    def fmt(row, rng=None):
        labels, texts = columns(row["choices"], "label", "text")
        choices, answer = labelled_choices(labels, texts, row["answerKey"])
        text = row["question"] + row["para"] + choices if with_knowledge else row["question"] + choices
        return text, (answer,)
    return fmt


def _flat(s):
    return s.replace("\n", " ").replace("\t", " ").replace("\r", " ")


def race(row, rng=None):
    options = [_flat(o) for o in row["options"]]
    if len(options) > 4:
        raise FormatError(f"{len(options)} options; CrossFit letters only 4")
    index = ord(row["answer"]) - ord("A") if len(row["answer"]) == 1 else -1
    return (_flat(row["question"]) + lettered(options) + " [SEP] " + _flat(row["article"]),
            (nth(options, index),))


def sciq(row, rng):
    """The four options are shuffled with the split's own ``RandomState(42)`` (CrossFit seeds the
    global RNG at the start of each split); rows without support are dropped before any draw."""
    if len(row["support"].replace("\n", " ")) == 0:
        return None
    options = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    rng.shuffle(options)
    return (row["question"].replace("\n", " ") + lettered(options) + " [SEP] " + row["support"].replace("\n", " "),
            (row["correct_answer"],))


def superglue_copa(row, rng=None):
    answer = row["choice1"] if row["label"] == 0 else row["choice2"]
    return row["premise"] + " (A) " + row["choice1"] + " (B) " + row["choice2"], (answer,)


def swag(row, rng=None):
    endings = [row[f"ending{i}"] for i in range(4)]
    return row["startphrase"] + lettered(endings), (nth(endings, row["label"]),)


def wino_grande(row, rng=None):
    text = row["sentence"] + " (A) " + row["option1"] + " (B) " + row["option2"]
    if str(row["answer"]) == "1":
        return text, (row["option1"],)
    if str(row["answer"]) == "2":
        return text, (row["option2"],)
    return None  # unlabelled (CrossFit keeps only answers 1 and 2)


def wiqa(row, rng=None):
    (texts,) = columns(row["choices"], "text")
    if len(texts) > 4:
        raise FormatError(f"{len(texts)} choices; CrossFit letters only 4")
    key = row["answer_label_as_choice"]
    index = ord(key) - ord("A") if len(key) == 1 else -1
    return (row["question_stem"].replace("\n", " ") + lettered(texts) + " [SEP] " + " ".join(row["question_para_step"]),
            (nth(texts, index),))


NO_YES = {0: "no", 1: "yes"}


def boolq(row, rng=None):
    return ("question: " + row["question"] + " [SEP] context: " + row["passage"],
            (NO_YES[int(bool(row["answer"]))],))


def mc_taco(row, rng=None):
    if row["label"] not in NO_YES:
        raise FormatError(f"label {row['label']!r} is not 0/1")
    return row["sentence"] + " [SEP] " + row["question"] + " [SEP] " + row["answer"], (NO_YES[row["label"]],)


def eli5(row, rng=None):
    (texts,) = columns(row["answers"], "text")
    return clean(row["title"] + " [SEP] " + row["selftext"]), tuple(clean(t) for t in texts)


def lama(template_based):
    def fmt(row, rng=None):
        if template_based:  # google_re (and trex): the template with [X] filled, [Y] masked
            text = row["template"].replace("[X]", row["sub_label"]).replace("[Y]", "[MASK]")
        else:  # conceptnet (and squad): the masked sentence as given
            text = row["masked_sentence"]
        return text, (row["obj_label"],)
    return fmt


def numer_sense(row, rng=None):
    return row["sentence"].replace("<mask>", "[MASK]"), (row["target"],)


def search_qa(row, rng=None):
    return "question: " + row["question"] + "category: " + row["category"], (row["answer"],)


def web_questions(row, rng=None):
    return row["question"], tuple(row["answers"])


# --- the table ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """One CrossFit task. Pool (few-shot and source rows) and test come from ``pool_split`` and
    ``test_split``; with ``carve`` both come from ``pool_split``: shuffled with RandomState(42),
    the first 80 % is the pool, the rest the test (CrossFit's rule for datasets without a usable
    validation split). ``test_keep`` < 1 keeps that share of the test split after a seed-42 shuffle
    (eli5's 10 %)."""
    task: str
    hub_id: str  # current namespaced repository id
    config: str | None  # the builder config CrossFit asked for (None: the repository's only one)
    revision: str | None  # None: the main branch (parquet there); PARQUET_REVISION where main has a script
    format_row: object  # row -> (input, answers) | None
    status: str  # what is known of the repository's state (PEERS.md D.4)
    per_class: bool = False  # classification: k rows per label (boolq, mc_taco)
    pool_split: str = "train"
    test_split: str = "validation"
    carve: bool = False
    test_keep: float = 1.0
    map_seed: int | None = None  # a RandomState(map_seed) per split for formatters that draw (sciq)
    lost: str = ""  # why the hub cannot give this dataset any more ("" = it can)
    may_be_lost: str = ""  # a load failure means "not on the hub any more", not a build failure


_P = PARQUET_REVISION
_ELI5_LOST = ("defunct-datasets/eli5 is defunct: the hub raises DefunctDatasetError, the Reddit data is no "
              "longer distributed")
_LAMA_LOST = ("facebook/lama is script-only (its data come from dl.fbaipublicfiles.com through lama.py) and "
              "has no parquet export; datasets >= 4 cannot run the script")

TASKS = {s.task: s for s in [
    TaskSpec("adversarialqa", "UCLNLP/adversarial_qa", "adversarialQA", None, adversarialqa,
             "parquet (export branch verified)"),
    TaskSpec("hotpot_qa", "hotpotqa/hotpot_qa", "distractor", None, hotpot_qa, "not verified"),
    TaskSpec("superglue-record", "aps/super_glue", "record", None, superglue_record,
             "converted to parquet on main (#16)"),
    TaskSpec("ai2_arc", "allenai/ai2_arc", "ARC-Challenge", None, choices_by_key("question"),
             "loads under datasets 5"),
    TaskSpec("codah", "jaredfern/codah", "fold_0", None, codah, "converted to parquet on main (#4)"),
    TaskSpec("commonsense_qa", "tau/commonsense_qa", None, None, choices_by_key("question", clean_question=True),
             "converted to parquet on main"),
    TaskSpec("cosmos_qa", "allenai/cosmos_qa", None, _P, cosmos_qa, "script on main at last check"),
    TaskSpec("dream", "dataset-org/dream", None, None, dream, "had a script; not verified"),
    TaskSpec("hellaswag", "Rowan/hellaswag", None, None, hellaswag, "script deleted, parquet on main"),
    TaskSpec("openbookqa", "allenai/openbookqa", "main", None, openbookqa, "not verified"),
    TaskSpec("qasc", "allenai/qasc", None, None, choices_by_key("question"), "not verified"),
    TaskSpec("quail", "textmachinelab/quail", None, _P, quail, "script on main at last check"),
    TaskSpec("quarel", "allenai/quarel", None, None, quarel, "not verified"),
    TaskSpec("quartz-no_knowledge", "allenai/quartz", None, None, quartz(False), "not verified"),
    TaskSpec("quartz-with_knowledge", "allenai/quartz", None, None, quartz(True), "not verified"),
    TaskSpec("race-high", "ehovy/race", "high", None, race, "not verified"),
    TaskSpec("race-middle", "ehovy/race", "middle", None, race, "not verified"),
    TaskSpec("sciq", "allenai/sciq", None, None, sciq, "not verified", map_seed=42),
    TaskSpec("superglue-copa", "aps/super_glue", "copa", None, superglue_copa, "converted to parquet on main (#16)"),
    TaskSpec("swag", "allenai/swag", "regular", None, swag, "not verified"),
    TaskSpec("wino_grande", "allenai/winogrande", "winogrande_xl", None, wino_grande, "loads under datasets 5"),
    TaskSpec("wiqa", "allenai/wiqa", None, None, wiqa, "not verified"),
    TaskSpec("boolq", "google/boolq", None, None, boolq, "not verified", per_class=True),
    TaskSpec("mc_taco", "CogComp/mc_taco", "plain_text", _P, mc_taco,
             "script on main fails under datasets 5; parquet export has plain_text", per_class=True,
             pool_split="validation", carve=True),
    *[TaskSpec(f"eli5-{sub}", "defunct-datasets/eli5", None, None, eli5, "defunct", pool_split=f"train_{sub}",
               test_split=f"validation_{sub}", test_keep=0.1, lost=_ELI5_LOST) for sub in ("askh", "asks", "eli5")],
    TaskSpec("lama-conceptnet", "facebook/lama", "conceptnet", None, lama(False), "script-only", carve=True,
             lost=_LAMA_LOST),
    TaskSpec("lama-google_re", "facebook/lama", "google_re", None, lama(True), "script-only", carve=True,
             lost=_LAMA_LOST),
    TaskSpec("numer_sense", "INK-USC/numer_sense", None, None, numer_sense, "not verified", carve=True),
    TaskSpec("search_qa", "kyunghyuncho/search_qa", "train_test_val", None, search_qa,
             "script on main at last check; parquet export not verified",
             may_be_lost="kyunghyuncho/search_qa had only a loading script (data on Google Drive) and may "
                         "have no parquet export"),
    TaskSpec("web_questions", "stanfordnlp/web_questions", None, None, web_questions, "not verified", carve=True),
]}
