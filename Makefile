# One entry point for newcomers and CI. Every target sets itself up on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test test-fast test-distributed lint demo emulator bench constraints clean

# Bytecode: uv does not compile it by default (pip does), and this machine sets PYTHONDONTWRITEBYTECODE,
# so without it every Airflow process (task runners, CLI calls) compiles Airflow from source: ~2 s each.
setup: $(STAMP)
	@$(PY) -m compileall -q -j 2 airflow_provider_imagen dags benchmarks tests scripts >/dev/null

$(STAMP): pyproject.toml constraints.txt
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install --quiet uv
	uv venv --quiet --allow-existing --python $(PYTHON) $(VENV)
	uv pip install --quiet --compile-bytecode --python $(PY) -c constraints.txt -e '.[test]'
	@touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -p no:cacheprovider -m "not distributed" $(PYTEST_ARGS)

# The distributed suite alone (tests/distributed: CeleryExecutor over Redis, PostgreSQL, two workers, two
# triggerers; ~15 min): installs the `distributed` extra; the tests install Debian's postgresql and
# redis-server with apt-get when missing. Not part of `make test` (too long for it); CI runs both.
test-distributed: setup
	uv pip install --quiet --compile-bytecode --python $(PY) -c constraints.txt -e '.[test,distributed]'
	$(PY) -m pytest -q -p no:cacheprovider -m distributed -rA $(PYTEST_ARGS) tests/distributed

demo: setup
	$(PY) scripts/demo.py

# The benchmark suite (issue 6; ~1 h): BENCH_ARGS="--quick" for a few minutes. Figures: docs/benchmarks.md.
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
