"""scripts/build_sources.py: sharded training, then shipping with the backbone's fingerprint and an
index (sources.json) that one command regenerates byte for byte."""
import json
import sys
from collections import Counter
from pathlib import Path

import delta_modules as dm
from conftest import REPO
from pewe.data import read_tsv
from pewe.model import load_backbone, model_fingerprint

sys.path.insert(0, str(REPO / "scripts"))
import build_sources  # noqa: E402

TASKS = ("babi-qa1", "babi-qa6")


def build(tiny_backbone, tiny_tasks, work, *extra):
    argv = ["--model", tiny_backbone, "--task_dir", tiny_tasks, "--work_dir", work, "--methods", "lora",
            "--tasks", *TASKS, "--train_iters", "lora=4", "--valid_interval", "2", "--max_input_length", "64",
            "--precision", "fp32", "--progress=false", *extra]
    return build_sources.main(list(map(str, argv)))


def test_shards_train_every_task_once_then_ship_writes_fingerprinted_sources(tiny_backbone, tiny_tasks, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    assert build(tiny_backbone, tiny_tasks, work, "--steps", "train", "--shard", "0/2") == 0
    done = sorted(p.name for p in (work / "lora" / "sources").iterdir()
                  if (p / "checkpoint-best.safetensors").is_file())
    assert done == ["babi-qa1"]  # shard 0 of 2 takes every second task from the first
    assert build(tiny_backbone, tiny_tasks, work, "--steps", "train", "--shard", "1/2") == 0
    assert build(tiny_backbone, tiny_tasks, work, "--steps", "ship", "--out_dir", out) == 0

    model, _ = load_backbone(tiny_backbone, tiny_backbone)
    index = json.loads((out / "sources.json").read_text())
    assert index["base_model_sha256"] == model_fingerprint(model)
    for task in TASKS:
        _, config, meta = dm.read_delta(out / "lora" / task / "checkpoint-best.safetensors")
        assert config.method == "lora" and meta["base_model_sha256"] == model_fingerprint(model)
        run = json.loads((work / "lora" / "sources" / task / "runs" / meta["run"] / "result.json").read_text())
        entry = index["sources"]["lora"][task]
        assert (entry["test"], entry["updates"]) == (run["test_score"], 4) == (meta["test_score"], meta["updates"])
        # the majority answer, counted here by hand over the test split's first answers
        rows = read_tsv(Path(tiny_tasks) / task / f"{task}_64_42_test.tsv")
        answer, count = Counter(r.answers[0] for r in rows).most_common(1)[0]
        assert entry["majority"]["answer"] == answer
        assert abs(entry["majority"]["score"] - count / len(rows)) < 1e-9
        assert 0.0 <= entry["backbone"] <= 1.0 and entry["backbone"] == index["backbone_test"][task]


def test_shipping_again_rewrites_the_same_index_and_drops_another_backbones(tiny_backbone, tiny_tasks, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    assert build(tiny_backbone, tiny_tasks, work, "--steps", "train", "ship", "--out_dir", out) == 0
    first = (out / "sources.json").read_bytes()
    assert build(tiny_backbone, tiny_tasks, work, "--steps", "ship", "--out_dir", out) == 0
    assert (out / "sources.json").read_bytes() == first  # canonical order: the same bytes from the same runs

    stale = json.loads(first)
    stale["base_model_sha256"] = "0" * 64  # an index written on another backbone, with a source this one lacks
    stale["sources"]["adapter"] = {"babi-qa1": {"test": 0.9}}
    stale["backbone_test"]["babi-qa1"] = 0.99
    (out / "sources.json").write_text(json.dumps(stale))
    assert build(tiny_backbone, tiny_tasks, work, "--steps", "ship", "--out_dir", out) == 0
    assert (out / "sources.json").read_bytes() == first
