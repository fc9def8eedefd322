# One entry point for newcomers and CI. Every target sets itself up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast test-distributed typecheck lint demo emulator bench constraints clean ui browser

# The inner loop: the client, the engine's pieces, the trigger and the emulator, over loopback. No DAG
# runs, no Airflow processes, no metadata DB (about a minute). `make test` runs these and everything else.
FAST_TESTS := tests/api tests/batch tests/emulator tests/triggers tests/test_polling.py tests/test_extras.py \
	tests/operators/test_arguments.py tests/docs/test_reference.py tests/docs/test_links.py

# Bytecode: uv does not compile it by default (pip does), and this machine sets PYTHONDONTWRITEBYTECODE,
# so without it every Airflow process (task runners, CLI calls) compiles Airflow from source: ~2 s each.
setup: $(STAMP)
	@$(PY) -m compileall -q -j 2 airflow_provider_imagen dags benchmarks tests scripts >/dev/null

# The test extra brings the emulator and publish extras: the tests and the demo need both.
$(STAMP): pyproject.toml constraints.txt
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	uv venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	uv pip install --quiet --compile-bytecode --python $(PY) -c constraints.txt -e '.[test,ui]'
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The browser tests drive Debian's chromium package (never a downloaded browser build).
browser:
	@command -v chromium >/dev/null 2>&1 || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@command -v chromium >/dev/null 2>&1 || { echo "chromium is missing and could not be installed (apt-get install chromium)"; exit 1; }

# The package ships py.typed: its annotations are part of what users get (settings: pyproject.toml).
typecheck: setup
	$(PY) -m mypy

# Lint, types and every test but the distributed suite; the system tests run beside the rest (see the
# script). PYTEST_ARGS: pytest flags for both halves.
test: setup browser
	PY=$(PY) scripts/test_suite.sh $(PYTEST_ARGS)

# The distributed suite alone (tests/distributed: CeleryExecutor over Redis, PostgreSQL, two workers, two
# triggerers; ~15 min): installs the `distributed` extra; the tests install Debian's postgresql and
# redis-server with apt-get when missing. Not part of `make test` (too long for it); CI runs both.
test-distributed: setup
	uv pip install --quiet --compile-bytecode --python $(PY) -c constraints.txt -e '.[test,distributed]'
	$(PY) -m pytest -q -p no:cacheprovider -m distributed -rA $(PYTEST_ARGS) tests/distributed

test-fast: setup
	$(PY) -m pytest -q -p no:cacheprovider $(FAST_TESTS) $(PYTEST_ARGS)

demo: setup
	$(PY) scripts/demo.py

# Serve the demo's Airflow (after make demo) with the Imagen plugin; prints the night's gallery URL.
ui: setup
	$(PY) scripts/ui.py

# The provider against what users build without it (~1 h): BENCH_ARGS="--quick" for a few minutes.
# Figures: docs/benchmarks.md. The bench extra adds the stock-Airflow baselines' providers and the plots.
bench: setup
	uv pip install --quiet --compile-bytecode --python $(PY) -c constraints.txt -e '.[test,bench]'
	$(PY) -m benchmarks.run $(BENCH_ARGS)

emulator: setup
	$(PY) -m airflow_provider_imagen.emulator --port 8930

constraints: setup
	(echo "# Pinned versions the project is tested with (the official Airflow constraints file cannot be fetched here)."; \
	 echo "# Regenerate: make constraints"; uv pip freeze --python $(PY) | grep -v -i -e "airflow-provider-imagen" -e "^-e ") > constraints.txt.new
	mv constraints.txt.new constraints.txt

clean:
	rm -rf $(VENV) .airflow .demo
