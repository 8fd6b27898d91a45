"""run_study.py end to end on the tiny fixtures: the report's numbers equal the runs' result.json files,
a rerun trains nothing, shards + a report step equal one run, and the majority-answer flag."""
import csv
import json
import math
import shutil
import statistics
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import dev_all_ckpt
import run_study
from conftest import TINY_TASKS, write_task
from pewe.study import report as study

torch.set_num_threads(1)

SEEDS = [42, 43]
BUDGETS = ["0", "4", "12"]
INITS = ["random", "average", "manual", "Loss", "KL", "Cosine"]


def args(backbone, tasks, out, *extra):
    return ["--model", str(backbone), "--tokenizer_path", str(backbone), "--tasks", *TINY_TASKS,
            "--source_task_dir", str(tasks), "--target_task_dir", str(tasks), "--output_dir", str(out),
            "--seeds", *map(str, SEEDS), "--step_budgets", *BUDGETS, "--scores", "Loss", "KL", "Cosine",
            "--groups", "babi-qa1 babi-qa6", "--source_train_iters", "12", "--target_train_iters", "12",
            "--valid_interval", "4", "--log_interval", "4", "--early_stop", "0", "--learning_rate", "0.03",
            "--predict_batch_size", "16", "--max_output_length", "8", "--sim_batch_size", "8", "--adapter_size", "4",
            "--device", "cpu", "--precision", "fp32", "--quiet", "--progress=false", *extra]


def run(*argv):
    assert run_study.main(list(map(str, argv))) == 0


@pytest.fixture(scope="module")
def full(tiny_backbone, tiny_tasks, tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    run(*args(tiny_backbone, tiny_tasks, out))
    return out


# ----------------------------------------------------------------------------- independent reading

def results(out):
    """{(init, target, seed): result.json} of every target run, found by walking the folders."""
    found = {}
    for path in (out / "adapter" / "targets").glob("*/seed_*/*/runs/*/result.json"):
        seed_dir = path.parents[3]
        found[(seed_dir.parent.name, path.parents[2].name, int(seed_dir.name[5:]))] = json.loads(path.read_text())
    return found


def cell(values):
    if not values:
        return "—"
    return f"{100 * statistics.fmean(values):.2f} ± {100 * statistics.stdev(values):.2f}"


def expected_table(res, value):
    """{init: [cells per target..., mean]} computed from the result.json files."""
    out = {}
    for init in INITS:
        row = [cell([value(res[(init, t, s)]) for s in SEEDS if (init, t, s) in res]) for t in TINY_TASKS]
        per_seed = [statistics.fmean([value(res[(init, t, s)]) for t in TINY_TASKS if (init, t, s) in res])
                    for s in SEEDS if any((init, t, s) in res for t in TINY_TASKS)]
        complete = all((init, t, s) in res for t in TINY_TASKS for s in SEEDS)
        out[init] = row + [cell(per_seed) + ("" if complete or not per_seed else " *")]
    return out


def report_table(text, title):
    """The markdown table under ``### title`` of the adapter section: (header, {init: cells})."""
    lines = text[text.index("## adapter"):].splitlines()
    start = lines.index(f"### {title}") + 2
    table = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        table.append([c.strip() for c in line.strip("|").split("|")])
    return table[0], {r[0]: r[1:] for r in table[2:]}


def majority_share(task_dir, task):
    """Share of the most frequent answer in the test split (one answer per line in these tasks)."""
    answers = [line.split("\t")[1].strip() for line in
               (Path(task_dir) / task / f"{task}_64_42_test.tsv").read_text().splitlines() if line.strip()]
    return Counter(answers).most_common(1)[0][1] / len(answers)


# ----------------------------------------------------------------------------- tests

def test_report_equals_the_runs(full, tiny_tasks):
    res = results(full)
    # random, average, Loss, KL, Cosine for all 3 targets, manual only for the grouped two; 2 seeds each
    assert len(res) == (5 * 3 + 2) * len(SEEDS)
    assert not any(k[:2] == ("manual", "csqa2") for k in res)
    text = (full / "report.md").read_text()
    assert text.count("### Test score after early stopping") == 1  # one method, one table
    header, rows = report_table(text, "Test score after early stopping")
    shares = [majority_share(tiny_tasks, t) for t in TINY_TASKS]
    assert header == ["init", *[f"{t} †" if x > 0.5 else t for t, x in zip(TINY_TASKS, shares)], "mean"]
    majority = [f"{100 * x:.2f}" for x in shares] + [f"{100 * statistics.fmean(shares):.2f}"]
    assert rows == {**expected_table(res, lambda r: r["test_score"]), "*majority answer*": majority}
    assert len(set(rows["random"][:3])) > 1 and rows["random"] != ["0.00 ± 0.00"] * 4  # not a table of zeros
    assert rows["manual"][2] == "—" and rows["manual"][3].endswith(" *")
    for b in BUDGETS:
        _, rows = report_table(text, f"Dev score after {b} updates")
        assert rows == expected_table(res, lambda r: r["budget_scores"][b])
    # the initialisations' files and their heat maps are there and linked
    for init in ["average", "manual", "Loss", "KL", "Cosine"]:
        assert f"heatmaps/adapter_{init}.png" in text and (full / "heatmaps" / f"adapter_{init}.png").is_file()
    assert (full / "gain.png").is_file() and (full / "adapter" / "similarity" / "KL" / "result.tsv").is_file()
    weights = json.loads((full / "adapter" / "init" / "Loss" / "without_csqa2_checkpoint.json").read_text())["weights"]
    assert set(weights) == {"babi-qa1", "babi-qa6"} and abs(sum(weights.values()) - 1) < 1e-9

    with open(full / "report.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert len(csv_rows) == len(res) * (2 + len(BUDGETS))
    for r in csv_rows:
        got = res[(r["init"], r["target"], int(r["seed"]))]
        want = (got["test_score"] if r["split"] == "test" else got["dev_score"]) if r["budget"] == "early_stop" \
            else got["budget_scores"][r["budget"]]
        assert r["method"] == "adapter" and float(r["score"]) == want


def test_rerun_trains_nothing_and_gives_the_same_report(full, tiny_backbone, tiny_tasks):
    log = full / "log.txt"
    before, report = len(log.read_text()), (full / "report.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in full.rglob("*.safetensors")}
    run(*args(tiny_backbone, tiny_tasks, full))
    new = log.read_text()[before:]
    assert new.count("already done") == 3 + 17 * len(SEEDS) + 3 + 14  # sources, runs, similarity parts, inits
    assert "train loss" not in new and "initialised the delta" not in new
    assert {p: p.stat().st_mtime_ns for p in full.rglob("*.safetensors")} == stamps
    assert (full / "report.md").read_text() == report


def test_a_score_added_later_keeps_the_old_scores(full, tiny_backbone, tiny_tasks, tmp_path):
    out = tmp_path / "more"
    shutil.copytree(full, out)
    parts = {p.name: json.loads(p.read_text()) for p in (out / "adapter" / "similarity" / "parts").glob("*.json")}
    run(*args(tiny_backbone, tiny_tasks, out, "--steps", "similarity", "ensemble", "--scores", "Loss", "KL", "EL2N"))
    for name, old in parts.items():
        new = json.loads((out / "adapter" / "similarity" / "parts" / name).read_text())
        assert new["scores"] == {**old["scores"], "EL2N": new["scores"]["EL2N"]}  # old values untouched
    assert len(list((out / "adapter" / "init" / "EL2N").glob("without_*_checkpoint.safetensors"))) == 3


def test_pair_scores_follow_their_definitions(full, tiny_backbone, tiny_tasks, tmp_path):
    """Euclidean and Performance: every other source is tuned on each target (pairs/); the distance
    is summed over tensors here by hand, the gain taken over the zero-shot dev score that the
    stand-alone dev_all_ckpt.py gives; the weights are softmax(sign * score / T) with the paper's T."""
    out = tmp_path / "pairs"
    shutil.copytree(full, out)
    run(*args(tiny_backbone, tiny_tasks, out, "--steps", "similarity", "ensemble", "--scores", "Loss", "Euclidean",
              "Performance", "--pair_train_iters", "8", "--pair_valid_interval", "4"))
    assert dev_all_ckpt.main([
        "--model", str(tiny_backbone), "--tokenizer_path", str(tiny_backbone), "--task_dir", str(tiny_tasks),
        "--test_checkpoint", str(full / "adapter" / "sources"), "--output_dir", str(tmp_path / "dev_all"),
        "--tune_method", "adapter", "--apply_adapter", "--adapter_size", "4", "--predict_batch_size", "16",
        "--max_output_length", "8", "--device", "cpu", "--precision", "fp32", "--quiet", "--progress=false"]) == 0
    zero_shot = json.loads((tmp_path / "dev_all" / "result.json").read_text())
    for target in TINY_TASKS:
        part = json.loads((out / "adapter" / "similarity" / "parts" / f"{target}.json").read_text())
        others = [s for s in TINY_TASKS if s != target]
        assert sorted(part["scores"]["Euclidean"]) == sorted(part["scores"]["Performance"]) == sorted(others)
        for source in others:
            pair = out / "adapter" / "pairs" / target / source
            r = json.loads((pair / "result.json").read_text())
            assert r["updates"] == 8 and r["source"] == source
            src = load_file(str(next((full / "adapter" / "sources" / source).glob("checkpoint-best*.safetensors"))))
            best, last = load_file(str(pair / "checkpoint-best.safetensors")), load_file(str(pair / "checkpoint-last.safetensors"))
            assert sorted(best) == sorted(src) and any(not torch.equal(src[k], last[k]) for k in src)  # it was tuned
            distance = math.fsum(float(torch.linalg.vector_norm(src[k].double() - best[k].double())) for k in src)
            assert part["scores"]["Euclidean"][source] == pytest.approx(distance, rel=1e-9, abs=1e-12)
            assert part["scores"]["Performance"][source] == pytest.approx(r["dev_score"] - zero_shot[target][source])
        for score, sign, temperature in (("Euclidean", -1, 0.1), ("Performance", +1, 0.001)):
            values = {s: sign * part["scores"][score][s] / temperature for s in others}
            top = max(values.values())
            expected = {s: math.exp(v - top) for s, v in values.items()}
            total = sum(expected.values())
            side = out / "adapter" / "init" / score / f"without_{target}_checkpoint.json"
            weights = json.loads(side.read_text())["weights"]
            assert weights == pytest.approx({s: w / total for s, w in expected.items()})
            # the averaged deltas: the tuned ones for Performance (as the original), the sources otherwise
            averaged = {s: load_file(str(out / "adapter" / "pairs" / target / s / "checkpoint-best.safetensors"))
                        if score == "Performance" else
                        load_file(str(next((full / "adapter" / "sources" / s).glob("checkpoint-best*.safetensors"))))
                        for s in others}
            init = load_file(str(side.with_suffix(".safetensors")))
            for k, v in init.items():
                want = sum(weights[s] * averaged[s][k].double() for s in others)
                torch.testing.assert_close(v.double(), want, rtol=1e-5, atol=1e-6)
    assert "Loss" in part["scores"] and (out / "adapter" / "similarity" / "Euclidean" / "result.tsv").is_file()


def test_shards_then_report_equal_one_run(full, tiny_backbone, tiny_tasks, tmp_path):
    out = tmp_path / "sharded"
    reuse = ["--source_dir", full / "{method}" / "sources"]  # the same source deltas, reused
    run(*args(tiny_backbone, tiny_tasks, out, *reuse, "--shard", "0/2"))
    assert not (out / "adapter" / "targets" / "random" / "seed_42" / "babi-qa6").exists()  # shard 1's target
    run(*args(tiny_backbone, tiny_tasks, out, *reuse, "--shard", "1/2"))
    run(*args(tiny_backbone, tiny_tasks, out, *reuse, "--steps", "report"))
    assert (out / "report.md").read_text() == (full / "report.md").read_text()
    assert (out / "report.csv").read_text() == (full / "report.csv").read_text()


def test_majority_answer_flag(tmp_path, capsys):
    """A test set that is 80 % "no": always saying "no" scores 80 and the target is flagged."""
    tasks = tmp_path / "tasks"
    test = [(f"claim {i}", "no") for i in range(8)] + [("claim 8", "yes"), ("claim 9", "yes")]
    write_task(tasks, "csqa2", [("q", "no")], [("q", "no")], test)
    write_task(tasks, "babi-qa6", [("q", "yes")], [("q", "yes")], [("a", "yes"), ("b", "no")])  # 50 %: not flagged
    m = study.majority_baseline(tasks, "csqa2")
    assert (m["answer"], m["share"], m["score"], m["flagged"]) == ("no", 0.8, 0.8, True)
    assert not study.majority_baseline(tasks, "babi-qa6")["flagged"]
    out = tmp_path / "out"
    assert run_study.main(["--steps", "report", "--tasks", "csqa2", "babi-qa6", "--source_task_dir", str(tasks),
                           "--target_task_dir", str(tasks), "--output_dir", str(out), "--quiet"]) == 0
    assert "csqa2: always 'no' (80 % of test) scores 80.00 ACC  <- dominated" in capsys.readouterr().out
    text = (out / "report.md").read_text()
    assert "| csqa2 | ACC | `no` | 80 % | 80.00 | † yes |" in text and "| babi-qa6 † |" not in text
    assert "| init | csqa2 † | babi-qa6 | mean |" in text and "Finished runs: 0 of" in text


@pytest.mark.parametrize("extra,msg", [
    (["--steps", "bogus"], "unknown step(s) bogus"),
    (["--scores", "Euclid"], "Euclid not supported here"),
    (["--shard", "2/2"], "--shard 2/2: expected i/n with 0 <= i < n"),
    (["--temperatures", "Loss=-1"], "is not Name=T with a positive T"),
])
def test_bad_options_fail_cleanly(tiny_tasks, tmp_path, capsys, extra, msg):
    argv = ["--tasks", *TINY_TASKS, "--source_task_dir", str(tiny_tasks), "--target_task_dir", str(tiny_tasks),
            "--output_dir", str(tmp_path), "--steps", "report", "--quiet", *extra]
    assert run_study.main(argv) == 1
    assert msg in capsys.readouterr().err


# ----------------------------------------------------------------------------- the answer, planted apart

def test_the_answer_section_on_planted_and_real_targets(tiny_backbone, tiny_tasks, tmp_path):
    """A planted variant of a pool task beside a real target: the report's paired gains, intervals,
    W/T/L and sibling weights equal what the runs' files give, computed here by hand."""
    from pewe.data import read_tsv
    from pewe.stats import bootstrap_interval

    tasks = tmp_path / "tasks"
    shutil.copytree(tiny_tasks, tasks)
    src = Path(__file__).resolve().parent.parent / "data" / "fewshot" / "planted-babi-qa1"
    rows = {s: [(e.input, *e.answers) for e in read_tsv(src / f"planted-babi-qa1_64_42_{s}.tsv")]
            for s in ("train", "dev", "test")}
    write_task(tasks, "planted-babi-qa1", rows["train"][:16], rows["dev"][:8], rows["test"][:8])
    out = tmp_path / "study"
    run(*args(tiny_backbone, tasks, out, "--targets", "planted-babi-qa1", "babi-qa6", "csqa2", "--scores", "Loss",
              "--inits", "average", "--step_budgets", "0"))
    text = (out / "report.md").read_text()
    assert text.index("## The answer") < text.index("## Majority-answer baseline")
    found = results(out)
    for group, targets in (("planted", ["planted-babi-qa1"]), ("real", ["babi-qa6", "csqa2"])):
        diffs = {t: [found["Loss", t, s]["test_score"] - found["random", t, s]["test_score"] for s in SEEDS]
                 for t in targets}
        mean = statistics.fmean(statistics.fmean(d) for d in diffs.values())
        low, high = bootstrap_interval([statistics.fmean(d) for d in diffs.values()])
        wins = sum(x > 1e-9 for d in diffs.values() for x in d)
        losses = sum(x < -1e-9 for d in diffs.values() for x in d)
        row = next(ln for ln in text.splitlines() if ln.startswith("| Loss |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        at = 1 if group == "planted" else 4  # columns: init, then per group: over random, W/T/L, over average
        assert cells[at] == f"{100 * mean:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}]"
        assert cells[at + 1] == f"{wins}/{2 * len(targets) - wins - losses}/{losses}"
    weights = json.loads((out / "adapter" / "init" / "Loss" / "without_planted-babi-qa1_checkpoint.json").read_text())
    assert f"Loss {weights['weights']['babi-qa1']:.3f}" in text  # the mean weight on the sibling
    assert "planted targets: beats random init with the interval above zero:" in text
    from PIL import Image

    width, height = Image.open(out / "gain.png").size
    assert width == 1200 and 300 < height < 1000  # readable at a page's width
