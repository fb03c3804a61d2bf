PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test test-llamacpp lint bench clean

# The torch pair below lies on the build machines' disk (pip takes it from there in ~1 min).
# On a GPU machine, install the CUDA torch you want into .venv first; pip keeps it.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python train.py

test: setup
	$(BIN)/python -m pytest -q -x --durations=15

test-llamacpp: setup
	$(BIN)/python -m pytest -q -m llamacpp

lint: setup
	$(BIN)/ruff check finetune data_tools tests benchmarks train.py
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/cpu_throughput.py
	$(BIN)/python benchmarks/merge_memory.py

clean:
	rm -rf runs .pytest_cache
