"""Build the paper's 32 CrossFit QA task folders from the Hugging Face hub (or from local copies).

    pip install datasets==5.2.0                          # needed by this script only (requirements.txt)
    python scripts/build_crossfit.py                     # -> data/crossfit/64_16n_seed42 and data/crossfit/full
    python scripts/build_crossfit.py --seeds 100 13 21 42 87 --shots 32   # CrossFit's own five samples
    python scripts/build_crossfit.py --local_dir tests/fixtures/crossfit --out_dir /tmp/cf --shots 1 --shots_per_class 1

Output (the project's CrossFit layout, read by pewe.data and run_study.py):

    {out_dir}/{shots}_{shots_per_class}n_seed{seed}/{task}/{task}_{k}_{seed}_{train,dev,test}.tsv
    {out_dir}/full/{task}/{task}_full_{train,dev,test}.tsv
    {out_dir}/manifest.json      rows and sha256 of every file written, and where each task came from

Lines are ``input<TAB>answer[<TAB>answer...]``, formatted as CrossFit's ``tasks/*.py`` format them
(scripts/crossfit_tasks.py).

Few-shot sampling is CrossFit's ``generate_k_shot_data``: the task's pool is shuffled with
``np.random.seed(seed)`` (the legacy RandomState stream, the same in every numpy version); train
is the first k rows, dev the next k; for the classification tasks (boolq, mc_taco) the shuffled
rows are grouped by label in first-seen order and train takes the first k of each label, dev the
next k. Test is the task's whole test split as CrossFit takes it (HF validation, or the last 20 %
of a seed-42 shuffle where CrossFit carves one: mc_taco, numer_sense, web_questions, lama; 10 %
of validation for eli5).

The paper's setting: Delta_search reads every target from a folder named ``64_16n_seed42``; no
builder for it is public and the paper's text is not at hand, so the meaning of the name is
inferred, not known. Only seed 42 is certain. We read it as CrossFit's rule with k = 64 for the
text-to-text tasks and 16 per class (16 n rows for n classes, CrossFit's own classification k) for
boolq and mc_taco, and make that the default (``--shots``, ``--shots_per_class``; files keep
CrossFit's names, so boolq's are ``boolq_16_42_*.tsv``). ``--shots_per_class 32`` gives the binary
tasks 64 rows as well.

Source splits ("full", for the source deltas): the same pool, shuffled with ``full_seed``; dev is
its first ``full_dev_fraction`` (at most ``full_dev_max`` rows, at least one), train the rest (at most
``full_train_max`` rows, 0 = all), test the task's test split (at most ``full_test_max``, 0 = all).
How the paper cut its full-data sources is not public; this cut is ours. With ``full_seed`` equal to
the few-shot seed the shuffle is the same, so the source dev split begins with the few-shot train
and dev rows and a source delta does not train on them (unless the pool is too small for that).

Two deliberate differences from CrossFit's files, both counted in the manifest: tabs, newlines and
carriage returns inside a field become spaces (CrossFit wrote them raw, which breaks its own TSV
lines), and empty answers are removed, a row left without input or answer dropped, before
sampling (pewe.data.read_tsv refuses them). Where nothing is dropped, the sample is CrossFit's.

Hub ids are the current namespaced ones (datasets 5 refuses bare names); where the main branch
still holds a loading script (datasets >= 4 cannot run them), the repository's parquet export
(``refs/convert/parquet``) is read instead, and a script found on a main branch falls back to it
automatically. Datasets that can no longer be had (eli5: defunct; lama: script-only, no export)
are skipped with one line each; they build from ``--local_dir`` if you hold a copy. Exit status 1
only if a task that should build fails.

A task whose files and manifest entry exist and match (same options, same sha256) is skipped, so
the same command resumes; every file is written atomically. ``--verify`` checks the files against
the manifest and builds nothing.

Local copies (``--local_dir``): ``{local_dir}/{hub_id}/{config or "default"}/{split}.jsonl`` (or
``.json`` / ``.parquet``) in the hub's own schema, read by ``datasets.load_dataset`` on that folder
instead of the repository id; a task with such a folder is read from it, the others from the hub.
tests/fixtures/crossfit is such a folder (invented rows, for the tests).
"""
import hashlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
from crossfit_tasks import PARQUET_REVISION  # noqa: E402
from task_list import QA_task_list  # noqa: E402

out_dir = str(REPO / "data" / "crossfit")  # where the task folders and manifest.json are written
tasks = list(QA_task_list)  # tasks to build (CrossFit names; default the paper's 32)
shots = 64  # k of the text-to-text tasks: k train rows, the next k dev rows
shots_per_class = 16  # k per label of the classification tasks (boolq, mc_taco)
seeds = [42]  # few-shot seeds, one folder each (CrossFit's five: 100 13 21 42 87)
test_max = 0  # keep at most this many test rows, in CrossFit's order (0 = the whole test split)
parts = ["fewshot", "full"]  # what to write: fewshot (targets) and/or full (source splits)
full_seed = 42  # seed of the shuffle that cuts the source splits
full_dev_fraction = 0.1  # share of the pool held out as the source dev split
full_dev_max = 1000  # at most this many source dev rows
full_train_max = 0  # at most this many source train rows (0 = all the rest)
full_test_max = 0  # at most this many source test rows (0 = the whole test split)
local_dir = ""  # local copies ({hub_id}/{config}/{split}.jsonl) used instead of the hub where present
cache_dir = ""  # datasets' cache folder ("" = its default, ~/.cache/huggingface/datasets)
hub = []  # overrides "task=namespace/name[:config][@revision]" of the table in scripts/crossfit_tasks.py
verify = False  # only check every file against manifest.json; build nothing
progress = True  # progress bars

FORMAT_VERSION = 1  # bump when the formatting or sampling changes, so resumed builds redo the files
SPLITS = ("train", "dev", "test")


def fewshot_folder(k, k_per_class, seed):
    return f"{k}_{k_per_class}n_seed{seed}"


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def flatten(field: str) -> str:
    """A field safe inside a TSV line: tabs, newlines, carriage returns -> spaces."""
    return field.replace("\t", " ").replace("\r", " ").replace("\n", " ")


def tsv_text(lines) -> str:
    return "".join(flatten(text) + "\t" + "\t".join(flatten(a) for a in answers) + "\n" for text, answers in lines)


# --- loading ----------------------------------------------------------------------------------------

def parse_hub_override(text):
    """"task=namespace/name[:config][@revision]" -> (task, hub_id, config, revision)."""
    from pewe.errors import UserError

    task, eq, rest = text.partition("=")
    if not eq or "/" not in rest:
        raise UserError(f"--hub {text!r}: expected task=namespace/name[:config][@revision]")
    rest, _, revision = rest.partition("@")
    hub_id, _, config = rest.partition(":")
    return task, hub_id, config or None, revision or None


def local_split_file(folder: Path, split: str):
    for ext in ("jsonl", "json", "parquet"):
        if (folder / f"{split}.{ext}").is_file():
            return f"{split}.{ext}"
    return None


def is_script_error(e):
    return isinstance(e, RuntimeError) and "scripts are no longer supported" in str(e)


def is_config_error(e):
    return isinstance(e, ValueError) and "BuilderConfig" in str(e) and "not found" in str(e)


class NotOnHub(Exception):
    """No loadable form of the dataset on the hub: a loading script on main and no parquet export."""


class Loader:
    """``datasets.load_dataset`` for a task's splits: from its folder under ``local_dir`` where there is
    one, else from the hub; one load per (repository, config, split) per run."""

    def __init__(self, local_dir="", cache_dir="", progress=True):
        self.local_dir = Path(local_dir) if local_dir else None
        self.cache_dir = cache_dir or None
        self.progress = progress
        self.loaded = {}

    def local_folder(self, spec):
        return self.local_dir / spec.hub_id / (spec.config or "default")

    def has_local_copy(self, spec):
        return bool(self.local_dir) and self.local_folder(spec).is_dir()

    def source_of(self, spec):
        if self.has_local_copy(spec):
            return {"local": str(self.local_folder(spec))}
        return {"hub_id": spec.hub_id, "config": spec.config, "revision": spec.revision}

    def rows(self, spec, split):
        """(dataset, where it came from) of one split."""
        key = (spec.hub_id, spec.config, spec.revision, split)
        if key not in self.loaded:
            self.loaded[key] = self._load(spec, split)
        return self.loaded[key]

    def _load(self, spec, split):
        import datasets

        from pewe.errors import UserError

        if not self.progress:
            datasets.disable_progress_bars()
        if self.has_local_copy(spec):
            folder = self.local_folder(spec)
            name = local_split_file(folder, split)
            if name is None:
                raise UserError(f"{folder}: no {split}.jsonl, {split}.json or {split}.parquet")
            ds = datasets.load_dataset(str(folder), data_files={split: name}, split=split, cache_dir=self.cache_dir)
            return ds, {"local": str(folder / name)}
        # The main branch first (or the export, where the table says so). A loading script found on
        # main sends us to the parquet export, whose config is "default" if the script had none.
        attempts = [(spec.revision, spec.config)]
        if spec.revision != PARQUET_REVISION:
            attempts.append((PARQUET_REVISION, spec.config))
        if spec.config is not None:
            attempts.append((PARQUET_REVISION, None))
        tried = []
        for revision, config in attempts:
            try:
                ds = datasets.load_dataset(spec.hub_id, config, split=split, revision=revision,
                                           cache_dir=self.cache_dir)
                return ds, {"hub_id": spec.hub_id, "config": config, "revision": revision or "main"}
            except Exception as e:  # noqa: BLE001 - only "not in this form" errors move on to the next form
                if not (is_script_error(e) or is_config_error(e) or (tried and is_not_found(e))):
                    raise
                tried.append(f"{revision or 'main'} / {config}: {str(e).splitlines()[0]}")
        raise NotOnHub(f"{spec.hub_id}: no loadable form ({'; '.join(tried)})")


def is_not_found(e):
    from datasets.exceptions import DatasetNotFoundError

    return isinstance(e, DatasetNotFoundError)


def mapped(spec, loader, split, counts):
    """CrossFit's ``map_hf_dataset_to_list`` for one split: formatted rows, then our clean-up."""
    import numpy as np
    from tqdm import tqdm

    from crossfit_tasks import FormatError
    from pewe.errors import UserError

    ds, origin = loader.rows(spec, split)
    rng = np.random.RandomState(spec.map_seed) if spec.map_seed is not None else None
    lines = []
    for i, row in enumerate(tqdm(ds, desc=f"{spec.task} {split}", leave=False, disable=not loader.progress or len(ds) < 5000)):
        try:
            out = spec.format_row(row, rng)
        except (FormatError, KeyError, TypeError) as e:
            where = origin.get("local") or f"{origin['hub_id']} ({origin['config']}, {origin['revision']})"
            kind = "missing field" if isinstance(e, KeyError) else "bad row"
            raise UserError(f"{where}: {split} row {i}: {kind}: {e}") from None
        if out is None:
            counts["dropped_by_crossfit"] += 1
            continue
        text, answers = out
        kept = tuple(a for a in answers if flatten(a).strip())
        counts["empty_answers_removed"] += len(answers) - len(kept)
        if not flatten(text).strip() or not kept:
            counts["dropped_unusable"] += 1
            continue
        if text != flatten(text) or any(a != flatten(a) for a in kept):
            counts["fields_flattened"] += 1
        lines.append((text, kept))
    return lines, origin


def crossfit_shuffle(lines, seed):
    """``np.random.seed(seed); np.random.shuffle(lines)`` without touching the global RNG."""
    import numpy as np

    order = list(range(len(lines)))
    np.random.RandomState(seed).shuffle(order)
    return [lines[i] for i in order]


def pool_and_test(spec, loader, counts):
    """CrossFit's ``get_train_test_lines`` for the task."""
    pool, origin = mapped(spec, loader, spec.pool_split, counts)
    if spec.carve:  # no usable validation split: 80/20 of one split after a seed-42 shuffle
        pool = crossfit_shuffle(pool, 42)
        cut = int(0.8 * len(pool))
        return pool[:cut], pool[cut:], [origin]
    test, test_origin = mapped(spec, loader, spec.test_split, counts)
    if spec.test_keep < 1.0:
        test = crossfit_shuffle(test, 42)[:int(spec.test_keep * len(test))]
    return pool, test, [origin, test_origin]


def k_shot(pool, k, seed, per_class):
    """CrossFit's ``generate_k_shot_data``: (train, dev) of a pool."""
    shuffled = crossfit_shuffle(pool, seed)
    if not per_class:
        return shuffled[:k], shuffled[k:2 * k]
    by_label = {}  # first-seen order, as CrossFit's dict
    for line in shuffled:
        by_label.setdefault("\t".join(line[1]), []).append(line)
    train = [line for group in by_label.values() for line in group[:k]]
    dev = [line for group in by_label.values() for line in group[k:2 * k]]
    return train, dev


def full_splits(pool, test, a):
    shuffled = crossfit_shuffle(pool, a.full_seed)
    n_dev = max(1, min(a.full_dev_max, int(round(a.full_dev_fraction * len(shuffled)))))
    dev, train = shuffled[:n_dev], shuffled[n_dev:]
    if a.full_train_max > 0:
        train = train[:a.full_train_max]
    if a.full_test_max > 0:
        test = test[:a.full_test_max]
    return train, dev, test


# --- one task --------------------------------------------------------------------------------------

def planned_files(spec, a):
    """Relative paths of every file the task gets with these options."""
    out = []
    if "fewshot" in a.parts:
        k = a.shots_per_class if spec.per_class else a.shots
        for seed in a.seeds:
            folder = fewshot_folder(a.shots, a.shots_per_class, seed)
            out += [f"{folder}/{spec.task}/{spec.task}_{k}_{seed}_{s}.tsv" for s in SPLITS]
    if "full" in a.parts:
        out += [f"full/{spec.task}/{spec.task}_full_{s}.tsv" for s in SPLITS]
    return out


def signature(spec, a, loader):
    """Everything the task's files depend on; a manifest entry with another signature is rebuilt."""
    sig = {"format_version": FORMAT_VERSION, "source": loader.source_of(spec), "parts": sorted(a.parts),
           "test_max": a.test_max}
    if "fewshot" in a.parts:
        sig.update(k=a.shots_per_class if spec.per_class else a.shots, per_class=spec.per_class,
                   seeds=list(a.seeds))
    if "full" in a.parts:
        sig.update(full_seed=a.full_seed, full_dev_fraction=a.full_dev_fraction, full_dev_max=a.full_dev_max,
                   full_train_max=a.full_train_max, full_test_max=a.full_test_max)
    return sig


def up_to_date(spec, a, loader, manifest, out):
    entry = manifest["tasks"].get(spec.task)
    if not entry or entry.get("signature") != signature(spec, a, loader):
        return False
    for rel in planned_files(spec, a):
        record = manifest["files"].get(rel)
        if record is None or not (out / rel).is_file() or sha256(out / rel) != record["sha256"]:
            return False
    return True


def build_task(spec, a, loader, out):
    """Write the task's files; returns its manifest entry and {relpath: {rows, sha256}}."""
    from pewe.atomic import atomic_write_text

    counts = {"dropped_by_crossfit": 0, "dropped_unusable": 0, "empty_answers_removed": 0, "fields_flattened": 0}
    pool, test, origins = pool_and_test(spec, loader, counts)
    if a.test_max > 0:
        test = test[:a.test_max]
    files = {}
    splits = {}
    if "fewshot" in a.parts:
        k = a.shots_per_class if spec.per_class else a.shots
        for seed in a.seeds:
            train, dev = k_shot(pool, k, seed, spec.per_class)
            folder = fewshot_folder(a.shots, a.shots_per_class, seed)
            for name, lines in zip(SPLITS, (train, dev, test)):
                splits[f"{folder}/{spec.task}/{spec.task}_{k}_{seed}_{name}.tsv"] = lines
    if "full" in a.parts:
        for name, lines in zip(SPLITS, full_splits(pool, test, a)):
            splits[f"full/{spec.task}/{spec.task}_full_{name}.tsv"] = lines
    empty = [rel for rel, lines in splits.items() if not lines]
    if empty:
        from pewe.errors import UserError

        raise UserError(f"{spec.task}: {len(pool)} pool rows and {len(test)} test rows leave "
                        f"{', '.join(empty)} empty")
    for rel, lines in splits.items():
        atomic_write_text(out / rel, tsv_text(lines))
        files[rel] = {"rows": len(lines), "sha256": sha256(out / rel)}
    entry = {"signature": signature(spec, a, loader), "loaded_from": origins,
             "rows": {"pool": len(pool), "test": len(test), **counts}, "files": sorted(files)}
    return entry, files


# --- the run ---------------------------------------------------------------------------------------

def read_manifest(path):
    from pewe.errors import UserError

    if not path.is_file():
        return {"tasks": {}, "files": {}}
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e}); move it away to rebuild") from None
    if not isinstance(manifest.get("tasks"), dict) or not isinstance(manifest.get("files"), dict):
        raise UserError(f"{path}: not a build manifest (no tasks/files)")
    return manifest


def builder_versions():
    """What the files depend on besides the options: the formatting version and the libraries."""
    import datasets
    import numpy

    return {"format_version": FORMAT_VERSION, "datasets": datasets.__version__, "numpy": numpy.__version__}


def write_manifest(path, manifest):
    from pewe.atomic import atomic_write_text

    atomic_write_text(path, json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def verify_files(out, manifest, say):
    """Check every file of the manifest; returns the number of mismatches."""
    bad = 0
    for rel, record in sorted(manifest["files"].items()):
        path = out / rel
        if not path.is_file():
            say(f"missing  {rel}")
            bad += 1
            continue
        rows = sum(1 for line in open(path, encoding="utf-8") if line.strip())
        if sha256(path) != record["sha256"] or rows != record["rows"]:
            say(f"changed  {rel} ({rows} rows, manifest {record['rows']})")
            bad += 1
    say(f"{len(manifest['files']) - bad} of {len(manifest['files'])} files match {out / 'manifest.json'}")
    return bad


def spec_table(a):
    """The task table of scripts/crossfit_tasks.py with the --hub overrides applied."""
    import dataclasses

    from crossfit_tasks import TASKS
    from pewe.errors import UserError

    table = dict(TASKS)
    for text in a.hub:
        task, hub_id, config, revision = parse_hub_override(text)
        if task not in table:
            raise UserError(f"--hub {text!r}: unknown task {task!r}")
        table[task] = dataclasses.replace(table[task], hub_id=hub_id, config=config, revision=revision, lost="",
                                          status="--hub override")
    unknown = [t for t in a.tasks if t not in table]
    if unknown:
        raise UserError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(table)}")
    return table


def run(a, say=print):
    """Build every task of ``a.tasks``; returns the exit status."""
    from tqdm import tqdm

    from pewe.errors import UserError

    if not a.seeds and "fewshot" in a.parts:
        raise UserError("--seeds is empty")
    unknown_parts = set(a.parts) - {"fewshot", "full"}
    if unknown_parts or not a.parts:
        raise UserError(f"--parts must be fewshot and/or full, not {' '.join(a.parts) or 'nothing'}")
    if a.shots < 1 or a.shots_per_class < 1:
        raise UserError("--shots and --shots_per_class must be at least 1")
    if not 0 < a.full_dev_fraction < 1:
        raise UserError(f"--full_dev_fraction must be between 0 and 1, not {a.full_dev_fraction}")
    if a.local_dir and not Path(a.local_dir).is_dir():
        raise UserError(f"{a.local_dir}: no such folder (--local_dir)")
    out = Path(a.out_dir)
    manifest_path = out / "manifest.json"
    manifest = read_manifest(manifest_path)
    if a.verify:
        if not manifest_path.is_file():
            raise UserError(f"{manifest_path}: no manifest to verify against")
        return 1 if verify_files(out, manifest, say) else 0
    table = spec_table(a)
    loader = Loader(a.local_dir, a.cache_dir, a.progress)
    built, skipped, current, failed = [], [], [], []
    hub_down = False
    bar = tqdm(a.tasks, desc="tasks", unit="task", disable=not a.progress)
    for task in bar:
        bar.set_postfix_str(task)
        spec = table[task]
        if spec.lost and not loader.has_local_copy(spec):
            tqdm.write(f"skip {task}: {spec.lost} (a local copy under --local_dir builds it)")
            skipped.append(task)
            continue
        if up_to_date(spec, a, loader, manifest, out):
            current.append(task)
            continue
        if hub_down:
            failed.append(task)
            continue
        try:
            entry, files = build_task(spec, a, loader, out)
        except ConnectionError as e:  # the hub is out of reach: every other task would wait and fail too
            tqdm.write(f"error: {task}: {str(e).splitlines()[0]}; the hub's other tasks are not tried "
                       "(rerun when it can be reached: finished tasks are kept)", file=sys.stderr)
            hub_down = True
            failed.append(task)
            continue
        except Exception as e:  # noqa: BLE001 - one task's failure must not stop the others
            message = f"{type(e).__name__}: {e}" if not isinstance(e, UserError) else str(e)
            if spec.may_be_lost and isinstance(e, NotOnHub):  # search_qa: lost, not broken
                tqdm.write(f"skip {task}: {spec.may_be_lost}; loading it failed ({message.splitlines()[0]})")
                skipped.append(task)
            else:
                tqdm.write(f"error: {task}: {message.splitlines()[0]}", file=sys.stderr)
                failed.append(task)
            continue
        manifest["tasks"][task] = entry
        manifest["files"].update(files)
        manifest["builder"] = builder_versions()
        write_manifest(manifest_path, manifest)
        built.append(task)
    bar.close()
    say(f"{len(built)} built, {len(current)} already up to date, {len(skipped)} skipped, {len(failed)} failed "
        f"-> {out}")
    if failed:
        say(f"failed: {' '.join(failed)}")
    return 1 if failed else 0


def main(argv=None):
    from pewe.cli import run_cli
    from pewe.configurator import configure

    a = configure(globals(), __file__, argv)
    status = [0]

    def work():
        status[0] = run(a)

    rc = run_cli(work)
    return rc or status[0]


if __name__ == "__main__":
    sys.exit(main())
