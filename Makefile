# The two set-up commands of the README. Both create or reuse .venv/ at the repository root.
# make test runs two pytest workers, one per core, each file on one worker (service tests in one file share
# a broker database), one thread each (two torch processes with default threads spin against each other).
# pip's find-links are switched off: this machine's find-links hold a +cpu torch wheel with
# which torchvision 0.28 fails to import (FINDINGS: the install trap).
PY ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
PIPENV := PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS=

.PHONY: venv serve test lint

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(PIPENV) $(VENV)/bin/pip install -q --upgrade pip
	$(PIPENV) $(VENV)/bin/pip install -q -e '.[dev]'
	$(VENV)/bin/python -c "import torch, torchvision; assert '+cpu' not in torch.__version__, torch.__version__"
	touch $(STAMP)

venv: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/slim serve

test: $(STAMP)
	$(VENV)/bin/ruff check slimcore api worker tests bench
	OMP_NUM_THREADS=1 $(VENV)/bin/python -m pytest -q -ra --durations=15 -n 2 --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check slimcore api worker tests bench
