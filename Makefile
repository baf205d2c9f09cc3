# `make test` and `make demo` build .venv from pinned versions on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv test lint demo bench clean
.PHONY: real-model-deps demo-real bench-real

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

test: venv lint real-model-deps
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

# ---------------------------------------------------------------- real-model tier (tests/real)
# llama.cpp (llama-cpp-python's server) with SmolLM2-135M from PyPI: `make test` runs the tier and
# fails, not skips, when its dependencies are missing. llama-cpp-python ships only an sdist, so it
# is built from source once (~8-18 min on 2 cores) into a wheelhouse kept in pip's cache directory
# and installed from there afterwards (seconds). The build is portable (GGML_NATIVE=OFF: AVX2/FMA/F16C)
# because a -march=native build on these machines emits AMX tile instructions that die with SIGILL
# ("invalid opcode" in libggml-cpu.so) at the first completion; and it skips the multimodal library
# (LLAVA_BUILD=OFF), which synth-agent never loads. The flags are part of the wheelhouse path, so a
# change of flags means a new build rather than a stale wheel. --force-reinstall replaces a
# llama-cpp-python of the same version installed earlier from pip's own (possibly native) cache.
LLAMA_CPP_VERSION := 0.3.36
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF
WHEELHOUSE ?= $(shell $(PYTHON) -m pip cache dir 2>/dev/null || echo $(HOME)/.cache/pip)/synth-agent-wheelhouse/llama-cpp-python-$(LLAMA_CPP_VERSION)-portable-nollava
REAL_STAMP := $(VENV)/.real-model

$(REAL_STAMP): $(STAMP) requirements-llamacpp.lock
	@if ! ls $(WHEELHOUSE)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1; then \
		echo "building llama-cpp-python $(LLAMA_CPP_VERSION) from source once (8-18 min on 2 cores) into $(WHEELHOUSE)"; \
		CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -m pip wheel -q --no-deps --no-cache-dir \
			--no-binary llama-cpp-python llama-cpp-python==$(LLAMA_CPP_VERSION) -w $(WHEELHOUSE); \
	fi
	$(PY) -m pip install -q --no-deps --force-reinstall --only-binary llama-cpp-python \
		--find-links $(WHEELHOUSE) -r requirements-llamacpp.lock
	touch $@

real-model-deps: $(REAL_STAMP)

test: export SYNTH_AGENT_REAL_MODEL := required

# The demo at tiny scale (3 users x 7 votes) against the real small model (optional; docs/judges.md).
demo-real: $(REAL_STAMP)
	$(PY) -m synth_agent.demo_real

# Unparseable-answer rate per call site, speed and load time of the real model.
bench-real: $(REAL_STAMP)
	$(PY) bench/real_model.py
