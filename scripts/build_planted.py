"""Build the planted positive control: variants of bundled bAbI tasks with a rewritten surface and the
same skill, each a target whose sibling (the original task) is in the pool of sources.

A variant renames every person (Mary -> Olivia, ...), replaces every verb phrase of the story by a
synonym (journeyed to -> drove to, picked up -> lifted, ...) and rewords the question (Where is X? ->
In which place is X now?), and keeps every answer as it is, so the kind of answer and the skill stay.
Its train, dev and test splits are the rewrites of the original's few-shot train, dev and test splits,
line for line, so no test row of the original reaches a variant's training data. The rewrite is a
fixed table (no randomness): the same command always writes the same files. A variant is only ever a
target, never a source; ``task_list.PLANTED`` records each variant's sibling.

    python scripts/build_planted.py              # -> data/fewshot/planted-babi-qa{1,2,8,16,18,20}/
    python scripts/build_planted.py --check      # the files on disk are exactly what the tables give

Every tunable below can be overridden as --name=value or --name value; `--help` lists them.
"""
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from pewe.model import REPO  # noqa: E402
from task_list import PLANTED  # noqa: E402

data_dir = str(REPO / "data" / "fewshot")  # where the originals are read and the variants written
prefix = "64_42"  # the few-shot split ({task}_{prefix}_{split}.tsv) that is rewritten
variants = list(PLANTED)  # the variants to build (task_list.PLANTED: variant -> sibling)
check = False  # only check that the files on disk equal a fresh rewrite; write nothing

SPLITS = ("train", "dev", "test")
# every person of the bAbI tasks, and a new name for each (none of them occurs in bAbI)
NAMES = {"Mary": "Olivia", "John": "Marcus", "Daniel": "Tobias", "Sandra": "Priya", "Fred": "Hugo", "Bill": "Nadia",
         "Jeff": "Omar", "Julie": "Carmen", "Antoine": "Elif", "Sumit": "Mateo", "Yann": "Keiko", "Jason": "Sven",
         "Lily": "Ines", "Julius": "Kofi", "Greg": "Lena", "Brian": "Ravi", "Bernhard": "Zoe"}
# story verb phrases and their synonyms, longest first (went back to before went to)
VERBS = [("went back to", "returned to"), ("travelled to", "hiked to"), ("journeyed to", "drove to"),
         ("moved to", "headed to"), ("went to", "walked to"), ("picked up", "lifted"), ("put down", "set down"),
         ("grabbed", "seized"), ("got", "obtained"), ("took", "collected"), ("discarded", "threw away"),
         ("dropped", "let go of"), ("left", "abandoned"), ("fits inside", "goes into"),
         ("is bigger than", "is larger than"), ("is a", "is a kind of")]
# question rewordings: (pattern over the question, replacement); one of them must match every question
QUESTIONS = [(r"^Where is the (\w+)\?$", r"In which place is the \1 now?"),
             (r"^Where is (\w+)\?$", r"In which place is \1 now?"),
             (r"^What is (\w+) carrying\?$", r"What does \1 have with them?"),
             (r"^What color is (\w+)\?$", r"Which colour is \1?"),
             (r"^Why did (\w+) (go to|get) the (\w+)\?$", r"For what reason did \1 \2 the \3?"),
             (r"^Where will (\w+) go\?$", r"To which place will \1 head next?"),
             (r"^Does the ([\w ]+?) fit in the ([\w ]+)\?$", r"Can the \1 go into the \2?"),
             (r"^Is the ([\w ]+?) bigger than the ([\w ]+)\?$", r"Is the \1 larger than the \2?")]
STATES = [(r"\b(\w+) is (tired|hungry|bored|thirsty)\.", r"\1 feels \2."),  # babi-qa20's motivations
          (r"\b(\w+) is (yellow|green|gray|white)\.", r"\1 is coloured \2.")]  # babi-qa16's colours


class RewriteError(ValueError):
    """A line the tables do not cover: the variant would leak the original's surface."""


def _names(text: str) -> str:
    for old, new in NAMES.items():  # bAbI writes a name capitalised, and lower case in babi-qa20's questions
        text = re.sub(rf"\b{old}\b", new, text)
        text = re.sub(rf"\b{old.lower()}\b", new.lower(), text)
    return text


def rewrite_input(text: str, where="") -> str:
    """The rewritten input of one bAbI line: ``<story> question: <question>``."""
    story, sep, question = text.rpartition(" question: ")
    if not sep:
        raise RewriteError(f"{where}: no 'question:' in {text[:60]!r}")
    for pattern, replacement in QUESTIONS:
        new_question, n = re.subn(pattern, replacement, question)
        if n:
            break
    else:
        raise RewriteError(f"{where}: no rewording for the question {question!r}")
    for pattern, replacement in STATES:
        story = re.sub(pattern, replacement, story)
    for old, new in VERBS:
        story = re.sub(rf"\b{old}\b", new, story)
    out = _names(f"{story} question: {new_question}")
    left = [n for n in NAMES if re.search(rf"\b{n}\b", out, flags=re.IGNORECASE)]
    if left:
        raise RewriteError(f"{where}: the name(s) {left} survived the rewrite")
    return out


def rewrite_lines(lines, where=""):
    """Every ``input<TAB>answer...`` line rewritten; the answers stay as they are."""
    out = []
    for i, line in enumerate(lines, 1):
        text, *answers = line.rstrip("\n").split("\t")
        out.append("\t".join([rewrite_input(text, f"{where}:{i}"), *answers]) + "\n")
    return out


def variant_files(variant, sibling, root: Path, split_prefix):
    """{path: text} of one variant's three splits, from its sibling's splits."""
    files = {}
    for split in SPLITS:
        src = root / sibling / f"{sibling}_{split_prefix}_{split}.tsv"
        lines = src.read_text(encoding="utf-8").splitlines(keepends=True)
        files[root / variant / f"{variant}_{split_prefix}_{split}.tsv"] = "".join(rewrite_lines(lines, str(src)))
    return files


def main(argv=None):
    from pewe.cli import run_cli
    from pewe.configurator import configure

    a = configure(globals(), __file__, argv)
    return run_cli(_run, a)


def _run(a):
    from pewe.atomic import atomic_write_text
    from pewe.errors import UserError

    unknown = [v for v in a.variants if v not in PLANTED]
    if unknown:
        raise UserError(f"--variants: {', '.join(unknown)} not in task_list.PLANTED")
    root = Path(a.data_dir)
    stale = []
    for variant in a.variants:
        try:
            files = variant_files(variant, PLANTED[variant], root, a.prefix)
        except RewriteError as e:
            raise UserError(str(e)) from None
        for path, text in files.items():
            if a.check:
                if not path.is_file() or path.read_text(encoding="utf-8") != text:
                    stale.append(str(path))
            else:
                atomic_write_text(path, text)
        print(f"{variant} (sibling {PLANTED[variant]}): {'checked' if a.check else 'wrote'} {len(files)} splits")
    if stale:
        raise UserError(f"{len(stale)} file(s) differ from a fresh rewrite: {', '.join(stale)}")


if __name__ == "__main__":
    sys.exit(main())
