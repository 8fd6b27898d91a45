"""CrossFit task folders: reading TSV splits, the original's text format, tokenised batches.

A task folder is ``{task}/{task}_{k}_{seed}_{split}.tsv`` (split = train/dev/test); each line is
``input<TAB>answer[<TAB>answer...]``. The model sees ``" [task] " + input`` and learns
``"<extra_id_0>" + answer``; training gets one row per gold answer, scoring uses every answer.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import logging
from pathlib import Path

import torch

from pewe.errors import UserError

log = logging.getLogger("pewe")
SPLITS = ("train", "dev", "test")
REQUIRED_SPLITS = ("train", "dev")  # a new task may come without a test split

# bAbI puts the question at the end of a long story: truncate those inputs from the left so the
# question survives. Every other task keeps the original's right truncation.
TRUNCATION_SIDE = {"babi-*": "left"}


class DataError(UserError):
    """Bad input data; the message names the file and, for text files, the line."""


@dataclasses.dataclass(frozen=True)
class Example:
    input: str
    answers: tuple
    line: int  # 1-based line number in its file


def text_lines(path):
    """(line number, line without its end) of a UTF-8 text file: a byte-order mark at the start is
    dropped (it is not part of the first field), and a line that is not UTF-8 is named."""
    with open(path, "rb") as f:
        for lineno, raw_bytes in enumerate(f, 1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte {e.start + 1} of the line)") from None
            yield lineno, (raw.removeprefix("\ufeff") if lineno == 1 else raw).rstrip("\n").rstrip("\r")


def read_tsv(path) -> list:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    examples = []
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        if "\t" not in line:
            raise DataError(f"{path}:{lineno}: no tab between input and answer")
        text, *answers = line.split("\t")
        if not text.strip():
            raise DataError(f"{path}:{lineno}: empty input")
        answers = tuple(a.strip() for a in answers)
        if not answers or any(not a for a in answers):
            raise DataError(f"{path}:{lineno}: empty answer")
        examples.append(Example(text.strip(), answers, lineno))
    if not examples:
        raise DataError(f"{path}: no examples (empty split)")
    return examples


BAD_NAME_CHARS = {",": "a comma", "\t": "a tab", "\n": "a newline", "\r": "a carriage return", " ": "a space"}


def check_task_names(names, where="task") -> list:
    """Refuse task names that the result files cannot carry: ``result.tsv`` lines are comma separated,
    similarity files put a target's name alone on a line (no spaces), and names are TSV fields."""
    names = [str(n) for n in names]
    for name in names:
        bad = [what for ch, what in BAD_NAME_CHARS.items() if ch in name]
        if bad or not name:
            raise DataError(f"{where} name {name!r}: contains {' and '.join(bad)}; the result files cannot carry it "
                            "(rename the task folder)" if bad else f"{where} name is empty")
    return names


def _folder(path, missing: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: {missing}")
    return path


def list_tasks(task_dir) -> list:
    """Task folder names under ``task_dir`` (folders holding at least one ``.tsv``)."""
    task_dir = _folder(task_dir, "no such task folder")
    tasks = sorted(p.name for p in task_dir.iterdir() if p.is_dir() and any(p.glob("*.tsv")))
    if not tasks:
        raise DataError(f"{task_dir}: contains no task folders with .tsv files")
    return tasks


def split_prefixes(task_path) -> list:
    """``{task}_{k}_{seed}`` prefixes found in a task folder, as the original's loop finds them; each
    must have its train and dev splits (test is optional: a new task may have none)."""
    task_path = _folder(task_path, "missing task folder")
    prefixes = sorted({f.name.rsplit("_", 1)[0] for f in task_path.glob("*.tsv")})
    if not prefixes:
        raise DataError(f"{task_path}: no .tsv splits")
    for prefix in prefixes:
        for split in REQUIRED_SPLITS:
            if not (task_path / f"{prefix}_{split}.tsv").is_file():
                raise DataError(f"{task_path}: {prefix}_{split}.tsv is missing")
    return prefixes


def first_prefix(task_dir, task, warn=False) -> str:
    """The first ``{task}_{k}_{seed}`` split of a task folder: the one split that the study, the
    similarity scores and the every-source-on-every-target scripts use."""
    prefixes = split_prefixes(Path(task_dir) / task)
    if warn and len(prefixes) > 1:
        log.warning("%s: several splits %s; using %s", task, prefixes, prefixes[0])
    return prefixes[0]


def split_path(task_dir, task, prefix, split) -> Path:
    return Path(task_dir) / task / f"{prefix}_{split}.tsv"


def has_split(task_dir, task, prefix, split) -> bool:
    return split_path(task_dir, task, prefix, split).is_file()


def truncation_side_for(task: str, option: str = "auto") -> str:
    if option in ("left", "right"):
        return option
    if option != "auto":
        raise DataError(f"truncation_side must be auto, left or right, not {option!r}")
    for pattern, side in TRUNCATION_SIDE.items():
        if fnmatch.fnmatch(task, pattern):
            return side
    return "right"


def source_text(task: str, text: str) -> str:
    return f" [{task}] {text}"


def target_text(answer: str) -> str:
    return f"<extra_id_0>{answer}"


@dataclasses.dataclass
class Rows:
    """Tokenised rows of one split. ``example_of[i]`` maps row i back to its example."""
    input_ids: list
    label_ids: list
    example_of: list
    examples: list


@dataclasses.dataclass(frozen=True)
class TextOptions:
    """How a task's lines become token ids."""
    max_input_length: int = 512  # input tokens kept
    max_output_length: int = 64  # answer tokens kept (and generated)
    truncation_side: str = "auto"  # auto (left for bAbI, right otherwise), left or right

    def __post_init__(self):
        for name in ("max_input_length", "max_output_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DataError(f"{name} must be a whole number >= 1, not {value!r}")
        truncation_side_for("", self.truncation_side)  # refuses anything but auto, left, right


def load_split(task_dir, task, prefix, split, tokenizer, text: TextOptions, one_row_per_answer: bool) -> "Rows":
    """One split of a task folder, read and tokenised (training: a row per gold answer)."""
    examples = read_tsv(split_path(task_dir, task, prefix, split))
    return tokenize(examples, tokenizer, task, text.max_input_length, text.max_output_length, text.truncation_side,
                    one_row_per_answer=one_row_per_answer)


def tokenize(examples, tokenizer, task, max_input_length=512, max_output_length=64,
             truncation_side="auto", one_row_per_answer=True) -> Rows:
    """One row per (example, answer) when ``one_row_per_answer``; else one row per example (first
    answer as the label, for generation and scoring)."""
    pairs = [(i, a) for i, ex in enumerate(examples)
             for a in (ex.answers if one_row_per_answer else ex.answers[:1])]
    old_side = tokenizer.truncation_side
    tokenizer.truncation_side = truncation_side_for(task, truncation_side)
    try:
        sources = tokenizer([source_text(task, examples[i].input) for i, _ in pairs],
                            max_length=max_input_length, truncation=True)["input_ids"]
    finally:
        tokenizer.truncation_side = old_side
    targets = tokenizer([target_text(a) for _, a in pairs], max_length=max_output_length,
                        truncation=True)["input_ids"]
    return Rows(sources, targets, [i for i, _ in pairs], list(examples))


def _pad(seqs, value):
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    return out


def collate(rows: Rows, index, pad_id: int) -> dict:
    """A padded batch of the given row indices; label padding is -100 (ignored by the loss)."""
    src = [rows.input_ids[i] for i in index]
    tgt = [rows.label_ids[i] for i in index]
    input_ids = _pad(src, pad_id)
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(src):
        attention_mask[i, :len(s)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": _pad(tgt, -100),
            "index": list(index)}


def epoch_order(n: int, seed: int, epoch: int) -> list:
    """The shuffled row order of one training epoch: a pure function of (seed, epoch), so a resumed
    run replays exactly the batches an uninterrupted run would have seen."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def batches(rows: Rows, batch_size: int, pad_id: int, order=None):
    order = list(range(len(rows.input_ids))) if order is None else order
    for start in range(0, len(order), batch_size):
        yield collate(rows, order[start:start + batch_size], pad_id)
