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

# A reduced study (run_study.py): 3 bundled bAbI tasks, adapters, random / average / Loss-weighted
# inits, 2 seeds, short budgets. The full study is `python run_study.py` (see README).
DEMO_FLAGS := --output_dir runs/demo --tasks babi-qa1 babi-qa2 babi-qa6 --inits average --scores Loss \
	--seeds 42 43 --step_budgets 0 25 50 100 --source_train_iters 200 --target_train_iters 100 \
	--valid_interval 100 --log_interval 100 --early_stop 0 --max_output_length 8

demo: $(BACKBONE)
	$(BIN)/python run_study.py $(DEMO_FLAGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

# Not part of `make test`: it needs root and starts Slurm daemons (tests/slurm/run_test.sh says what it does).
test-slurm: $(STAMP)
	PYTHON=$(abspath $(BIN))/python bash tests/slurm/run_test.sh

clean-runs:
	rm -rf runs
