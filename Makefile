# The two commands of the README:  `make demo` (set up + run the example QC job) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell sha256sum pyproject.toml | cut -c1-12)
TIATOOLBOX := tiatoolbox==2.1.3
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow test-all bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m pip install -q --no-deps $(TIATOOLBOX)
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m pipelines.example --out example

test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-slow: $(STAMP)  # .ci/run runs `make test` (the README's command), then this
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-all: $(STAMP)  # the fast and the slow tests in one run
	$(BIN)/python -m pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/tiling.py
	$(BIN)/python benchmarks/scoring.py
	$(BIN)/python benchmarks/runtimes.py
	$(BIN)/python benchmarks/batch.py
	$(BIN)/python benchmarks/slide.py
	$(BIN)/python benchmarks/report.py

clean:
	rm -rf $(VENV) example .pytest_cache
