# srnode — the two commands a new user needs: `make demo` and `make test`.
# Everything runs inside the project's own virtual environment (.venv/), made from the system python3: on a stock
# Debian machine python3 is "externally managed" (PEP 668) and refuses pip installs outside a venv.
SYSTEM_PY ?= $(shell [ -x /usr/bin/python3 ] && echo /usr/bin/python3 || command -v python3)
VENV ?= .venv
PY = $(VENV)/bin/python
PIP = $(PY) -m pip
STAMP = $(VENV)/.installed
# what pytest runs in `make test` / `make test-faults` / `make test-peers`: e.g. make test PYTEST_ARGS="tests/app -k cli"
PYTEST_ARGS ?= tests

.PHONY: install system venv demo test test-faults test-peers bench bench-eval bench-peers peers-venv fuzz lint lint-docker typecheck clean

system:
	bash scripts/install-system.sh

$(PY):
	$(SYSTEM_PY) -m venv $(VENV)

venv: $(PY)

$(STAMP): $(PY) pyproject.toml scripts/install-python.sh
	PY=$(PY) bash scripts/install-python.sh --dev --editable
	touch $(STAMP)

install: system $(STAMP)

demo: install
	$(PY) -m node.app.demo

test: install
	$(PY) -m pytest -q -m "not faults and not gpu and not peers" $(PYTEST_ARGS)

test-faults: install
	$(PY) -m pytest -q -m faults $(PYTEST_ARGS)

bench: install
	$(PY) -m node.app.cli bench all --cpu-only

# ECLARE, the peer of `srnode bench peers`, in its own venv (.venv-eclare/: it pins scipy), torch pinned to ours
peers-venv:
	bash scripts/peers-venv.sh

test-peers: install peers-venv
	$(PY) -m pytest -q -m peers $(PYTEST_ARGS)

# side by side on the held-out MR and the body CT; CPU: central crops and a reduced ECLARE budget (in the JSON)
bench-peers: install peers-venv
	$(PY) -m node.app.cli bench peers ../shared/data/mr_t1_3d_axial_ge ../shared/data/ct_body_j2k_siemens_petct \
	  --crop $${CROP:-40} --max-slices 21 --n-patches $${PATCHES:-128} --batch-size 16 --note "$${NOTE:-}"

bench-eval: install
	PY=$(PY) bash bench/cpu_eval.sh $$(git rev-parse --short HEAD)

fuzz: install
	$(PIP) install -q atheris
	$(PY) -m tests.ingest.fuzz_ingest -max_total_time=$${FUZZ_SECONDS:-60}

lint: install
	$(PY) -m ruff check node models tests orthanc bench
	$(PY) -m mypy node models

# the image cannot be built here (no Docker engine): lint it; its build steps are the two install scripts above
lint-docker: install
	$(VENV)/bin/hadolint Dockerfile

clean:
	rm -rf $(VENV) .venv-eclare srnode-out demo-run .pytest_cache .mypy_cache
