"""Task lists: the paper's 32 CrossFit QA tasks with its manual groups, and the bundled benchmark's."""

# The paper's 32 QA tasks (CrossFit names), in the order of its similarity matrices.
QA_task_list = [
    "adversarialqa", "hotpot_qa", "superglue-record",
    "ai2_arc", "codah", "commonsense_qa", "cosmos_qa", "dream", "hellaswag", "openbookqa", "qasc", "quail",
    "quarel", "quartz-no_knowledge", "quartz-with_knowledge", "race-high", "race-middle", "sciq",
    "superglue-copa", "swag", "wino_grande", "wiqa",
    "boolq", "mc_taco",
    "eli5-askh", "eli5-asks", "eli5-eli5",
    "lama-conceptnet", "lama-google_re", "numer_sense", "search_qa", "web_questions",
]

# The paper's manual division of those tasks into groups of similar tasks.
QA_groups = {
    "machine_reading_comprehension": ["adversarialqa", "hotpot_qa", "superglue-record"],
    "multiple_choice_qa": ["ai2_arc", "codah", "commonsense_qa", "cosmos_qa", "dream", "hellaswag", "openbookqa",
                           "qasc", "quail", "quarel", "quartz-no_knowledge", "quartz-with_knowledge", "race-high",
                           "race-middle", "sciq", "superglue-copa", "swag", "wino_grande", "wiqa"],
    "binary": ["boolq", "mc_taco"],
    "long_form_qa": ["eli5-askh", "eli5-asks", "eli5-eli5"],
    "closed_book_qa": ["lama-conceptnet", "lama-google_re", "numer_sense", "search_qa", "web_questions"],
}

# Every bundled task (data/full and data/fewshot).
BUNDLED_TASKS = [f"babi-qa{i}" for i in range(1, 21)] + ["csqa2", "gsm8k", "numer_sense", "piqa"]

# A manual division of the bundled tasks by the kind of question they ask.
BUNDLED_GROUPS = {
    "babi_where": ["babi-qa1", "babi-qa2", "babi-qa3", "babi-qa11", "babi-qa12", "babi-qa13", "babi-qa14"],
    "babi_yes_no": ["babi-qa6", "babi-qa9", "babi-qa10", "babi-qa17", "babi-qa18"],
    "babi_count_list": ["babi-qa7", "babi-qa8"],
    "babi_relations": ["babi-qa4", "babi-qa5", "babi-qa15", "babi-qa16", "babi-qa19", "babi-qa20"],
    "commonsense": ["csqa2", "piqa"],
    "numeric": ["numer_sense", "gsm8k"],
}


def groups_for(tasks, groups):
    """The groups restricted to ``tasks`` (groups left with fewer than two members are dropped)."""
    keep = set(tasks)
    out = {name: [t for t in members if t in keep] for name, members in groups.items()}
    return {name: members for name, members in out.items() if len(members) >= 2}

# Upstream tasks of the embedded backbone: trained supervised during its pretraining
# (scripts/pretrain_backbone.py), so they are kept out of every transfer study on it. The three
# "where is" tasks teach it to track who is where (span corruption alone does not: docs/BACKBONE.md,
# section 6); every other bundled task stays in the study.
UPSTREAM_TASKS = ["babi-qa11", "babi-qa12", "babi-qa13"]

# The bundled tasks a transfer study on the embedded backbone uses (targets and sources).
STUDY_TASKS = [t for t in BUNDLED_TASKS if t not in UPSTREAM_TASKS]

# The planted positive control (scripts/build_planted.py): each variant rewrites a bundled bAbI task's
# surface (names, verbs, question wording) and keeps its skill and its answers; its sibling, the
# original task, is in the pool of sources. A variant is only ever a target, never a source.
PLANTED = {f"planted-{task}": task for task in ["babi-qa1", "babi-qa2", "babi-qa8", "babi-qa16", "babi-qa18",
                                                 "babi-qa20"]}
