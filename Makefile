# `make test` and `make demo` build .venv from pinned versions on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo bench clean

$(STAMP): pyproject.toml requirements.lock
	@echo "building $(VENV) from requirements.lock (about a minute from pip's cache, longer on a first download)..."
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip==25.3
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

venv: $(STAMP)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: venv lint
	$(VENV)/bin/pytest -q

demo: venv
	$(PY) -m synth_agent.demo $(DEMO_ARGS)

# Each benchmark prints its own figures; store_bench at 1,000 users here (its default,
# the full 10,000 x 20, takes ~20 minutes: run it directly).
bench: venv
	$(PY) bench/fit_cost.py
	$(PY) bench/store_bench.py --users 1000
	$(PY) bench/chat_overhead.py
	$(PY) bench/proxy_overhead.py
	$(PY) bench/judge_throughput.py
	$(PY) bench/fit_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
