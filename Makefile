# make test   install what is needed into .venv, then run the test suite
# make demo   the main job on the embedded default (bundled data, small T5, CPU)
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-requirements
BACKBONE := data/t5-mini/config.json

.PHONY: install backbone demo test clean-runs

install: $(STAMP)

$(STAMP): requirements.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	cp requirements.txt $(STAMP)

backbone: $(BACKBONE)

$(BACKBONE): | $(STAMP)
	$(BIN)/python scripts/pretrain_backbone.py

demo: $(BACKBONE)
	$(BIN)/python tune_hps_singletask.py --do_train --do_predict --tune_method adapter --apply_adapter \
	  --tasks babi-qa1 babi-qa6 csqa2 --train_iters 300 --valid_interval 100 --log_interval 100 \
	  --output_dir runs/demo/adapter

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

clean-runs:
	rm -rf runs
