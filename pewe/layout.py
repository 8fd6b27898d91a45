"""On-disk layouts: one reader and one writer for each kind of folder or file the scripts share.

- ``--shard i/n``: ``parse_shard`` / ``shard_of``.
- a tuning run's folder name: ``run_name`` (``{prefix}_lr_{lr}_bsz_{bsz}``), and its ``run.json``:
  the record of what decides the run's result (``claim_run``), which a resume or a skip must match.
- a JSON file any step reads back (``result.json``, ``scores.json``, a similarity part): ``read_json``.
- a folder of source deltas (a tune_hps_singletask.py output_dir): ``{task}/checkpoint-best.safetensors``,
  or ``{task}/`` a peft LoRA folder (``adapter_config.json`` + weights: a hub collection), listed by
  ``source_checkpoints``; one checkpoint found by ``find_checkpoint``.
- an averaged-delta folder (a unit_model script's or the study's ``init/{init}``): one
  ``without_{task}_checkpoint.safetensors`` (+ .json) per target, ``init_path`` / ``init_checkpoint_for``.
- a tuning output folder's ``result.tsv``: ``task,dev_score,test_score`` per run, rebuilt from the
  runs' ``result.json`` by ``rebuild_result_tsv``.
- a similarity folder: ``result.tsv`` (or ``{group}_result.tsv`` per block / layer) in the original's
  layout (a target-name line, then ``source,score`` lines; comma separated despite .tsv) and
  ``scores.json`` beside it (the score, its direction, the options): ``write_similarity`` /
  ``read_similarity`` / ``read_similarity_meta`` / ``similarity_files``.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import re
import shutil
from pathlib import Path

from pewe.atomic import atomic_write_text
from pewe.data import DataError, text_lines
from pewe.errors import UserError
from delta_modules import PEFT_CONFIG, DeltaError, is_peft_folder, peft_weights_path

SOURCE_PATTERN = "checkpoint-best*.safetensors"
INIT_PATTERN = "without_{task}_checkpoint.safetensors"
RUN_RECORD = "run.json"
# what a run may change between invocations: a larger budget extends a finished run (the trainer)
MAY_DIFFER = ("train_iters", "model_name")


def file_sha256(path) -> str:
    """The checksum of a file, or of a peft adapter folder (its config and weights file together:
    what a run record needs to know that the delta it started from has not changed)."""
    if is_peft_folder(path):
        h = hashlib.sha256()
        for part in (Path(path) / PEFT_CONFIG, peft_weights_path(path)):
            if part is not None:
                h.update(f"{part.name}\0{file_sha256(part)}\0".encode())
        return h.hexdigest()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_json(path, what="file"):
    """A JSON file the scripts wrote; a damaged one is one clear error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, ValueError) as e:
        raise DataError(f"{path}: not a readable {what} ({e}); delete it to redo the step that wrote it") from None


# --------------------------------------------------------------------------- shards and run folders

def parse_shard(shard, option="--shard"):
    """``(i, n)`` of an ``i/n`` option (``""`` / None: no sharding, None)."""
    if not shard:
        return None
    try:
        i, n = (int(x) for x in str(shard).split("/"))
    except ValueError:
        raise UserError(f"{option} {shard}: expected i/n, e.g. 0/4") from None
    if not 0 <= i < n:
        raise UserError(f"{option} {shard}: expected i/n with 0 <= i < n")
    return i, n


def shard_of(items, shard, option="--shard") -> list:
    """Every n-th item starting at i, for ``shard`` "i/n" ("" = all)."""
    parsed = parse_shard(shard, option)
    items = list(items)
    return items if parsed is None else items[parsed[0]::parsed[1]]


def _first_difference(old: dict, new: dict, prefix=""):
    for key in [*new, *(k for k in old if k not in new)]:  # the record's own order: the most telling first
        if key in MAY_DIFFER and not prefix:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _first_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}", a, b
    return None


def _short(value) -> str:
    """A value for a message: checksums (of a model, a file) cut to 12 digits."""
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return f"{value[:12]}... (a checksum)"
    return repr(value)


def claim_run(run_dir, record: dict, overwrite=False, what="run"):
    """Make ``run_dir`` this run's folder: with ``overwrite``, start afresh; a folder holding another
    run's work (a record that differs in anything but a larger budget, or no record at all) is refused
    with the first difference, since resuming or skipping it would report that run's results as this
    one's. Writes the record when the folder is new."""
    run_dir = Path(run_dir)
    record_path = run_dir / RUN_RECORD
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    if record_path.is_file():
        old = read_json(record_path, "run record")
        diff = _first_difference(old, record)
        if diff is not None:
            key, a, b = diff
            raise UserError(f"{run_dir}: this {what} was made with {key} = {_short(a)}, not {_short(b)}; rerun with "
                            f"--overwrite to start it afresh, or use another output folder")
        if old.get("train_iters", 0) >= record.get("train_iters", 0):
            return  # the same run (or one that did more): its record stands
    elif run_dir.is_dir() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir}: holds a {what} without its record {RUN_RECORD} (made by an older version, or "
                        f"not by this project); rerun with --overwrite to start it afresh")
    atomic_write_text(record_path, json.dumps(record, indent=1))


def run_name(prefix, learning_rate, batch_size) -> str:
    """The folder of one (split, lr, batch size) run of tune_hps_singletask.py's grid."""
    lr = f"{learning_rate:g}" if isinstance(learning_rate, float) else str(learning_rate)
    return f"{prefix}_lr_{lr}_bsz_{batch_size}"


# --------------------------------------------------------------------------- delta folders

def find_checkpoint(path, pattern=SOURCE_PATTERN) -> Path:
    """A delta: ``path`` itself (a file, or a peft adapter folder), or the single file matching
    ``pattern`` inside the folder."""
    path = Path(path)
    if path.is_file():
        return path
    hits = sorted(path.glob(pattern)) if path.is_dir() else []
    if is_peft_folder(path):
        if hits:  # which one would be the delta is not ours to guess
            raise DeltaError(f"{path}: holds both a peft adapter ({PEFT_CONFIG}) and {hits[0].name}; keep one")
        return path
    if not hits:
        raise DeltaError(f"{path}: no delta checkpoint matching {pattern}")
    if len(hits) > 1:
        raise DeltaError(f"{path}: several checkpoints match {pattern}: {[h.name for h in hits]}")
    return hits[0]


def has_source_delta(folder) -> bool:
    """Whether ``folder`` is a source of a folder of source deltas: it holds a
    ``checkpoint-best*.safetensors`` or is a peft adapter folder."""
    folder = Path(folder)
    return folder.is_dir() and (is_peft_folder(folder) or any(folder.glob(SOURCE_PATTERN)))


def source_checkpoints(root, names=()) -> dict:
    """``{task: delta path}`` of a folder of source deltas: the named tasks (each must have one), or
    every subfolder holding a ``checkpoint-best*.safetensors`` or being a peft adapter folder (then
    the path is that folder), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        raise DeltaError(f"{root}: no such folder of source deltas "
                         f"({{task}}/{SOURCE_PATTERN} or {{task}}/{PEFT_CONFIG})")
    if names:
        return {str(n): find_checkpoint(root / str(n)) for n in names}
    found = {d.name: find_checkpoint(d) for d in sorted(root.iterdir()) if has_source_delta(d)}
    if not found:
        raise DeltaError(f"{root}: no source deltas ({{task}}/{SOURCE_PATTERN}, or {{task}}/ peft adapter folders); "
                         f"train them with tune_hps_singletask.py --output_dir {root}")
    return found


def init_path(init_dir, task) -> Path:
    """Where an averaged-delta folder keeps the initial delta of ``task``."""
    return Path(init_dir) / INIT_PATTERN.format(task=task)


def init_checkpoint_for(path, task):
    """``--train_checkpoint``: a single delta file or peft adapter folder (the same for every task), or
    a folder holding ``without_{task}_checkpoint.safetensors`` (the name matched literally: a task named
    ``t[1]`` must not pick ``t1``'s average) or, failing that, a peft adapter folder ``{task}/``."""
    if path is None or str(path) == "":
        return None
    path = Path(path)
    if path.is_file() or is_peft_folder(path):
        return path
    found = init_path(path, task)
    if not found.is_file() and is_peft_folder(path / task):
        return path / task
    if not found.is_file():
        raise DeltaError(f"{path}: no delta checkpoint matching {found.name} (the initialisation of {task})")
    return found


def test_checkpoint_for(path, task) -> Path:
    """``--test_checkpoint``: a delta file, a task folder, a peft adapter folder, or a folder holding ``{task}/``."""
    path = Path(path)
    if path.is_dir() and (path / task).is_dir():
        return find_checkpoint(path / task)
    return find_checkpoint(path)


# --------------------------------------------------------------------------- a tuning output folder

@contextlib.contextmanager
def locked(path):
    """An exclusive lock on ``path`` (created if missing) for the duration of the block: several
    shards rebuilding one file from the same folder take turns, so the last one sees every result."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def rebuild_result_tsv(output_dir):
    """``result.tsv``: ``task,dev_score,test_score`` for every finished run of the folder, tasks and runs
    in name order, rebuilt from the runs' ``result.json`` files alone, under a lock."""
    output_dir = Path(output_dir)
    with locked(output_dir / ".result.tsv.lock"):
        lines = []
        for done in sorted(output_dir.glob("*/runs/*/result.json")):
            r = read_json(done, "run result")
            lines.append(f"{done.parent.parent.parent.name},{r['dev_score']},{r['test_score']}")
        atomic_write_text(output_dir / "result.tsv", "\n".join(lines) + "\n")


# --------------------------------------------------------------------------- similarity files

def result_file(group: str) -> str:
    return "result.tsv" if group == "" else f"{group}_result.tsv"


_STACK_ORDER = {"encoder": 0, "decoder": 1}


def group_sort_key(group: str):
    """encoder before decoder, blocks and layers in numeric order (``""`` first)."""
    m = re.match(r"^(encoder|decoder)_block_(\d+)(?:_layer_(\d+))?$", group)
    if m is None:
        return (-1, 0, 0, group)
    return (_STACK_ORDER[m.group(1)], int(m.group(2)), int(m.group(3) or 0), group)


def format_similarity(table: dict) -> str:
    """{target: {source: score}} in the original's layout: a target line, then ``source,score`` lines."""
    lines = []
    for target, row in table.items():
        lines.append(target)
        lines.extend(f"{source},{float(score)!r}" for source, score in row.items())
    return "\n".join(lines) + "\n"


def write_similarity(out_dir, metric, groups: dict, *, higher_is_more_similar, reduction=None, **meta) -> list:
    """One result file per group ({group: {target: {source: score}}}, "" = ``result.tsv``) and
    ``scores.json`` (the score, its direction, ``meta``); returns the result file paths."""
    out_dir = Path(out_dir)
    paths = []
    for group in sorted(groups, key=group_sort_key):
        path = out_dir / result_file(group)
        atomic_write_text(path, format_similarity(groups[group]))
        paths.append(path)
    info = {"metric": metric, "higher_is_more_similar": higher_is_more_similar, "reduction": reduction,
            "files": [p.name for p in paths], **meta}
    atomic_write_text(out_dir / "scores.json", json.dumps(info, indent=1))
    return paths


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def read_similarity(path) -> dict:
    """``{target: {source: score}}`` from a similarity ``result.tsv``, by name, refusing every malformed
    line (with its file and line number) and every non-finite score."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such similarity file")
    scores, target, target_line = {}, None, 0
    for lineno, raw in text_lines(path):
        line = raw.strip()
        if not line:
            continue
        if "," not in line:  # a target-name line opens a block
            if re.search(r"\s", line) or _is_number(line):
                raise DataError(f"{path}:{lineno}: expected a target name or 'source,score', got {line!r} "
                                f"(layout: a target-name line, then its source,score lines)")
            if target is not None and not scores[target]:
                raise DataError(f"{path}:{target_line}: target {target} has no source,score lines")
            if line in scores:
                raise DataError(f"{path}:{lineno}: target {line} appears twice")
            target, target_line = line, lineno
            scores[target] = {}
            continue
        fields = [x.strip() for x in line.split(",")]
        if len(fields) != 2 or not fields[0]:
            raise DataError(f"{path}:{lineno}: expected 'source,score', got {line!r}")
        if target is None:
            raise DataError(f"{path}:{lineno}: a source,score line before any target-name line")
        source, text = fields
        try:
            score = float(text)
        except ValueError:
            raise DataError(f"{path}:{lineno}: score {text!r} of source {source} is not a number") from None
        if not math.isfinite(score):
            raise DataError(f"{path}:{lineno}: score of source {source} for target {target} is {text}")
        if source in scores[target]:
            raise DataError(f"{path}:{lineno}: source {source} appears twice for target {target}")
        scores[target][source] = score
    if target is None:
        raise DataError(f"{path}: no similarity scores (empty file)")
    if not scores[target]:
        raise DataError(f"{path}:{target_line}: target {target} has no source,score lines")
    return scores


def read_similarity_meta(sim_path):
    """The ``scores.json`` beside a similarity file, or None when there is none."""
    meta = Path(sim_path).parent / "scores.json"
    if not meta.is_file():
        return None
    return read_json(meta, "scores.json")


def similarity_files(sim_path) -> list:
    """``[(path, out_subfolder)]``: one result.tsv (no subfolder), or each ``*_result.tsv`` of a
    folder (block / layer files) with its file stem as subfolder."""
    sim_path = Path(sim_path)
    if sim_path.is_file():
        return [(sim_path, None)]
    if sim_path.is_dir():
        natural = lambda f: [int(x) if x.isdigit() else x for x in re.split(r"(\d+)", f.name)]  # block_2 < block_10
        files = sorted(sim_path.glob("*_result.tsv"), key=natural)
        if not files:
            raise DataError(f"{sim_path}: a folder without *_result.tsv similarity files")
        return [(f, f.stem) for f in files]
    raise DataError(f"{sim_path}: no such similarity file or folder")
