# The two commands the README names: `make demo` and `make test`.
# Each creates/updates the local virtual environment .venv first, so nothing installed by hand is assumed.
PYTHON ?= python3
VENV ?= .venv
# CPU build from local disk; a GPU user runs e.g. `make demo TORCH="torch==2.13.0 --index-url <cuda index>"`.
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.stillroom-installed

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/stillroom demo

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/demo_seeds.py

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
