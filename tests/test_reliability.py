"""Each class of bad input and fault of the second reliability round: its exit status, its one
``error:`` line (never a traceback), and that nothing half-written or wrong is left behind."""
import errno
import json
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

import delta_modules as dm
import run_study
import tune_hps_singletask
from conftest import REPO, TINY_TASKS, write_task
from pewe import layout
from pewe.data import read_tsv
from pewe.layout import file_sha256, init_checkpoint_for, read_similarity, rebuild_result_tsv
from unit_model import unit_model_average

FAST = ["--train_iters", "20", "--valid_interval", "10", "--log_interval", "10", "--predict_batch_size", "16",
        "--max_output_length", "8", "--precision", "fp32", "--quiet", "--progress=false"]


def tune_args(backbone, tasks, out, *extra):
    return ["--do_train", "--do_predict", "--model", backbone, "--tokenizer_path", backbone, "--task_dir", tasks,
            "--output_dir", out, "--tasks", "babi-qa1", *FAST, *extra]


def tune(*argv) -> int:
    return tune_hps_singletask.main([str(a) for a in argv])


def one_error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def run_dir(out):
    return next((out / "babi-qa1" / "runs").iterdir())


@pytest.fixture(scope="module")
def finished(tiny_backbone, tiny_tasks, tmp_path_factory):
    """A finished 20-update adapter run (folder, its result.json text)."""
    out = tmp_path_factory.mktemp("finished")
    assert tune(*tune_args(tiny_backbone, tiny_tasks, out)) == 0
    return out, (run_dir(out) / "result.json").read_text()


@pytest.fixture(scope="module")
def other_backbone(tiny_backbone, tmp_path_factory):
    """The tiny backbone's architecture and tokenizer with other weights."""
    from transformers import AutoTokenizer

    from pewe.backbone import build_model, save_backbone, small_config

    tok = AutoTokenizer.from_pretrained(str(tiny_backbone))
    cfg = small_config(tok, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8)
    return save_backbone(build_model(cfg, seed=1), tok, tmp_path_factory.mktemp("other-t5"))


# --------------------------------------------------------------------------- 1. a run folder knows what made it

@pytest.mark.parametrize("extra,key", [
    (["--seed", "43"], "seed"),
    (["--tune_method", "lora"], "delta.method"),
    (["--test_checkpoint", "OTHER"], "test_checkpoint"),
    (["--model", "OTHER_MODEL"], "model"),
])
def test_a_rerun_with_other_options_is_refused(finished, tiny_backbone, tiny_tasks, other_backbone, tmp_path,
                                               capsys, extra, key):
    out, result = finished
    if "OTHER" in extra:
        other = tmp_path / "other.safetensors"
        t, c, _ = dm.read_delta(out / "babi-qa1" / "checkpoint-best.safetensors")
        dm.save_delta(other, {k: v + 1 for k, v in t.items()}, c)
        extra = ["--test_checkpoint", other]
    if "OTHER_MODEL" in extra:
        extra = ["--model", other_backbone, "--tokenizer_path", tiny_backbone]
    assert tune(*tune_args(tiny_backbone, tiny_tasks, out), *extra) == 1
    line = one_error(capsys)
    assert f"made with {key} = " in line and "--overwrite" in line
    assert (run_dir(out) / "result.json").read_text() == result  # the old result is neither reported nor touched


def test_a_killed_run_restarted_with_another_seed_is_refused_and_overwrite_starts_afresh(
        tiny_backbone, tiny_tasks, tmp_path, capsys):
    out = tmp_path / "o"
    assert tune(*tune_args(tiny_backbone, tiny_tasks, out)) == 0
    (run_dir(out) / "result.json").unlink()  # as if killed after its last validation: resume.safetensors stays
    assert tune(*tune_args(tiny_backbone, tiny_tasks, out), "--seed", "43") == 1
    assert "made with seed = 42, not 43" in one_error(capsys)
    assert tune(*tune_args(tiny_backbone, tiny_tasks, out), "--seed", "43", "--overwrite") == 0
    fresh = tmp_path / "fresh"
    assert tune(*tune_args(tiny_backbone, tiny_tasks, fresh), "--seed", "43") == 0
    assert (out / "result.tsv").read_text() == (fresh / "result.tsv").read_text()
    assert json.loads((run_dir(out) / "run.json").read_text())["seed"] == 43


def test_a_larger_budget_is_the_one_allowed_difference(finished, tiny_backbone, tiny_tasks, tmp_path):
    out, _ = finished
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    assert tune(*tune_args(tiny_backbone, tiny_tasks, copy), "--train_iters", "30") == 0
    assert json.loads((run_dir(copy) / "result.json").read_text())["updates"] == 30


# --------------------------------------------------------------------------- 2. derived files follow

def study_args(backbone, tasks, out, *extra):
    return ["--model", backbone, "--tokenizer_path", backbone, "--tasks", "babi-qa1", "babi-qa6",
            "--source_task_dir", tasks, "--target_task_dir", tasks, "--output_dir", out, "--methods", "lora",
            "--lora_r", "2", "--seeds", "42", "--scores", "Loss", "--inits", "average", "--step_budgets", "0",
            "--source_train_iters", "10", "--target_train_iters", "10", "--valid_interval", "5",
            "--log_interval", "5", "--predict_batch_size", "16", "--max_output_length", "8", "--precision",
            "fp32", "--quiet", "--progress=false", *extra]


def test_an_extended_source_refreshes_its_copy_and_stale_scores_are_refused(tiny_backbone, tiny_tasks, tmp_path,
                                                                              capsys):
    out = tmp_path / "study"
    fast = ["--learning_rate", "0.03"]  # learns within 20 updates, so the best moves when the budget grows
    assert run_study.main(list(map(str, study_args(tiny_backbone, tiny_tasks, out, "--steps", "sources", "random",
                                                   "similarity", *fast)))) == 0
    before = {t: file_sha256(out / "lora" / "sources" / t / "checkpoint-best.safetensors") for t in ("babi-qa1", "babi-qa6")}
    assert run_study.main(list(map(str, study_args(tiny_backbone, tiny_tasks, out, "--steps", "sources",
                                                   "--source_train_iters", "40", *fast)))) == 0
    moved = 0
    for task in ("babi-qa1", "babi-qa6"):
        folder = out / "lora" / "sources" / task
        best_run = next((folder / "runs").iterdir())
        assert json.loads((best_run / "result.json").read_text())["updates"] == 40
        assert file_sha256(folder / "checkpoint-best.safetensors") == file_sha256(best_run / "checkpoint-best.safetensors")
        moved += file_sha256(folder / "checkpoint-best.safetensors") != before[task]
    assert moved  # at least one source's best moved with the larger budget (else this test shows nothing)
    capsys.readouterr()
    assert run_study.main(list(map(str, study_args(tiny_backbone, tiny_tasks, out, "--steps", "similarity", *fast)))) == 1
    assert "made with other sources than now" in one_error(capsys)


# --------------------------------------------------------------------------- 3. non-finite numbers stop the work

def nan_source(folder, task, tensors, config):
    bad = {k: v.clone() for k, v in tensors.items()}
    next(iter(bad.values())).view(-1)[0] = float("nan")
    path = folder / task / "checkpoint-best.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    dm.write_file_atomically(path, __import__("safetensors.torch", fromlist=["save"]).save(bad))  # no check on this path
    path.with_suffix(".json").write_text(json.dumps({"delta": config.__dict__}))
    return path


def test_a_nan_in_a_source_delta_is_refused(finished, tmp_path, capsys):
    out, _ = finished
    tensors, config, _ = dm.read_delta(out / "babi-qa1" / "checkpoint-best.safetensors")
    sources = tmp_path / "sources"
    for task in TINY_TASKS:
        dm.save_delta(sources / task / "checkpoint-best.safetensors", tensors, config)
    bad = nan_source(sources, "babi-qa6", tensors, config)
    save = tmp_path / "init"
    assert unit_model_average.main([f"--source_ckpt_path={sources}",
                                    f"--save_ckpt_path={save}", f"--task_list={','.join(TINY_TASKS)}"]) == 1
    assert f"{bad}: tensor" in one_error(capsys) and not save.exists()
    with pytest.raises(dm.DeltaError, match="non-finite"):
        dm.save_delta(tmp_path / "x.safetensors", {k: v * float("inf") for k, v in tensors.items()}, config)
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "x.json").exists()


def test_training_from_a_nan_delta_is_refused(finished, tiny_backbone, tiny_tasks, tmp_path, capsys):
    out, _ = finished
    tensors, config, _ = dm.read_delta(out / "babi-qa1" / "checkpoint-best.safetensors")
    init = tmp_path / "init"
    nan_source(tmp_path, "bad", tensors, config).rename(init.with_suffix(".safetensors"))
    (tmp_path / "bad" / "checkpoint-best.json").rename(init.with_suffix(".json"))
    target = tmp_path / "t"
    assert tune(*tune_args(tiny_backbone, tiny_tasks, target), "--train_checkpoint", init.with_suffix(".safetensors")) == 1
    assert "non-finite" in one_error(capsys)
    assert not list(target.rglob("result.json")) and not list(target.rglob("checkpoint-best.safetensors"))


@pytest.mark.parametrize("lr,msg", [("nan", "learning_rate must be a positive finite number"),
                                    ("-5e-4", "learning_rate must be a positive finite number"),
                                    ("1e30", "the training loss is nan")])
def test_bad_learning_rates_and_a_nan_loss_stop_with_one_line(tiny_backbone, tiny_tasks, tmp_path, capsys, lr, msg):
    out = tmp_path / "o"
    assert tune(*tune_args(tiny_backbone, tiny_tasks, out), "--learning_rate_list", lr) == 1
    line = one_error(capsys)
    assert msg in line
    if lr == "1e30":
        assert "update " in line  # names the update
    else:
        assert not out.exists()  # refused before any work
    assert not list(tmp_path.rglob("result.json")) and not list(tmp_path.rglob("checkpoint-best.safetensors"))


# --------------------------------------------------------------------------- 4. no lost or duplicated lines

def test_two_writers_of_one_folder_lose_no_line(tmp_path, monkeypatch):
    slow = layout.read_json

    def slow_read(path, what="file"):  # a slow shared file system: each read takes a while
        time.sleep(0.05)
        return slow(path, what)

    monkeypatch.setattr(layout, "read_json", slow_read)

    def shard(task):
        done = tmp_path / task / "runs" / "r" / "result.json"
        done.parent.mkdir(parents=True)
        done.write_text(json.dumps({"dev_score": 0.5, "test_score": 0.25}))
        rebuild_result_tsv(tmp_path)

    threads = [threading.Thread(target=shard, args=(f"t{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert (tmp_path / "result.tsv").read_text().splitlines() == [f"t{i},0.5,0.25" for i in range(6)]
    rebuild_result_tsv(tmp_path)  # a rebuild never adds a line twice
    assert len((tmp_path / "result.tsv").read_text().splitlines()) == 6


@pytest.mark.parametrize("name", ["a,b", "a b", "a\tb"])
def test_task_names_the_files_cannot_carry_are_refused_at_the_start(tiny_backbone, tmp_path, capsys, name):
    rows = [("q", "a")] * 4
    write_task(tmp_path / "tasks", name.replace("\t", "_t_") if "\t" in name else name, rows, rows, rows)
    out = tmp_path / "o"
    if "\t" in name:  # a tab cannot be in a folder name here; the study's --tasks can carry one
        argv = study_args(tiny_backbone, tmp_path / "tasks", out, "--tasks", name, "other")
        assert run_study.main(list(map(str, argv))) == 1
    else:
        assert tune("--do_train", "--model", tiny_backbone, "--task_dir", tmp_path / "tasks", "--output_dir", out,
                    *FAST) == 1
    assert "the result files cannot carry it" in one_error(capsys) and not list(tmp_path.rglob("result.json"))


# --------------------------------------------------------------------------- 5. leave-one-out by exact names

def test_an_initialisation_is_found_by_its_literal_name(tmp_path):
    config = dm.DeltaConfig("lora", lora_r=1)
    for task, value in (("t1", 1.0), ("t[1]", 2.0)):
        dm.save_delta(tmp_path / f"without_{task}_checkpoint.safetensors", {"x": torch.full((2,), value)}, config)
    got = init_checkpoint_for(tmp_path, "t[1]")
    assert got.name == "without_t[1]_checkpoint.safetensors" and dm.read_delta(got)[0]["x"][0] == 2.0
    (tmp_path / "without_t[1]_checkpoint.safetensors").unlink()
    with pytest.raises(dm.DeltaError, match=r"without_t\[1\]_checkpoint"):
        init_checkpoint_for(tmp_path, "t[1]")  # t1's average (which holds t[1]'s own source) is never taken


# --------------------------------------------------------------------------- 6. a checkpoint and its JSON are one unit

def test_a_json_that_does_not_belong_to_its_tensors_is_detected(tmp_path):
    config = dm.DeltaConfig("lora", lora_r=1)
    path = tmp_path / "d.safetensors"
    dm.save_delta(path, {"x": torch.zeros(3)}, config, temperature=0.1)
    old_tensors = path.read_bytes()
    dm.save_delta(path, {"x": torch.ones(3)}, config, temperature=0.01)
    path.write_bytes(old_tensors)  # killed between the JSON's rename and the tensors' rename
    with pytest.raises(dm.DeltaError, match="not the ones d.json describes"):
        dm.read_delta(path)


def test_a_delta_field_that_is_not_an_object_is_one_error(tmp_path):
    path = tmp_path / "d.safetensors"
    dm.save_delta(path, {"x": torch.zeros(3)}, dm.DeltaConfig("lora", lora_r=1))
    path.with_suffix(".json").write_text(json.dumps({"delta": "lora"}))
    with pytest.raises(dm.DeltaError, match='d.json: not a delta config .*"delta" is a str'):
        dm.read_delta(path)


# --------------------------------------------------------------------------- 7. every number range-checked

@pytest.mark.parametrize("extra,msg", [
    (["--bsz_list", "-4"], "batch_size must be a whole number >= 1"),
    (["--bsz_list", "0"], "batch_size must be a whole number >= 1"),
    (["--valid_interval", "0"], "valid_interval must be a whole number >= 1"),
    (["--log_interval", "0"], "log_interval must be a whole number >= 1"),
    (["--train_iters", "-1"], "train_iters must be a whole number >= 0"),
    (["--predict_batch_size", "0"], "predict_batch_size must be a whole number >= 1"),
    (["--max_output_length", "0"], "max_output_length must be a whole number >= 1"),
    (["--tune_method", "lora", "--lora_r", "0"], "lora_r must be a whole number >= 1"),
    (["--tune_method", "prefix", "--prefix_num", "-1"], "prefix_num must be a whole number >= 1"),
    (["--adapter_size", "0"], "adapter_size must be a whole number >= 1"),
    (["--step_budgets", "-5"], "--step_budgets must be >= 0"),
    (["--precision", "fp16"], "--precision must be auto, fp32 or bf16"),
    (["--device", "cuda"], "no CUDA GPU is available here"),
])
def test_numbers_are_checked_before_any_work(tiny_backbone, tiny_tasks, tmp_path, extra, msg):
    if "--device" in extra and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "o"
    proc = subprocess.run([sys.executable, str(REPO / "tune_hps_singletask.py"),
                           *map(str, tune_args(tiny_backbone, tiny_tasks, out)), *extra],
                          capture_output=True, text=True, timeout=120)  # a hang fails here instead of spinning
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and lines == [lines[-1]] and msg in lines[-1] and "Traceback" not in proc.stderr
    assert not out.exists()


@pytest.mark.parametrize("extra,msg", [
    (["--batch_size", "-4"], "batch_size must be a whole number >= 1"),
    (["--target_train_iters", "-3"], "train_iters must be a whole number >= 0"),
    (["--pair_valid_interval", "0"], "valid_interval must be a whole number >= 1"),
    (["--sim_batch_size", "0"], "--predict_batch_size must be >= 1"),
])
def test_the_study_checks_its_numbers_before_any_work(tiny_backbone, tiny_tasks, tmp_path, capsys, extra, msg):
    out = tmp_path / "o"
    assert run_study.main(list(map(str, study_args(tiny_backbone, tiny_tasks, out, *extra)))) == 1
    assert msg in one_error(capsys) and not out.exists()


# --------------------------------------------------------------------------- 8. one line, never a traceback

def test_invalid_utf8_names_file_and_line(tiny_backbone, tmp_path, capsys):
    write_task(tmp_path / "tasks", "babi-qa1", [("fine", "x"), ("also fine", "y")], [("q", "a")], [("q", "a")])
    train = tmp_path / "tasks" / "babi-qa1" / "babi-qa1_64_42_train.tsv"
    train.write_bytes(train.read_bytes() + b"caf\xe9\tbad\n")
    assert tune(*tune_args(tiny_backbone, tmp_path / "tasks", tmp_path / "o")) == 1
    assert f"{train}:3: not valid UTF-8" in one_error(capsys)


def test_a_read_only_output_folder_is_one_line(tiny_backbone, tiny_tasks, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    real_open = open

    def read_only_open(file, mode="r", *args, **kwargs):  # root ignores chmod: refuse writes under out instead
        if str(file).startswith(str(out)) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only_open)
    assert tune(*tune_args(tiny_backbone, tiny_tasks, out)) == 1
    assert one_error(capsys) == f"error: {out / 'log.txt'}: Read-only file system"


def test_a_full_disk_is_one_line_and_leaves_no_partial_file(tiny_backbone, tiny_tasks, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(dm.os, "fsync", full)  # every atomic write fails at its flush to disk
    assert tune(*tune_args(tiny_backbone, tiny_tasks, out)) == 1
    line = one_error(capsys)
    assert "No space left on device" in line and str(out) in line
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


@pytest.mark.parametrize("what", ["result.json", "resume.safetensors"])
def test_a_damaged_run_file_is_one_line(finished, tiny_backbone, tiny_tasks, tmp_path, capsys, what):
    out = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(finished[0]), str(out)], check=True)
    if what == "resume.safetensors":
        (run_dir(out) / "result.json").unlink()  # so the run resumes
    (run_dir(out) / what).write_bytes(b"\x00garbage{")
    assert tune(*tune_args(tiny_backbone, tiny_tasks, out)) == 1
    assert f"{run_dir(out) / what}: not a readable" in one_error(capsys)


def test_a_damaged_scores_json_is_one_line(tmp_path, capsys):
    from unit_model import unit_model_others

    config = dm.DeltaConfig("lora", lora_r=1)
    for task in ("t1", "t2"):
        write_task(tmp_path / "tasks", task, [("q", "a")], [("q", "a")], [("q", "a")])
        dm.save_delta(tmp_path / "sources" / task / "checkpoint-best.safetensors", {"x": torch.zeros(2)}, config)
    (tmp_path / "sim" / "result.tsv").parent.mkdir()
    (tmp_path / "sim" / "result.tsv").write_text("t1\nt2,0.5\nt2\nt1,0.5\n")
    (tmp_path / "sim" / "scores.json").write_text("{not json")
    assert unit_model_others.main([f"--origin_data_path={tmp_path / 'sim' / 'result.tsv'}",
                                   f"--source_ckpt_path={tmp_path / 'sources'}", f"--save_ckpt_path={tmp_path / 'init'}",
                                   "--delta=lora"]) == 1
    assert f"{tmp_path / 'sim' / 'scores.json'}: not a readable" in one_error(capsys) and not (tmp_path / "init").exists()


@pytest.mark.parametrize("extra,msg", [
    (["--shard", "x"], "--shard x: expected i/n"),
    (["--model", "data/t5-mni"], "data/t5-mni: no such model folder"),
    (["--train_checkpoint", "2024"], "2024: no delta checkpoint matching without_babi-qa1_checkpoint"),
    (["--model", "nobody/no-such-t5"], "nobody/no-such-t5: cannot load this model"),
])
def test_bad_paths_and_options_are_one_line(tiny_backbone, tiny_tasks, tmp_path, extra, msg):
    args = tune_args(tiny_backbone, tiny_tasks, tmp_path / "o")
    if "--model" in extra:
        args = [a for a in args if a != tiny_backbone]
        args = [*args[:args.index("--model") + 1], extra[1], *args[args.index("--model") + 1:]]
        args.remove("--tokenizer_path")
        extra = []
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}  # no waiting for a network that is not there
    proc = subprocess.run([sys.executable, str(REPO / "tune_hps_singletask.py"), *map(str, args), *extra],
                          capture_output=True, text=True, timeout=120, cwd=REPO, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and msg in lines[0] and "Traceback" not in proc.stderr


def test_a_byte_order_mark_is_stripped(tmp_path):
    tsv = tmp_path / "x.tsv"
    tsv.write_bytes("\ufeffwho is here?\tMary\n".encode())
    assert read_tsv(tsv)[0].input == "who is here?"
    sim = tmp_path / "result.tsv"
    sim.write_bytes("\ufefft1\nt2,0.5\n".encode())
    assert read_similarity(sim) == {"t1": {"t2": 0.5}}


# --------------------------------------------------------------------------- 9. smaller points

def test_result_files_get_the_users_umask(finished):
    out, _ = finished
    mask = os.umask(0)
    os.umask(mask)
    for path in (out / "result.tsv", out / "babi-qa1" / "checkpoint-best.safetensors", run_dir(out) / "result.json"):
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_a_bad_test_split_is_found_before_training(tiny_backbone, tmp_path, capsys):
    rows = [("who?", "a"), ("where?", "b")]
    write_task(tmp_path / "tasks", "babi-qa1", rows, rows, rows)
    (tmp_path / "tasks" / "babi-qa1" / "babi-qa1_64_42_test.tsv").write_text("no tab here\n")
    assert tune(*tune_args(tiny_backbone, tmp_path / "tasks", tmp_path / "o")) == 1
    assert "babi-qa1_64_42_test.tsv:1: no tab" in one_error(capsys)
    assert not list(tmp_path.rglob("resume.safetensors")) and not list(tmp_path.rglob("checkpoint-best.safetensors"))


@pytest.mark.parametrize("larger", [30, 60])
def test_extending_a_budget_below_the_validation_interval_ends_as_a_fresh_run(tiny_backbone, tiny_tasks, tmp_path,
                                                                           larger):
    def args(out, iters):
        return [*tune_args(tiny_backbone, tiny_tasks, out), "--train_iters", str(iters), "--valid_interval", "50"]

    assert tune(*args(tmp_path / "ext", 10)) == 0
    assert tune(*args(tmp_path / "ext", larger)) == 0
    assert tune(*args(tmp_path / "fresh", larger)) == 0
    ext, fresh = (dm.read_delta(p / "babi-qa1" / "checkpoint-best.safetensors") for p in (tmp_path / "ext", tmp_path / "fresh"))
    assert all(torch.equal(ext[0][k], fresh[0][k]) for k in ext[0]) and ext[2]["step"] == fresh[2]["step"]
    assert (tmp_path / "ext" / "result.tsv").read_text() == (tmp_path / "fresh" / "result.tsv").read_text()


def test_the_readme_snippet_loads_the_backbone_in_float32():
    code = ("from transformers import T5ForConditionalGeneration\n"
            "model = T5ForConditionalGeneration.from_pretrained('data/t5-mini')\n"
            "print(next(model.parameters()).dtype)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.stdout.strip().splitlines()[-1] == "torch.float32", proc.stderr
    assert (REPO / "data" / "t5-mini" / "model.safetensors").stat().st_size < 14_000_000  # stays bf16 on disk
