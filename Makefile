# Two commands on a fresh machine: `make run` and `make test`. Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
EXTRAS := dev,load

.PHONY: venv run test test-newest newest-suite lint experiment load-tools bench swarm swarm-down clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

run: venv
	$(BIN)/gunicorn -c gunicorn_conf.py heavyapp:app

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Lint and the whole suite, on this Python: all a machine with Python 3.11+ and make needs.
test: venv lint
	$(BIN)/pytest

# CI adds, after make test, the suite on the newest Python it offers (issue 13), from pyenv, in
# its own venv, within CI's time: not the image (its base sets its Python), nor what tests
# third-party tools rather than the kit (nginx in front, Locust and matplotlib, so no load extra
# either; Prometheus and promtool reading the alert rules). Where that Python is missing it says it ran nothing and succeeds; with
# HEAVYAPP_REQUIRE_NEWEST=1 (.ci/run sets it) it fails instead, so CI never passes without it.
NEWEST := 3.13
NEWEST_VENV := .venv-$(NEWEST)

test-newest:
	@py=$$(ls -v $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$(NEWEST).*/bin/python$(NEWEST) 2>/dev/null \
	    | tail -n 1); \
	if [ -z "$$py" ]; then \
	    echo "test-newest: no Python $(NEWEST) in pyenv (pyenv install $(NEWEST)): ran nothing" >&2; \
	    [ "$${HEAVYAPP_REQUIRE_NEWEST:-}" != 1 ] || exit 1; \
	    exit 0; \
	fi; \
	$(MAKE) --no-print-directory VENV=$(NEWEST_VENV) PYTHON=$$py EXTRAS=dev venv newest-suite

# test-newest's second half, once it has made that Python's venv.
newest-suite:
	$(NEWEST_VENV)/bin/pytest -m "not container and not front" --ignore=tests/test_loadtest.py \
	    --ignore=tests/test_alerts.py

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
	$(BIN)/python -m bench.clients
	$(BIN)/python -m bench.native
	$(BIN)/python -m bench.lifecycle
	$(BIN)/python -m bench.swarm

# The kit as a Docker swarm stack (deploy/swarm/, docs/deployment.md#swarm): builds the images
# from local bases, creates a one-node swarm if the engine is in none, deploys the stack
# "heavyapp", waits until every replica is healthy; the last line is the front's URL.
# SWARM_PORT (default 8080) is where the front is published. swarm-down removes it all again.
swarm: venv
	@$(BIN)/python -m harness.swarm up

swarm-down: venv
	@$(BIN)/python -m harness.swarm down

clean:
	rm -rf $(VENV) $(NEWEST_VENV) .pytest_cache .ruff_cache *.egg-info
