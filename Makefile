# make test   install what is needed into .venv, then run the test suite
# make demo   the main job on the embedded default (bundled data, small T5, CPU)
# make test-slurm  scripts/slurm_study.sh on a real single-node Slurm (root; installs slurm-wlm, munge)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-requirements
BACKBONE := data/t5-mini/config.json

.PHONY: install backbone demo test test-slurm clean-runs

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	cp requirements.txt $(STAMP)

backbone: $(BACKBONE)

$(BACKBONE): | $(STAMP)
	$(BIN)/python scripts/pretrain_backbone.py

# A reduced study (scripts/demo.sh): the shipped LoRA sources as the pool; two planted targets (the
# positive control) and two real ones, each from random init, the plain average and the Loss-weighted
# average, three seeds; two shards in parallel, then the report's answer. The full study is
# `python run_study.py` (see README).
demo: $(STAMP) $(BACKBONE)
	PYTHON=$(abspath $(BIN))/python bash scripts/demo.sh

# One worker per core (TEST_WORKERS=0: in this process, no workers); --dist loadfile keeps each test
# file on one worker, so its module fixtures (tiny studies) are built once.
TEST_WORKERS ?= auto
test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Not part of `make test`: it needs root and starts Slurm daemons (tests/slurm/run_test.sh says what it does).
test-slurm: $(STAMP)
	PYTHON=$(abspath $(BIN))/python bash tests/slurm/run_test.sh

clean-runs:
	rm -rf runs
