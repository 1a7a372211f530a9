# Two entry points (README): `make run` and `make test`. Each creates or updates .venv itself.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run demo test test-fast lint venv venv-test

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Reinstall only when pyproject.toml changes.
$(VENV)/.core-stamp: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.test-stamp: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[test]"
	touch $@ $(VENV)/.core-stamp

venv: $(VENV)/.core-stamp
venv-test: $(VENV)/.test-stamp

run: venv
	$(BIN)/python -m amsam_jax.train

demo: venv
	$(BIN)/python -m amsam_jax.predict --demo --output runs/demo/prediction.npz --overlay runs/demo/overlay.png

# Two workers (one per core): the suite is dominated by single-threaded XLA compiles. A test
# file stays on one worker (--dist loadfile), so module fixtures are built once.
test: venv-test
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=15 tests

test-fast: venv-test
	$(BIN)/python -m pytest -q -m "not slow" tests

lint: venv-test
	$(BIN)/ruff check amsam_jax weights_conversion tests train
	$(BIN)/ruff format --check amsam_jax weights_conversion tests train
