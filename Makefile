# srnode — the two commands a new user needs: `make demo` and `make test`.
PY ?= python3
PIP = $(PY) -m pip
STAMP = .venv-stamp

.PHONY: install system demo test test-faults bench bench-eval fuzz lint lint-docker typecheck clean

system:
	bash scripts/install-system.sh

$(STAMP): pyproject.toml scripts/install-python.sh
	PY=$(PY) bash scripts/install-python.sh --dev --editable
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

bench-eval: install
	PY=$(PY) bash bench/cpu_eval.sh $$(git rev-parse --short HEAD)

fuzz: install
	$(PIP) install -q atheris
	$(PY) tests/fuzz/fuzz_ingest.py -max_total_time=$${FUZZ_SECONDS:-60}

lint: install
	$(PY) -m ruff check node models tests orthanc
	$(PY) -m mypy node models

# the image cannot be built here (no Docker engine): lint it; its build steps are the two install scripts above
lint-docker: install
	hadolint Dockerfile

clean:
	rm -rf $(STAMP) spool srnode-out .pytest_cache .mypy_cache
