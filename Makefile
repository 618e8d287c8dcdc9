# Two commands on a fresh machine: `make run` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv run test lint experiment load-tools bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,load]'
	touch $(STAMP)

run: venv
	$(BIN)/gunicorn -c gunicorn_conf.py heavyapp:app

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: venv lint
	$(BIN)/pytest

experiment: venv load-tools
	$(BIN)/python -m loadtest.experiment

# The experiment and bench.overload load with Debian's hey (open loop) and wrk (capacity);
# apt-get needs root.
load-tools:
	command -v hey >/dev/null && command -v wrk >/dev/null || { apt-get update -qq \
		&& DEBIAN_FRONTEND=noninteractive apt-get install -y -qq hey wrk >/dev/null; }

bench: venv load-tools
	$(BIN)/pip install --quiet -e '.[bench]'
	$(BIN)/python -m bench.scaling
	$(BIN)/python -m bench.overhead
	$(BIN)/python -m bench.peers
	$(BIN)/python -m bench.overload

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
