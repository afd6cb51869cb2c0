# Two commands on a fresh machine (python3 and make): `make serve`, `make test`.
# Each creates .venv and installs the project when missing, or again when
# pyproject.toml has changed since the last install.

VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: serve test bench bench-quick bench-10m bench-simulation soak clean

$(STAMP): pyproject.toml
	@test -x $(PYTHON) || python3 -m venv $(VENV) || \
		{ echo "python3 -m venv failed: install Python 3.11+ with venv (Debian: apt-get install python3-venv)"; exit 1; }
	$(PYTHON) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

# The console's browser tests drive Debian's chromium (Playwright's own browser
# downloads cannot reach closed networks): installed here when missing and we
# may (root with apt-get); elsewhere tests/test_console.py says why it skips.
.PHONY: browser
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } || true; }

# With no DATABASE_URL, runs an embedded PostgreSQL with its data in ./.loyalty/.
serve: $(STAMP)
	$(VENV)/bin/loyalty serve

# A throwaway embedded PostgreSQL unless TEST_DATABASE_URL is set;
# PYTEST_ARGS picks tests, e.g. make test PYTEST_ARGS=tests/test_database.py
test: $(STAMP) browser
	$(PYTHON) -m pytest -q $(PYTEST_ARGS)

# The bench's own extras (matplotlib, eventsourcing, psycopg, py-spy); wrk
# comes from the system's packages: installed here when missing and we may
# (root with apt-get), else bench/run.py says how.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PYTHON) -m pip install --quiet -e '.[test,bench]'
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		{ apt-get update -qq && apt-get install -y -qq wrk; } || true; }
	@touch $(BENCH_STAMP)

# Its own PostgreSQL (throwaway, or BENCH_DATABASE_URL) and service; writes
# bench/results/ and the README's table. Not run in CI.
bench: $(BENCH_STAMP)
	$(PYTHON) -m bench.run

# The same, smaller and shorter (under 2 minutes).
bench-quick: $(BENCH_STAMP)
	$(PYTHON) -m bench.run --quick

# Ingest on 10M stored events vs the empty store (about half an hour, 6 GB):
# writes bench/results/stored-10m.json, which the next `make bench` shows
# in its table beside the 1M figure.
bench-10m: $(BENCH_STAMP)
	BENCH_STORED_EVENTS=10000000 $(PYTHON) -m bench.run --only stored --name stored-10m

# The simulation alone (POST /v1/simulations over BENCH_SIMULATION_PURCHASES stored purchases, default
# 1M, beside the raw read of the same events): writes bench/results/simulation.json, which a `make bench`
# run without that scenario shows in its table.
bench-simulation: $(BENCH_STAMP)
	$(PYTHON) -m bench.run --only simulation --name simulation

# Ten minutes (SOAK_SECONDS) of mixed load with faults injected (connections
# cut, the service killed and restarted): nothing lost or doubled, memory flat.
# Writes bench/results/soak.json. Not run in CI.
soak: $(STAMP)
	$(PYTHON) -m bench.soak

# Removes the environment and caches; the service's data in .loyalty/ is kept.
clean:
	rm -rf $(VENV) .pytest_cache .hypothesis *.egg-info build dist
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
