# The two commands that matter on a fresh machine:
#   make demo   set up, then inject a few facts into the default model and show completions
#   make test   set up (with test extras), then run the test suite
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup setup-test demo test test-extended scenario lifelong bench clean

setup:
	scripts/setup.sh

setup-test:
	scripts/setup.sh --test

demo: setup
	$(BIN)/python -m sleepwake.demo

# Two workers, a test file each at a time (module fixtures are built once), in the
# order tests/conftest.py gives (longest first; xdist would put files of many tests first).
test: setup-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder --durations=25

# Variations of what `make test` covers: Gemma-3 and LoRA sleep on MLX, a rejected nap on MLX,
# LoRA consolidation's forget, carry-over and failed facts, the no-reconsolidation ablation, NF4
# with LoRA sleep, the lifelong benchmark end to end, 9 subjects x 3 facts. Too long for the
# 10 minutes `make test` has here.
test-extended: setup-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m extended

# The end-to-end evidence of issue #4: 15 messages through the server, deep sleep, restart, page.
scenario: setup-test
	$(BIN)/python -m pytest -q -s -m scenario

# Issue #25's hundred facts through auto naps, a deep sleep and a restart, and issue #2's 20 x 3 facts
# (`make test` runs 9 x 3): too long for `make test` here.
lifelong: setup-test
	$(BIN)/python -m pytest -q -s -m lifelong

clean:
	rm -rf $(VENV) .pytest_cache build dist src/*.egg-info
