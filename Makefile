# srnode — the two commands a new user needs: `make demo` and `make test`.
PY ?= python3
PIP = $(PY) -m pip
STAMP = .venv-stamp

.PHONY: install system demo test test-faults bench fuzz lint typecheck clean

system:
	bash scripts/install-system.sh

$(STAMP): pyproject.toml
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

install: system $(STAMP)

demo: install
	$(PY) -m node.demo

test: install
	$(PY) -m pytest -q -m "not faults and not gpu" tests

test-faults: install
	$(PY) -m pytest -q -m faults tests

bench: install
	$(PY) -m node.cli bench all --cpu-only

fuzz: install
	$(PIP) install -q atheris
	$(PY) tests/fuzz/fuzz_ingest.py -max_total_time=$${FUZZ_SECONDS:-60}

lint: install
	$(PY) -m ruff check node models tests orthanc
	$(PY) -m mypy node models

clean:
	rm -rf $(STAMP) spool srnode-out .pytest_cache .mypy_cache
