PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-preference demo-grpo test test-agent test-llamacpp lint bench gpu-wheels clean

# torch/torchvision are pinned to one matching pair (the image processor needs torchvision).
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

demo-preference: setup
	$(BIN)/python -m finetune.cli demo --preference

demo-grpo: setup
	$(BIN)/python -m finetune.cli demo --grpo

test: setup
	$(BIN)/python -m pytest -q -x --durations=15

test-agent: setup
	$(BIN)/python -m pytest -q -m agent_loop

test-llamacpp: setup
	$(BIN)/python -m pytest -q -m llamacpp
	$(BIN)/python -m pytest -q -m templates
	$(BIN)/python -m pytest -q -m ollama_template
	$(BIN)/python -m pytest -q -m realtok

lint: setup
	$(BIN)/ruff check finetune data_tools tests benchmarks train.py
	$(BIN)/lint-imports
	$(BIN)/python scripts/module_map.py --check

bench: setup
	$(BIN)/python benchmarks/data_throughput.py
	$(BIN)/python benchmarks/cpu_throughput.py
	$(BIN)/python benchmarks/merge_memory.py

# Wheels a bare GPU machine may lack (its own CUDA torch is kept): downloaded into the ignored
# .whl/ and installed by benchmarks/gpu_run.sh there. Python 3.12, x86-64.
GPU_WHEELS := transformers==5.24.0 peft==0.21.2 bitsandbytes==0.50.2 \
	trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 xxhash==4.1.0 fsspec==2026.9.0
gpu-wheels:
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 -d .whl $(GPU_WHEELS)

clean:
	rm -rf runs .pytest_cache
