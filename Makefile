# The two commands the README leads with. Each does all of its own set-up on a fresh machine.
PY ?= python3

.PHONY: run test install
install:
	$(PY) -m pip install -q -e '.[test]'

run: install
	$(PY) -m piece_mm.train --model llava

test: install
	$(PY) -m pytest -q
