"""New tasks outside the pool of sources: transfer.py end to end, every entry point with targets that
are not sources, and the bad inputs of the everyday use."""
import json
import math

import pytest
import torch

import delta_modules as dm
import run_study
import transfer
import tune_hps_singletask
from conftest import write_task
from pewe.layout import read_similarity
from unit_model import unit_model_average, unit_model_others

FAST = ["--predict_batch_size", "16", "--max_output_length", "8", "--precision", "fp32", "--quiet", "--progress=false"]
POOL = ("babi-qa1", "csqa2")


@pytest.fixture(scope="module")
def pool(tiny_backbone, tiny_tasks, tmp_path_factory):
    """LoRA source deltas for babi-qa1 and csqa2 (tune_hps_singletask.py's output folder)."""
    out = tmp_path_factory.mktemp("pool")
    assert tune_hps_singletask.main(list(map(str, [
        "--do_train", "--do_predict", "--model", tiny_backbone, "--tokenizer_path", tiny_backbone, "--task_dir",
        tiny_tasks, "--output_dir", out, "--tasks", *POOL, "--tune_method", "lora", "--lora_r", "2",
        "--train_iters", "10", "--valid_interval", "5", "--learning_rate_list", "0.03", *FAST]))) == 0
    return out


def transfer_args(backbone, tasks, pool, out, *extra):
    return list(map(str, ["--task_dir", tasks, "--source_dir", pool, "--method", "lora", "--model", backbone,
                          "--tokenizer_path", backbone, "--output_dir", out, "--train_iters", "10",
                          "--valid_interval", "5", "--log_interval", "5", *FAST, *extra]))


def hand_average(pool_dir, weights):
    out = None
    for s, w in weights.items():
        t, _, _ = dm.read_delta(pool_dir / s / "checkpoint-best.safetensors")
        out = {k: v * w for k, v in t.items()} if out is None else {k: out[k] + v * w for k, v in t.items()}
    return out


def test_a_new_task_outside_the_pool(tiny_backbone, tiny_tasks, pool, tmp_path, capsys):
    out = tmp_path / "new"
    assert transfer.main(transfer_args(tiny_backbone, tiny_tasks, pool, out, "--tasks", "babi-qa6",
                                       "--compare_random")) == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert report in printed and "## babi-qa6" in report and "from random init" in report
    scores = read_similarity(out / "lora" / "similarity" / "Loss" / "result.tsv")
    assert list(scores) == ["babi-qa6"] and list(scores["babi-qa6"]) == list(POOL)
    part = json.loads((out / "lora" / "similarity" / "parts" / "babi-qa6.json").read_text())
    temp = 0.1  # Loss: a mean per label token, so its temperature is not scaled
    z = [-scores["babi-qa6"][s] / temp for s in POOL]
    want = [math.exp(v - max(z)) / sum(math.exp(u - max(z)) for u in z) for v in z]
    tensors, _, meta = dm.read_delta(out / "lora" / "init" / "Loss" / "without_babi-qa6_checkpoint.safetensors")
    assert list(meta["weights"]) == list(POOL) and meta["weights"] == pytest.approx(dict(zip(POOL, want)), rel=1e-9)
    assert part["target"] == "babi-qa6"
    expect = hand_average(pool, meta["weights"])
    assert all(torch.allclose(tensors[k], expect[k], atol=1e-7) for k in expect)
    final = (out / "lora" / "init" / "Loss" / "final_weight.txt").read_text().splitlines()
    assert final[0] == "babi-qa6" and len(eval(final[1])) == 2
    for init in ("Loss", "random"):
        result = next((out / "lora" / "targets" / init / "seed_42" / "babi-qa6" / "runs").glob("*/result.json"))
        assert json.loads(result.read_text())["test_score"] is not None


def test_a_pool_that_overlaps_the_new_tasks(tiny_backbone, tiny_tasks, pool, tmp_path):
    out = tmp_path / "overlap"
    assert transfer.main(transfer_args(tiny_backbone, tiny_tasks, pool, out, "--tasks", "babi-qa1", "babi-qa6")) == 0
    _, _, own = dm.read_delta(out / "lora" / "init" / "Loss" / "without_babi-qa1_checkpoint.safetensors")
    _, _, new = dm.read_delta(out / "lora" / "init" / "Loss" / "without_babi-qa6_checkpoint.safetensors")
    assert own["weights"] == {"csqa2": 1.0}  # babi-qa1 leaves its own source out
    assert set(new["weights"]) == set(POOL)
    weights = (out / "lora" / "init" / "Loss" / "weights.csv").read_text().splitlines()
    assert weights[0] == "target,source,weight,score" and len(weights) == 1 + 1 + 2


def test_a_task_without_test_is_tuned_and_reported(tiny_backbone, tiny_tasks, pool, tmp_path):
    rows = [(f"who is in room {i}?", f"p{i % 3}") for i in range(8)]
    d = write_task(tmp_path / "tasks", "mine", rows, rows[:4], rows[:4])
    (d / "mine_64_42_test.tsv").unlink()
    out = tmp_path / "o"
    assert transfer.main(transfer_args(tiny_backbone, tmp_path / "tasks", pool, out)) == 0
    assert "| from the Loss-weighted average | " in (out / "report.md").read_text()
    result = next((out / "lora" / "targets" / "Loss" / "seed_42" / "mine" / "runs").glob("*/result.json"))
    assert json.loads(result.read_text())["test_score"] is None and json.loads(result.read_text())["dev_score"] is not None


def one_error(capsys):
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_bad_inputs_of_the_everyday_use(tiny_backbone, tiny_tasks, pool, tmp_path, capsys):
    from pewe.backbone import build_model, save_backbone, small_config
    from transformers import AutoTokenizer

    # a task folder without a dev split
    rows = [("q", "a"), ("r", "b")]
    d = write_task(tmp_path / "nodev", "mine", rows, rows, rows)
    (d / "mine_64_42_dev.tsv").unlink()
    assert transfer.main(transfer_args(tiny_backbone, tmp_path / "nodev", pool, tmp_path / "o1")) == 1
    assert "mine_64_42_dev.tsv is missing" in one_error(capsys) and not (tmp_path / "o1").exists()
    # an empty pool
    (tmp_path / "empty").mkdir()
    assert transfer.main(transfer_args(tiny_backbone, tiny_tasks, tmp_path / "empty", tmp_path / "o2")) == 1
    assert "no source deltas" in one_error(capsys) and not (tmp_path / "o2").exists()
    # a pool of another delta method
    assert transfer.main(transfer_args(tiny_backbone, tiny_tasks, pool, tmp_path / "o3", "--method", "adapter")) == 1
    assert "the pool holds lora deltas, not --method adapter" in one_error(capsys)
    # a source of another delta config in the pool
    mixed = tmp_path / "mixed"
    for s in POOL:
        t, c, m = dm.read_delta(pool / s / "checkpoint-best.safetensors")
        dm.save_delta(mixed / s / "checkpoint-best.safetensors", t, c, **m)
    dm.save_delta(mixed / "odd" / "checkpoint-best.safetensors", {k: torch.zeros(1, *v.shape[1:]) for k, v in t.items()},
                  dm.DeltaConfig("lora", lora_r=1))
    assert transfer.main(transfer_args(tiny_backbone, tiny_tasks, mixed, tmp_path / "o4", "--tasks", "babi-qa6")) == 1
    assert f"{mixed / 'odd' / 'checkpoint-best.safetensors'}: delta config" in one_error(capsys)
    # a pool tuned on another backbone
    tok = AutoTokenizer.from_pretrained(str(tiny_backbone))
    other = save_backbone(build_model(small_config(tok, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8),
                                      seed=7), tok, tmp_path / "other-t5")
    argv = transfer_args(other, tiny_tasks, pool, tmp_path / "o5", "--tasks", "babi-qa6", "--tokenizer_path",
                         tiny_backbone)
    assert transfer.main(argv) == 1
    assert "was tuned on another backbone" in one_error(capsys)


# --------------------------------------------------------------------------- every entry point

def test_unit_model_scripts_take_targets_that_are_not_sources(pool, tmp_path, capsys):
    sim = tmp_path / "sim" / "result.tsv"
    sim.parent.mkdir()
    sim.write_text("newA\nbabi-qa1,0.2\ncsqa2,0.9\nnewB\nbabi-qa1,1.5\ncsqa2,0.5\n")
    out = tmp_path / "init"
    assert unit_model_others.main([f"--origin_data_path={sim}", f"--source_ckpt_path={pool}", f"--save_ckpt_path={out}",
                                   "--delta=lora", "--tem=1"]) == 0
    for target, (a, b) in (("newA", (0.2, 0.9)), ("newB", (1.5, 0.5))):
        _, _, meta = dm.read_delta(out / f"without_{target}_checkpoint.safetensors")
        wa = math.exp(-a) / (math.exp(-a) + math.exp(-b))
        assert meta["weights"] == pytest.approx({"babi-qa1": wa, "csqa2": 1 - wa}, rel=1e-12)
    assert (out / "weights.csv").read_text().count("\nnewA,") == 2  # rows: targets; columns: the two sources
    out = tmp_path / "avg"
    assert unit_model_average.main([f"--source_ckpt_path={pool}", f"--save_ckpt_path={out}", "--delta=lora",
                                    "--targets", "newA", "babi-qa1"]) == 0
    assert dm.read_delta(out / "without_newA_checkpoint.safetensors")[2]["weights"] == {"babi-qa1": 0.5, "csqa2": 0.5}
    assert dm.read_delta(out / "without_babi-qa1_checkpoint.safetensors")[2]["weights"] == {"csqa2": 1.0}


def test_the_study_takes_targets_outside_its_pool(tiny_backbone, tiny_tasks, pool, tmp_path):
    out = tmp_path / "study"
    argv = ["--model", tiny_backbone, "--tokenizer_path", tiny_backbone, "--tasks", *POOL, "--targets", "babi-qa6",
            "babi-qa1", "--source_dir", pool, "--target_task_dir", tiny_tasks, "--source_task_dir", tiny_tasks,
            "--output_dir", out, "--methods", "lora", "--lora_r", "2", "--seeds", "42", "--scores", "Loss",
            "--inits", "average", "--step_budgets", "0", "--target_train_iters", "10", "--valid_interval", "5",
            "--log_interval", "5", *FAST]
    assert run_study.main(list(map(str, argv))) == 0
    report = (out / "report.md").read_text()
    assert "| init | babi-qa6 † | babi-qa1 | mean |" in report or "| init | babi-qa6 | babi-qa1 | mean |" in report
    _, _, meta = dm.read_delta(out / "lora" / "init" / "average" / "without_babi-qa6_checkpoint.safetensors")
    assert meta["weights"] == {"babi-qa1": 0.5, "csqa2": 0.5}
    _, _, meta = dm.read_delta(out / "lora" / "init" / "average" / "without_babi-qa1_checkpoint.safetensors")
    assert meta["weights"] == {"csqa2": 1.0}
    assert not (out / "lora" / "sources").exists()  # the pool is reused, not tuned


def test_the_study_refuses_sources_of_another_config(tiny_backbone, tiny_tasks, pool, tmp_path, capsys):
    argv = ["--model", tiny_backbone, "--tokenizer_path", tiny_backbone, "--tasks", *POOL, "--source_dir", pool,
            "--target_task_dir", tiny_tasks, "--output_dir", tmp_path / "o", "--methods", "lora", "--lora_r", "3",
            "--seeds", "42", "--scores", "Loss", "--inits", "average", "--steps", "sources", *FAST]
    assert run_study.main(list(map(str, argv))) == 1
    line = one_error(capsys)
    assert "does not match this run's" in line and "--source_dir '' tunes sources" in line
