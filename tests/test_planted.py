"""The planted positive control's variants: deterministic, line for line from their sibling's split,
every answer kept, no sentence of the original left."""
import re

import pytest

from conftest import REPO
from pewe.data import read_tsv
from scripts import build_planted as B
from task_list import PLANTED, STUDY_TASKS

FEWSHOT = REPO / "data" / "fewshot"


def test_the_shipped_variants_are_a_fresh_rewrite(capsys):
    assert B.main(["--check"]) == 0  # byte for byte what the tables give today


@pytest.mark.parametrize("variant", list(PLANTED))
def test_a_variant_keeps_the_answers_and_changes_every_input(variant):
    sibling = PLANTED[variant]
    assert sibling in STUDY_TASKS and variant not in STUDY_TASKS  # a target only, beside a source of the pool
    for split in B.SPLITS:
        old = read_tsv(FEWSHOT / sibling / f"{sibling}_64_42_{split}.tsv")
        new = read_tsv(FEWSHOT / variant / f"{variant}_64_42_{split}.tsv")
        assert len(old) == len(new)  # line for line from the sibling's own split: no test row reaches train
        for a, b in zip(old, new):
            assert a.answers == b.answers and a.input != b.input
            assert a.input.split(" question: ")[1] != b.input.split(" question: ")[1]  # the question is reworded
            assert not any(re.search(rf"\b{n}\b", b.input, flags=re.IGNORECASE) for n in B.NAMES)
            assert not set(a.input.split(". ")) & set(b.input.split(". "))  # not one sentence of the story is left


def test_a_line_the_tables_do_not_cover_is_refused():
    with pytest.raises(B.RewriteError, match="no rewording for the question"):
        B.rewrite_input("Mary went to the garden. question: How many objects is Mary carrying?")
    assert B.rewrite_input("Mary went to the garden. question: Where is Mary?") == \
        "Olivia walked to the garden. question: In which place is Olivia now?"
