"""tune_hps_singletask.py through its command line: each method, resume, skip, errors, determinism."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import delta_modules as dm
from pewe.trainer import can_extend, resume_counters
from conftest import REPO, write_task

FAST = ["--train_iters", "20", "--valid_interval", "10", "--log_interval", "10", "--predict_batch_size", "16",
        "--max_output_length", "8", "--precision", "fp32", "--quiet", "--progress=false"]


def tune(args, check=True, **kw):
    cmd = [sys.executable, str(REPO / "tune_hps_singletask.py"), *map(str, args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def base(tiny_backbone, tiny_tasks, out, *extra):
    return ["--do_train", "--do_predict", "--model", tiny_backbone, "--tokenizer_path", tiny_backbone,
            "--task_dir", tiny_tasks, "--output_dir", out, *FAST, *extra]


def read_result_tsv(path):
    rows = [line.split(",") for line in path.read_text().splitlines() if line]
    return {task: (float(dev), float(test)) for task, dev, test in rows}


@pytest.mark.parametrize("method,flags", [
    ("adapter", ["--apply_adapter", "--adapter_type", "houlsby", "--adapter_size", "4"]),
    ("lora", ["--apply_lora", "--lora_r", "2", "--lora_alpha", "4"]),
    ("prefix", ["--apply_prefix", "--prefix_num", "3", "--prefix_r", "4"]),
])
def test_each_method_runs_twenty_steps(tiny_backbone, tiny_tasks, tmp_path, method, flags):
    out = tmp_path / method
    tune(base(tiny_backbone, tiny_tasks, out, "--tune_method", method, *flags, "--tasks", "babi-qa1"))
    res = read_result_tsv(out / "result.tsv")
    assert list(res) == ["babi-qa1"] and all(0 <= v <= 1 for v in res["babi-qa1"])
    best = out / "babi-qa1" / "checkpoint-best.safetensors"
    tensors, config, meta = dm.read_delta(best)
    assert config.method == method and meta["task"] == "babi-qa1" and meta["step"] in (10, 20)
    assert all(method in k for k in tensors)
    run = json.loads(next((out / "babi-qa1" / "runs").glob("*/result.json")).read_text())
    assert run["updates"] == 20 and run["dev_score"] == meta["dev_score"]
    preds = next((out / "babi-qa1" / "runs").glob("*/predictions_test.tsv")).read_text().splitlines()
    assert len(preds) == 1 + 8  # header + one line per test example
    assert (out / "log.txt").read_text().count("update 20") >= 1


def test_rerun_skips_finished_tasks_and_grid_keeps_best(tiny_backbone, tiny_tasks, tmp_path):
    out = tmp_path / "grid"
    args = base(tiny_backbone, tiny_tasks, out, "--tasks", "csqa2", "babi-qa6", "--learning_rate_list", "1e-3", "3e-2")
    tune(args)
    first = (out / "result.tsv").read_text()
    assert len(first.splitlines()) == 4  # a line per (task, lr), as the original appends
    runs = [json.loads(p.read_text()) for p in (out / "csqa2" / "runs").glob("*/result.json")]
    best_run = max(runs, key=lambda r: r["dev_score"])
    _, _, meta = dm.read_delta(out / "csqa2" / "checkpoint-best.safetensors")
    assert meta["dev_score"] == best_run["dev_score"]
    t0 = time.time()
    proc = tune(args)
    assert (out / "result.tsv").read_text() == first  # no duplicated lines
    assert "already done" in (out / "log.txt").read_text()
    assert time.time() - t0 < 60 and "babi-qa6" in proc.stdout


def test_train_and_test_checkpoint(tiny_backbone, tiny_tasks, tmp_path):
    src = tmp_path / "src"
    tune(base(tiny_backbone, tiny_tasks, src, "--tasks", "babi-qa1"))
    init = tmp_path / "init"
    init.mkdir()
    t, c, m = dm.read_delta(src / "babi-qa1" / "checkpoint-best.safetensors")
    dm.save_delta(init / "without_babi-qa6_checkpoint.safetensors", t, c)
    out = tmp_path / "tgt"
    tune(base(tiny_backbone, tiny_tasks, out, "--tasks", "babi-qa6", "--train_checkpoint", init,
              "--train_iters", "0", "--step_budgets", "0"))
    run = json.loads(next((out / "babi-qa6" / "runs").glob("*/result.json")).read_text())
    assert run["init"].endswith("without_babi-qa6_checkpoint.safetensors")
    # zero updates from the loaded init: the kept delta is the init itself
    got = load_file(str(out / "babi-qa6" / "checkpoint-best.safetensors"))
    assert all(torch.equal(got[k], t[k]) for k in t)
    ev = tmp_path / "eval"
    tune(["--do_predict", "--model", tiny_backbone, "--tokenizer_path", tiny_backbone, "--task_dir", tiny_tasks,
          "--output_dir", ev, "--tasks", "babi-qa1", "--test_checkpoint", src, *FAST])
    line = (ev / "result.tsv").read_text().strip()
    assert line.startswith("babi-qa1,None,") and line == f"babi-qa1,None,{read_result_tsv(src / 'result.tsv')['babi-qa1'][1]}"
    assert (ev / "eval_log.txt").exists()


@pytest.mark.parametrize("extra,msg", [
    (["--tune_method", "bitfit"], "unknown --tune_method 'bitfit'"),
    (["--tune_method", "lora", "--apply_adapter"], "conflicts with --apply_adapter"),
    (["--tasks", "nope"], "missing task folder(s) nope"),
    (["--train_checkpoint", "/nonexistent/dir"], "no delta checkpoint matching without_babi-qa1_checkpoint"),
])
def test_bad_options_exit_nonzero_with_a_clear_message(tiny_backbone, tiny_tasks, tmp_path, extra, msg):
    tasks = [] if "--tasks" in extra else ["--tasks", "babi-qa1"]
    args = base(tiny_backbone, tiny_tasks, tmp_path / "o", *tasks)
    proc = tune(args + extra, check=False)
    assert proc.returncode != 0
    assert msg in proc.stderr and "Traceback" not in proc.stderr


def test_bad_tsv_line_is_named(tiny_backbone, tmp_path):
    tasks = tmp_path / "tasks"
    write_task(tasks, "broken", [("fine", "x"), ("no tab at all",)], [("q", "a")], [("q", "a")])
    proc = tune(base(tiny_backbone, tasks, tmp_path / "o"), check=False)
    assert proc.returncode == 1
    assert "broken_64_42_train.tsv:2: no tab" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "broken" / "checkpoint-best.safetensors").exists()


def test_unknown_option_is_refused(tiny_backbone, tiny_tasks, tmp_path):
    proc = tune(base(tiny_backbone, tiny_tasks, tmp_path / "o", "--learning_rate", "1e-3"), check=False)
    assert proc.returncode == 2 and "did you mean --learning_rate_list" in proc.stderr


# ----------------------------------------------------------------------------- determinism and resume

def _deltas(out):
    run = next((out / "babi-qa1" / "runs").glob("*"))
    best = load_file(str(run / "checkpoint-best.safetensors"))
    last = {k: v for k, v in load_file(str(run / "resume.safetensors")).items() if k.startswith("delta.")}
    return best, last


LONG = ["--tasks", "babi-qa1", "--train_iters", "120", "--valid_interval", "10", "--early_stop", "0",
        "--learning_rate_list", "3e-2"]


def test_same_seed_same_tensors_and_sigkill_resume(tiny_backbone, tiny_tasks, tmp_path):
    a, b, k = tmp_path / "a", tmp_path / "b", tmp_path / "killed"
    tune(base(tiny_backbone, tiny_tasks, a, *LONG))
    tune(base(tiny_backbone, tiny_tasks, b, *LONG))
    best_a, last_a = _deltas(a)
    best_b, last_b = _deltas(b)
    assert all(torch.equal(best_a[x], best_b[x]) for x in best_a)
    assert all(torch.equal(last_a[x], last_b[x]) for x in last_a)

    cmd = [sys.executable, str(REPO / "tune_hps_singletask.py"), *map(str, base(tiny_backbone, tiny_tasks, k, *LONG))]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    resume = k / "babi-qa1" / "runs" / "babi-qa1_64_42_lr_0.03_bsz_8" / "resume.safetensors"
    deadline = time.time() + 240
    while time.time() < deadline:
        if resume.exists():
            try:
                if resume_counters(resume)["num_updates"] >= 30:
                    break
            except Exception:  # the file is replaced atomically, but may vanish between exists() and open
                pass
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = resume_counters(resume)
    assert not killed_at["done"] and 30 <= killed_at["num_updates"] < 120
    assert not (k / "babi-qa1" / "runs" / "babi-qa1_64_42_lr_0.03_bsz_8" / "result.json").exists()
    tune(base(tiny_backbone, tiny_tasks, k, *LONG))
    assert f"resuming {resume.parent} at update {killed_at['num_updates']}" in (k / "log.txt").read_text()
    best_k, last_k = _deltas(k)
    assert all(torch.equal(best_a[x], best_k[x]) for x in best_a)
    assert all(torch.equal(last_a[x], last_k[x]) for x in last_a)
    assert (k / "result.tsv").read_text() == (a / "result.tsv").read_text()

    # a finished run started again with a larger budget continues, and ends as the longer run
    e = tmp_path / "extended"
    short = [("60" if x == "120" else x) for x in LONG]
    tune(base(tiny_backbone, tiny_tasks, e, *short))
    run_e = e / "babi-qa1" / "runs" / "babi-qa1_64_42_lr_0.03_bsz_8"
    assert json.loads((run_e / "result.json").read_text())["updates"] == 60
    tune(base(tiny_backbone, tiny_tasks, e, *LONG))
    assert f"extending {run_e} from 60 to 120 updates" in (e / "log.txt").read_text()
    assert json.loads((run_e / "result.json").read_text())["updates"] == 120
    best_e, last_e = _deltas(e)
    assert all(torch.equal(best_a[x], best_e[x]) for x in best_a)
    assert all(torch.equal(last_a[x], last_e[x]) for x in last_a)
    assert (e / "result.tsv").read_text() == (a / "result.tsv").read_text()
    tune(base(tiny_backbone, tiny_tasks, e, *short))  # a smaller budget than done: skipped, not cut
    assert json.loads((run_e / "result.json").read_text())["updates"] == 120


def test_only_runs_that_used_their_whole_budget_are_extended():
    done = {"done": True, "num_updates": 100, "stopped_early": False}
    assert can_extend(done, 200)
    assert not can_extend(done, 100) and not can_extend(done, 50)
    assert not can_extend({**done, "stopped_early": True}, 200)
    assert not can_extend({**done, "done": False}, 200)  # still running or killed: that is a plain resume
    assert can_extend({"done": True, "num_updates": 100}, 200)  # counters written before the flag existed
