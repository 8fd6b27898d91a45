"""Data reading, text format, metrics on hand-made examples, and the configurator."""
import pytest
from transformers import AutoTokenizer

from conftest import write_task
from pewe import configurator, data, metrics


# ----------------------------------------------------------------------------- data

def test_read_tsv_multi_answer_and_line_numbers(tmp_path):
    f = tmp_path / "t.tsv"
    f.write_text("q one\ta\n\nq two\tb\tc\n")
    ex = data.read_tsv(f)
    assert [(e.input, e.answers, e.line) for e in ex] == [("q one", ("a",), 1), ("q two", ("b", "c"), 3)]


@pytest.mark.parametrize("content,msg", [
    ("fine\tx\nno tab here\n", r"t\.tsv:2: no tab"),
    ("q\t\n", r"t\.tsv:1: empty answer"),
    ("q\ta\t \n", r"t\.tsv:1: empty answer"),
    ("\ta\n", r"t\.tsv:1: empty input"),
    ("\n\n", r"t\.tsv: no examples"),
])
def test_bad_tsv_names_file_and_line(tmp_path, content, msg):
    f = tmp_path / "t.tsv"
    f.write_text(content)
    with pytest.raises(data.DataError, match=msg):
        data.read_tsv(f)


def test_task_folders_and_missing_splits(tmp_path):
    write_task(tmp_path, "alpha", [("a", "b")], [("a", "b")], [("a", "b")])
    write_task(tmp_path, "beta", [("a", "b")], [("a", "b")], [("a", "b")], prefix="beta_16_13")
    assert data.list_tasks(tmp_path) == ["alpha", "beta"]
    assert data.split_prefixes(tmp_path / "beta") == ["beta_16_13"]
    (tmp_path / "beta" / "beta_16_13_dev.tsv").unlink()
    with pytest.raises(data.DataError, match="beta_16_13_dev.tsv is missing"):
        data.split_prefixes(tmp_path / "beta")
    with pytest.raises(data.DataError, match="missing task folder"):
        data.split_prefixes(tmp_path / "gamma")
    with pytest.raises(data.DataError, match="no such task folder"):
        data.list_tasks(tmp_path / "nowhere")


def test_text_format_rows_and_left_truncation(tiny_backbone):
    tok = AutoTokenizer.from_pretrained(tiny_backbone)
    story = "Mary went to the office. " * 40
    ex = [data.Example(story + "question: Where is Mary?", ("office", "the office"), 1),
          data.Example("short question: Where?", ("garden",), 2)]
    rows = data.tokenize(ex, tok, "babi-qa1", max_input_length=20, one_row_per_answer=True)
    assert rows.example_of == [0, 0, 1]  # one training row per gold answer, aligned with its input
    assert tok.decode(rows.label_ids[1], skip_special_tokens=True).strip() == "the office"
    assert tok.convert_ids_to_tokens(rows.label_ids[0])[0] == "<extra_id_0>"
    assert len(rows.input_ids[0]) == 20
    assert "Where is Mary?" in tok.decode(rows.input_ids[0], skip_special_tokens=True)  # question kept
    right = data.tokenize(ex, tok, "csqa2", max_input_length=20, one_row_per_answer=False)
    assert right.example_of == [0, 1]
    assert tok.decode(right.input_ids[0], skip_special_tokens=True).startswith("[csqa2]")
    batch = data.collate(rows, [2, 0], tok.pad_token_id)
    assert batch["attention_mask"].tolist()[0].count(1) == len(rows.input_ids[2])
    assert (batch["labels"][0] == -100).sum() == batch["labels"].shape[1] - len(rows.label_ids[2])


def test_epoch_order_is_a_function_of_seed_and_epoch():
    assert data.epoch_order(10, 42, 3) == data.epoch_order(10, 42, 3)
    assert data.epoch_order(10, 42, 3) != data.epoch_order(10, 42, 4)
    assert sorted(data.epoch_order(10, 1, 0)) == list(range(10))


# ----------------------------------------------------------------------------- metrics

def test_metrics_on_hand_made_examples():
    gold = [("The Cat",), ("dog", "puppy"), ("a red ball",)]
    preds = ["cat", "puppy", "red ball!"]
    assert metrics.evaluate(preds, gold, "EM") == 1.0  # articles, case and punctuation normalised
    assert metrics.evaluate(preds, gold, "ACC") == pytest.approx(1 / 3)  # ACC only lower-cases
    # QA-F1: "big red ball" vs "a red ball" -> tokens {big, red, ball} vs {red, ball}: P=2/3, R=1
    assert metrics.evaluate(["big red ball"], [("a red ball",)], "QA-F1") == pytest.approx(0.8)
    # Rouge-L: LCS("the cat sat", "the cat sat down") = 3: P=1, R=3/4
    assert metrics.evaluate(["the cat sat"], [("the cat sat down",)], "Rouge-L") == pytest.approx(6 / 7)
    # Classification-F1: labels {yes, no}; yes: tp=1 fp=1 fn=1 -> 0.5; no: tp=1 fp=1 fn=1 -> 0.5
    p, g = ["yes", "no", "yes", "no"], [("yes",), ("no",), ("no",), ("yes",)]
    assert metrics.evaluate(p, g, "Classification-F1") == pytest.approx(0.5)
    # "always yes" on a 3:1 set: yes F1 = 2*3/(6+1) = 6/7, no F1 = 0 -> macro 3/7
    assert metrics.evaluate(["yes"] * 4, [("yes",)] * 3 + [("no",)], "Classification-F1") == pytest.approx(3 / 7)


def test_metric_table_and_unknown_task():
    assert metrics.metric_for("codah") == "Classification-F1"
    assert metrics.metric_for("eli5-askh") == "Rouge-L"
    assert metrics.metric_for("babi-qa3") == "EM"
    with pytest.warns(UserWarning, match="no known metric"):
        assert metrics.metric_for("my_new_task") == "EM"
    with pytest.raises(ValueError, match="2 predictions for 1"):
        metrics.evaluate(["a", "b"], [("a",)], "EM")


# ----------------------------------------------------------------------------- configurator

SCRIPT = '''"""doc"""
import os
alpha = 0.5  # a float
count = 3  # an int
name = "x"  # a string
flag = False  # a bool
maybe = None  # anything
rates = [5e-4]  # a list
CONST = 1
_private = 2


def main():
    pass
later = 9
'''


def _configure(tmp_path, argv):
    f = tmp_path / "s.py"
    f.write_text(SCRIPT)
    g = {}
    exec(compile(SCRIPT, str(f), "exec"), g)
    return configurator.configure(g, str(f), argv)


def test_script_tunables_reads_top_assignments_and_comments():
    t = configurator.script_tunables(SCRIPT)
    assert list(t) == ["alpha", "count", "name", "flag", "maybe", "rates"]
    assert t["count"] == "an int"


def test_configure_forms_and_types(tmp_path):
    c = _configure(tmp_path, ["--alpha=1", "--count", "7", "--flag", "--maybe=[1, 2]",
                              "--rates", "1e-3", "5e-4", "--name=a=b"])
    assert (c.alpha, c.count, c.flag, c.maybe, c.rates, c.name) == (1.0, 7, True, [1, 2], [1e-3, 5e-4], "a=b")
    assert isinstance(c.alpha, float)
    c = _configure(tmp_path, ["--count=2.5", "--flag=false", "--maybe", "text", "--rates=1,2"])
    assert (c.count, c.flag, c.maybe, c.rates) == (2.5, False, "text", [1.0, 2.0])  # int -> float allowed


@pytest.mark.parametrize("argv,msg", [
    (["--colour=1"], "unknown option --colour"),
    (["--alpa=1"], "did you mean --alpha"),
    (["--count=abc"], "not a valid int"),
    (["--flag=maybe"], "not a valid bool"),
    (["--name"], "needs a value"),
    (["stray"], "unexpected argument"),
])
def test_configure_refuses(tmp_path, argv, msg, capsys):
    with pytest.raises(SystemExit) as e:
        _configure(tmp_path, argv)
    assert e.value.code == 2
    assert msg in capsys.readouterr().err


def test_configure_help_lists_comments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        _configure(tmp_path, ["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--rates" in out and "a list" in out
