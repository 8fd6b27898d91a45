"""scripts/build_crossfit.py, offline: every one of the paper's 32 tasks is built from fixture rows in
its Hugging Face schema (tests/fixtures/crossfit, read by datasets.load_dataset from a folder), and
the lines written are compared with CrossFit's formatting written out by hand; the few-shot sample
is compared with CrossFit's rule run on numpy's global RNG, as CrossFit runs it."""
import json
import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # nothing here may reach the network
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "crossfit"
sys.path.insert(0, str(REPO / "scripts"))
import build_crossfit as bc  # noqa: E402
from crossfit_tasks import TASKS  # noqa: E402

from pewe.data import read_tsv, split_prefixes  # noqa: E402
from task_list import QA_task_list  # noqa: E402

# task -> (lines of the pool rows, lines of the test split in order). For the tasks whose test is
# carved out of one split (None), the first list holds every row of that split.
MC4 = " (A) ate. (B) slept. (C) ran. (D) sang."
VERBS = " (A) bark (B) fly (C) read (D) swim [SEP] "
EXPECTED = {
    "adversarialqa": (["question: Who met Bob? context: Ann met Bob in Rome.\tAnn",
                       "question: What colour is the sky? context: The sky is blue. It rains.\tblue"],
                      ["question: What do cats do? context: Cats purr.\tpurr"]),
    "hotpot_qa": (["question: Which is older? context: A is old. It is big. B is new.\tA",
                   "question: Where? context: Paris is in France.\tParis"],
                  ["question: Who? context: Kim sang. Kim won.\tKim"]),
    "superglue-record": (["question: @placeholder visited Paris. context: Obama visited Paris. @highlight He spoke.\tObama",
                          "question: Rain fell on @placeholder. context: Rain fell on Leeds.\tLeeds"],
                         ["question: @placeholder wrote code. context: Ada wrote code.\tAda"]),
    "ai2_arc": (["Which is a gas? (A) ice (B) steam (C) rock\tsteam",
                 "What melts? (1) wax (2) iron (3) sand (4) glass\twax"],
                ["Pick red. (A) red (B) blue\tred"]),
    "codah": (["He was hungry so he" + MC4 + "\tate.", "She was tired so she" + MC4 + "\tslept."],
              ["It rained so we (A) stayed in. (B) swam. (C) flew. (D) dug.\tstayed in."]),
    "commonsense_qa": (["Where do fish live? (A) sea (B) sky (C) tree (D) desk (E) car\tsea",
                        "What barks? (A) dog (B) cat (C) cow (D) hen (E) fox\tdog"],
                       ["What is cold? (A) ice (B) fire (C) sun (D) lava (E) tea\tice"]),
    "cosmos_qa": (["Why was I sad? [SEP] I lost my keys. [SEP]  (A) I lost keys. (B) I won. (C) I ate. "
                   "(D) None of the above choices.\tI lost keys.",
                   "What next? [SEP] We went out. [SEP]  (A) We slept. (B) We danced. (C) We cried. (D) We sat.\tWe danced."],
                  ["What did we do? [SEP] It snowed. [SEP]  (A) Ski. (B) Swim. (C) Surf. (D) Sail.\tSki."]),
    "dream": (["Who spoke first? [SEP] M: Hi. W: Hello. [SEP]  (A) The man. (B) The woman. (C) Nobody.\tThe man.",
               "What will he drink? [SEP] W: Tea? M: Yes. [SEP]  (A) Tea. (B) Milk. (C) Water.\tTea."],
              ["What did he say? [SEP] M: Bye. [SEP]  (A) Bye. (B) Hi. (C) Yes.\tBye."]),
    "hellaswag": (["A man is skiing. He (A) falls. (B) flies. (C) swims. (D) sings.\tfalls.",
                   "A cat sits. It (A) barks. (B) purrs. (C) moos. (D) quacks.\tpurrs."],
                  ["She cooks. She (A) eats. (B) drives. (C) jumps. (D) reads.\teats."]),
    "openbookqa": (["Sun gives (A) light (B) rain (C) snow (D) ice\tlight",
                    "Plants need (A) water (B) rocks (C) plastic (D) glass\twater"],
                   ["Magnets attract (A) iron (B) wood (C) paper (D) cloth\tiron"]),
    "qasc": (["What do bees make? (A) honey (B) milk (C) silk (D) wax (E) oil (F) gas (G) salt (H) ink\thoney",
              "What is hot? (A) fire (B) ice (C) snow (D) hail (E) fog (F) dew (G) mist (H) frost\tfire"],
             ["What flies? (A) bird (B) fish (C) worm (D) rock (E) tree (F) lake (G) road (H) wall\tbird"]),
    "quail": (["Who won?(A)Tom(B)Sam(C)Ann(D)not enough information [SEP] Tom ran. He won.\tTom",
               "What did Sue do?(A)slept(B)ate(C)ran(D)sang [SEP] Sue ate.\tate"],
              ["When?(A)late(B)early(C)noon(D)dawn [SEP] It was late.\tlate"]),
    "quarel": (["Which is faster? (A) a car or (B) a bike\ta car",
                "Which is heavier? (A) a feather or (B) a brick\ta brick"],
               ["Which is hotter? (A) the sun or (B) the moon\tthe sun"]),
    "quartz-no_knowledge": (["Is more heat more or less ice? (A) more (B) less\tless",
                             "Bigger wave, more or less energy? (A) more (B) less\tmore"],
                            ["Closer lamp, brighter or dimmer? (A) brighter (B) dimmer\tbrighter"]),
    "quartz-with_knowledge": (["Is more heat more or less ice?Heat melts ice. (A) more (B) less\tless",
                               "Bigger wave, more or less energy?Big waves carry energy. (A) more (B) less\tmore"],
                              ["Closer lamp, brighter or dimmer?Light fades with distance. (A) brighter (B) dimmer\tbrighter"]),
    "race-high": (["What does Tom like? (A) tea (B) milk (C) beer (D) juice [SEP] Tom likes tea. He drinks it.\ttea",
                   "What does Ann do? (A) reads (B) swims (C) cooks (D) sleeps [SEP] Ann reads.\treads"],
                  ["Who sings? (A) Al (B) Bo (C) Cy (D) Di [SEP] Bo sings.\tBo"]),
    "race-middle": (["What do dogs do?" + VERBS + "Dogs bark.\tbark", "What do fish do?" + VERBS + "Fish swim.\tswim"],
                    ["What do birds do?" + VERBS + "Birds fly.\tfly"]),
    # options shuffled by RandomState(42) per split: [salt sand oil light] -> [sand light salt oil], then
    # [air fire earth water] -> [fire water air earth]; validation starts again: [Mars Sun Venus Moon] ->
    # [Sun Moon Mars Venus]. The row without support is dropped and draws nothing.
    "sciq": (["What do plants absorb? (A) sand (B) light (C) salt (D) oil [SEP] Plants absorb light.\tlight",
              "What is H2O? (A) fire (B) water (C) air (D) earth [SEP] H2O is water.\twater"],
             ["What orbits Earth? (A) Sun (B) Moon (C) Mars (D) Venus [SEP] The Moon orbits Earth.\tMoon"]),
    "superglue-copa": (["The man fell. (A) He slipped. (B) He sang.\tHe slipped.",
                        "It rained. (A) We got wet. (B) We got dry.\tWe got wet."],
                       ["I was cold. (A) I ran. (B) I wore a coat.\tI wore a coat."]),
    "swag": (["He opens the door. He (A) walks in. (B) flies. (C) melts. (D) sings.\twalks in.",
              "She sits down. She (A) stands. (B) reads. (C) melts. (D) flies.\treads."],
             ["They eat. They (A) chew. (B) fly. (C) melt. (D) sing.\tchew."]),
    "wino_grande": (["Ann gave Bo a cup because _ was kind. (A) Ann (B) Bo\tAnn",
                     "The box held the cup because _ was big. (A) cup (B) box\tbox"],
                    ["Sam beat Al because _ was fast. (A) Sam (B) Al\tSam"]),
    "wiqa": (["suppose more rain happens, how will it affect more floods? (A) more (B) less (C) no effect "
              "[SEP] Rain falls. Rivers rise.\tmore",
              "suppose less sun happens, how will it affect more growth? (A) more (B) less (C) no effect "
              "[SEP] Sun shines. Plants grow.\tless"],
             ["suppose more wind happens, how will it affect the moon? (A) more (B) less (C) no effect "
              "[SEP] Wind blows.\tno effect"]),
    "boolq": (["question: is the sky blue [SEP] context: The sky is blue.\tyes",
               "question: is ice hot [SEP] context: Ice is cold.\tno",
               "question: is fire hot [SEP] context: Fire is hot.\tyes",
               "question: can fish fly [SEP] context: Fish swim.\tno"],
              ["question: is water wet [SEP] context: Water is wet.\tyes"]),
    "mc_taco": ([f"{s} [SEP] {q} [SEP] {a}\t{y}" for s, q, a, y in [
        ("He slept.", "How long did he sleep?", "8 hours", "yes"),
        ("He slept.", "How long did he sleep?", "2 seconds", "no"),
        ("She ate lunch.", "When did she eat?", "at noon", "yes"),
        ("She ate lunch.", "When did she eat?", "at 3 am", "no"),
        ("They built a house.", "How long did it take?", "6 months", "yes"),
        ("They built a house.", "How long did it take?", "1 minute", "no"),
        ("He brushed his teeth.", "How often does he brush?", "twice a day", "yes"),
        ("He brushed his teeth.", "How often does he brush?", "once a decade", "no"),
        ("The class began.", "What happened after?", "the teacher spoke", "yes"),
        ("The class began.", "What happened after?", "the class had ended", "no")]], None),
    **{f"eli5-{sub}": (["Why is the sky blue? [SEP] I wonder. Really.\tLight scatters.\tBecause of air.",
                        "Why do cats purr? [SEP]\tContentment."],
                       [f"Q{i} {sub} [SEP]\tA{i}\ta b" for i in range(10)])  # one of the ten (10 %)
       for sub in ("askh", "asks", "eli5")},
    "lama-conceptnet": (["Birds can [MASK].\tfly", "You can [MASK] a book.\tread", "Ice is [MASK].\tcold",
                         "A dog is an [MASK].\tanimal", "Fish live in [MASK].\twater"], None),
    "lama-google_re": (["Ada Lovelace was born in [MASK] .\tLondon", "Marie Curie was born in [MASK] .\tWarsaw",
                        "Alan Turing was born in [MASK] .\tLondon", "Niels Bohr was born in [MASK] .\tCopenhagen",
                        "Kurt Gödel died in [MASK] .\tBrno"], None),
    "numer_sense": (["Birds have [MASK] legs.\ttwo", "A spider has [MASK] legs.\teight",
                     "A triangle has [MASK] sides.\tthree", "Cars have [MASK] wheels.\tfour",
                     "A week has [MASK] days.\tseven"], None),
    "search_qa": (["question: He was the first US presidentcategory: HISTORY\tGeorge Washington",
                   "question: H2O is thiscategory: SCIENCE\twater"],
                  ["question: The Beatles came from this citycategory: MUSIC\tLiverpool"]),
    "web_questions": (["what language do they speak in brazil?\tPortuguese", "who is the president of france?\tMacron",
                       "what countries border spain?\tFrance\tPortugal", "where is rome?\tItaly",
                       "what is the capital of japan?\tTokyo"], None),
}


def lines(path):
    return Path(path).read_text(encoding="utf-8").splitlines()


def build(tmp, *args, local=FIXTURES):
    argv = ["--out_dir", str(tmp), "--cache_dir", str(tmp.parent / "hf-cache"), "--progress", "false",
            "--shots", "1", "--shots_per_class", "1", *args]
    if local:
        argv += ["--local_dir", str(local)]
    return bc.main(argv)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("crossfit") / "out"
    assert build(out) == 0
    return out


def test_the_table_holds_the_papers_32_tasks():
    from pewe.metrics import METRICS

    assert list(TASKS) == list(QA_task_list) and len(TASKS) == 32
    for spec in TASKS.values():
        assert spec.hub_id.count("/") == 1, spec.task  # namespaced: datasets 5 refuses bare names
        assert spec.task in METRICS
        assert (FIXTURES / spec.hub_id / (spec.config or "default")).is_dir(), f"no fixture for {spec.task}"
    assert sorted(t for t, s in TASKS.items() if s.lost) == [
        "eli5-askh", "eli5-asks", "eli5-eli5", "lama-conceptnet", "lama-google_re"]
    assert sorted(t for t, s in TASKS.items() if s.per_class) == ["boolq", "mc_taco"]


@pytest.mark.parametrize("task", QA_task_list)
def test_lines_are_crossfits(built, task):
    pool_lines, test_lines = EXPECTED[task]
    full = {s: lines(built / "full" / task / f"{task}_full_{s}.tsv") for s in bc.SPLITS}
    k = 1
    few = {s: lines(built / "1_1n_seed42" / task / f"{task}_{k}_42_{s}.tsv") for s in bc.SPLITS}
    if test_lines is None:  # carved: 80 % pool, 20 % test, one split's rows in all
        assert sorted(full["train"] + full["dev"] + full["test"]) == sorted(pool_lines)
        assert len(full["test"]) == len(pool_lines) - int(0.8 * len(pool_lines))
    elif task.startswith("eli5"):  # 10 % of validation
        assert sorted(full["train"] + full["dev"]) == sorted(pool_lines)
        assert len(full["test"]) == 1 and full["test"][0] in test_lines
    else:
        assert sorted(full["train"] + full["dev"]) == sorted(pool_lines)
        assert full["test"] == test_lines  # the whole validation split, in order
    pool = set(full["train"] + full["dev"])
    assert few["test"] == full["test"]
    assert set(few["train"]) <= pool and set(few["dev"]) <= pool and not set(few["train"]) & set(few["dev"])
    n_labels = 2 if TASKS[task].per_class else 1
    assert len(few["train"]) == len(few["dev"]) == n_labels
    # the project's reader takes every folder as it is
    for folder in (built / "full" / task, built / "1_1n_seed42" / task):
        for prefix in split_prefixes(folder):
            for s in bc.SPLITS:
                read_tsv(folder / f"{prefix}_{s}.tsv")


def crossfit_reference(pool, k, seed, per_class):
    """CrossFit's generate_k_shot_data as it runs: the global RNG shuffles the list in place."""
    train_lines = list(pool)
    np.random.seed(seed)
    np.random.shuffle(train_lines)
    if not per_class:
        return train_lines[:k], train_lines[k:2 * k]
    label_list = {}
    for line in train_lines:
        label_list.setdefault(line[-1], []).append(line)
    return ([x for lab in label_list for x in label_list[lab][:k]],
            [x for lab in label_list for x in label_list[lab][k:2 * k]])


@pytest.mark.parametrize("seed", [42, 13, 100])
def test_sampling_is_crossfits_rule(seed):
    pool = [(f"question {i}", ("yes" if i % 3 else "no",)) for i in range(50)]
    for per_class, k in ((False, 8), (True, 5)):
        ours = bc.k_shot(pool, k, seed, per_class)
        ref = crossfit_reference([(t, "\t".join(a)) for t, a in pool], k, seed, per_class)
        assert [t for t, _ in ours[0]] == [t for t, _ in ref[0]]
        assert [t for t, _ in ours[1]] == [t for t, _ in ref[1]]
    state = np.random.get_state()[1].copy()
    bc.k_shot(pool, 8, seed, False)
    assert (np.random.get_state()[1] == state).all()  # the global RNG is left alone
    train, dev = bc.k_shot(pool, 5, seed, True)
    for split in (train, dev):  # k per label, labels in first-seen order of the shuffle
        assert sorted(a for _, (a,) in split) == ["no"] * 5 + ["yes"] * 5
    assert not {t for t, _ in train} & {t for t, _ in dev}


def test_per_class_sample_on_the_boolq_fixture(built):
    few = {s: lines(built / "1_1n_seed42" / "boolq" / f"boolq_1_42_{s}.tsv") for s in ("train", "dev")}
    pool = [(line.split("\t")[0], line.split("\t")[1]) for line in EXPECTED["boolq"][0]]  # fixture order
    ref_train, ref_dev = crossfit_reference(pool, 1, 42, per_class=True)
    assert few["train"] == ["\t".join(x) for x in ref_train]
    assert few["dev"] == ["\t".join(x) for x in ref_dev]
    assert sorted(x.split("\t")[1] for x in few["train"]) == ["no", "yes"]


def test_manifest_resume_and_verify(tmp_path, capsys):
    out = tmp_path / "out"
    assert build(out, "--tasks", "ai2_arc", "boolq") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["tasks"]) == {"ai2_arc", "boolq"} and len(manifest["files"]) == 12
    for rel, record in manifest["files"].items():
        assert record["rows"] == len(lines(out / rel)) and record["sha256"] == bc.sha256(out / rel)
    assert manifest["tasks"]["boolq"]["rows"]["pool"] == 4
    capsys.readouterr()
    assert build(out, "--tasks", "ai2_arc", "boolq") == 0
    assert "0 built, 2 already up to date" in capsys.readouterr().out
    victim = out / "full" / "boolq" / "boolq_full_test.tsv"
    victim.write_text("tampered\tyes\n")
    assert build(out, "--verify") == 1
    assert "changed  full/boolq/boolq_full_test.tsv" in capsys.readouterr().out
    assert build(out, "--tasks", "ai2_arc", "boolq") == 0
    assert "1 built, 1 already up to date" in capsys.readouterr().out
    assert build(out, "--verify") == 0
    assert build(out, "--tasks", "boolq", "--seeds", "42", "13") == 0  # other options: rebuilt
    assert "1 built" in capsys.readouterr().out and (out / "1_1n_seed13" / "boolq" / "boolq_1_13_dev.tsv").is_file()
    assert not list(out.rglob("*.tmp"))


def test_lost_tasks_skip_with_one_line_and_no_network(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bc.Loader, "_load", lambda *a: pytest.fail("a lost task was loaded"))
    assert build(tmp_path / "out", "--tasks", "eli5-eli5", "lama-conceptnet", local=None) == 0
    text = capsys.readouterr().out
    assert "skip eli5-eli5: defunct-datasets/eli5 is defunct" in text
    assert "skip lama-conceptnet: facebook/lama is script-only" in text
    assert "0 built, 0 already up to date, 2 skipped, 0 failed" in text
    assert not (tmp_path / "out" / "1_1n_seed42").exists()


def copy_fixture(dst, hub_id, config, edit=None):
    src = FIXTURES / hub_id / (config or "default")
    for f in src.iterdir():
        rows = [json.loads(x) for x in f.read_text().splitlines()]
        if edit:
            rows = edit(f.stem, rows)
        (dst / hub_id / (config or "default")).mkdir(parents=True, exist_ok=True)
        (dst / hub_id / (config or "default") / f.name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_bad_row_fails_its_task_with_one_line_and_the_rest_builds(tmp_path, capsys):
    def bad_key(split, rows):
        if split == "train":
            rows[0]["answerKey"] = "Z"
        return rows
    copy_fixture(tmp_path / "local", "allenai/ai2_arc", "ARC-Challenge", bad_key)
    copy_fixture(tmp_path / "local", "jaredfern/codah", "fold_0")
    assert build(tmp_path / "out", "--tasks", "ai2_arc", "codah", local=tmp_path / "local") == 1
    text = capsys.readouterr()
    assert "error: ai2_arc: " in text.err + text.out and "train row 0: bad row: answer key 'Z'" in text.err + text.out
    assert "Traceback" not in text.err + text.out
    assert (tmp_path / "out" / "full" / "codah" / "codah_full_train.tsv").is_file()
    assert not (tmp_path / "out" / "full" / "ai2_arc").exists()


def test_unusable_rows_are_dropped_before_sampling_and_counted(tmp_path):
    def damage(split, rows):
        rows[0]["answers"] = []  # nothing left to learn
        rows[1]["question"] = "who is\tthe president\nof france?"  # a tab and a newline inside a field
        return rows
    copy_fixture(tmp_path / "local", "stanfordnlp/web_questions", None, damage)
    assert build(tmp_path / "out", "--tasks", "web_questions", local=tmp_path / "local") == 0
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["tasks"]["web_questions"]
    assert entry["rows"]["dropped_unusable"] == 1 and entry["rows"]["fields_flattened"] == 1
    assert entry["rows"]["pool"] + entry["rows"]["test"] == 4
    written = [x for s in bc.SPLITS for x in lines(tmp_path / "out" / "full" / "web_questions" / f"web_questions_full_{s}.tsv")]
    assert "who is the president of france?\tMacron" in written and len(written) == 4


def test_hub_path_falls_back_to_the_parquet_export(tmp_path, monkeypatch, capsys):
    """No network: load_dataset is replaced by a fake hub where main holds a loading script."""
    import datasets

    real = datasets.load_dataset
    calls = []

    def fake(path, name=None, split=None, revision=None, cache_dir=None, **kw):
        calls.append((path, name, revision))
        if path == "kyunghyuncho/search_qa":  # main: a script; export: none
            if revision is None:
                raise RuntimeError("Dataset scripts are no longer supported, but found search_qa.py")
            raise datasets.exceptions.DatasetNotFoundError("Revision 'refs/convert/parquet' doesn't exist")
        if revision is None:
            raise RuntimeError("Dataset scripts are no longer supported, but found dream.py")
        folder = FIXTURES / path / "default"
        return real(str(folder), data_files={split: f"{split}.jsonl"}, split=split, cache_dir=cache_dir)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    assert build(tmp_path / "out", "--tasks", "dream", "search_qa", local=None) == 0
    entry = json.loads((tmp_path / "out" / "manifest.json").read_text())["tasks"]["dream"]
    assert entry["loaded_from"][0] == {"hub_id": "dataset-org/dream", "config": None, "revision": "refs/convert/parquet"}
    assert ("dataset-org/dream", None, None) in calls
    text = capsys.readouterr().out
    assert "skip search_qa: kyunghyuncho/search_qa had only a loading script" in text
    assert "1 built, 0 already up to date, 1 skipped, 0 failed" in text


def test_an_unreachable_hub_is_tried_once(tmp_path, monkeypatch, capsys):
    import datasets

    calls = []

    def offline(path, *a, **kw):
        calls.append(path)
        raise ConnectionError(f"Couldn't reach '{path}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert build(tmp_path / "out", "--tasks", "boolq", "eli5-eli5", "sciq", local=None) == 1
    text = capsys.readouterr()
    assert calls == ["google/boolq"]
    assert "error: boolq: Couldn't reach 'google/boolq'" in text.err and "skip eli5-eli5" in text.out
    assert "0 built, 0 already up to date, 1 skipped, 2 failed" in text.out


def test_hub_overrides_and_bad_options(tmp_path, capsys):
    assert bc.parse_hub_override("boolq=me/boolq:cfg@v1") == ("boolq", "me/boolq", "cfg", "v1")
    assert bc.parse_hub_override("boolq=me/boolq") == ("boolq", "me/boolq", None, None)
    assert build(tmp_path / "out", "--hub", "boolq") == 1
    assert "error: --hub 'boolq': expected task=namespace/name" in capsys.readouterr().err
    assert build(tmp_path / "out", "--tasks", "nope") == 1
    assert "error: unknown task(s) nope" in capsys.readouterr().err
