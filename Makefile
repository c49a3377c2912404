# The two commands that matter on a fresh machine:
#   make demo   set up, then inject a few facts into the default model and show completions
#   make test   set up (with test extras), then run the test suite
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-test demo test bench clean

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh --test

demo: setup
	$(BIN)/python -m sleepwake.demo

test: setup-test
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
