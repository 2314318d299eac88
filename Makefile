# Two commands a fresh clone needs: `make run` and `make test`.
# Both create .venv/ on first use and reuse it afterwards.

PYTHON ?= python3
# Python sources checked by ruff (Markdown code samples are prose, not checked).
CODE := daemon tests bench scripts
VENV := .venv
BIN := $(VENV)/bin
CONFIG ?= config/tfmerge.toml
STAMP := $(VENV)/.installed
# pytest-xdist processes for `make test`: the suite spends most of its time waiting for child
# processes (daemons, workers importing TensorFlow), so two keep two cores busy.
TEST_WORKERS ?= 2

.PHONY: run test test-variants lint typecheck check bench demo clean-venv

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## run: start the daemon in the foreground on config/tfmerge.toml (Ctrl-C stops it)
run: $(STAMP)
	$(BIN)/tfmerge run -c $(CONFIG)

## test: lint, type-check and run the test suite
test: $(STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)
	$(BIN)/mypy
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

## test-variants: the test suite with oneDNN off and on, held to AVX2 and SSE4.1, and on a busy machine
test-variants: $(STAMP)
	scripts/test-variants.sh

lint: $(STAMP)
	$(BIN)/ruff check $(CODE)
	$(BIN)/ruff format --check $(CODE)

typecheck: $(STAMP)
	$(BIN)/mypy

## demo: regenerate frozen/demo.pb
demo: $(STAMP)
	$(BIN)/python scripts/make_demo_model.py frozen/demo.pb

bench: $(STAMP)
	$(BIN)/python -m bench

clean-venv:
	rm -rf $(VENV)
