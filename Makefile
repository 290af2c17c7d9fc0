# The two commands the README leads with. Each sets itself up on a fresh machine: a project virtual environment in
# .venv (the system Python is never installed into), piece_mm installed into it in editable mode, then the job.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: run test install
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

run: install
	$(BIN)/python -m piece_mm.train --model llava

# lint, the default suite (fast), then the slow end-to-end tests (the wheel in a fresh environment among them). The
# slow tests run two at a time (pytest-xdist, one file per worker, so a file's shared runs are made once): most of them
# are one single-threaded training process and would leave the second core idle.
test: install
	$(BIN)/python -m ruff check .
	$(BIN)/python -m pytest -q
	$(BIN)/python -m pytest -q -m slow -n 2 --dist loadfile --no-loadscope-reorder
