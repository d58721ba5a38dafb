# Two set-up commands: `make serve` and `make test`. Each creates or refreshes .venv, then runs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

# Build only the llama.cpp libraries we load: no server, tools, examples, tests or multimodal.
# GGML_NATIVE (the default) tunes the kernels to this CPU. Without llamafile's tinyBLAS a pass of several tokens
# of one sequence computes exactly what one-token decodes do, so greedy output with speculation equals greedy
# output without it, and --deterministic may speculate (docs/benchmarks.md, "AMX and flash attention").
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
	-DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_LLAMAFILE=OFF
export CMAKE_BUILD_PARALLEL_LEVEL ?= $(shell nproc)

HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test lint bench browser screenshots clean

# llama-cpp-python is built from its sdist with third_party/llama-cpp-python/*.patch applied (each says why), once
# per version, patch set and CMAKE_ARGS: the wheel is kept under ~/.cache/qanat, so fresh clones reuse it.
LLAMA_CPP_PYTHON := 0.3.36
LLAMA_PATCHES := $(sort $(wildcard third_party/llama-cpp-python/*.patch))
LLAMA_BUILD_KEY := $(shell (echo $(LLAMA_CPP_PYTHON) $(CMAKE_ARGS); cat $(LLAMA_PATCHES) third_party/llama-cpp-python/build-wheel.sh) | sha256sum | cut -c1-16)
LLAMA_WHEELHOUSE := $(HOME)/.cache/qanat/llama-cpp-python-$(LLAMA_BUILD_KEY)
# A new build key (version, patches, CMAKE_ARGS) reinstalls.
STAMP := $(VENV)/.installed-$(LLAMA_BUILD_KEY)

$(STAMP): pyproject.toml $(LLAMA_PATCHES) third_party/llama-cpp-python/build-wheel.sh
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	test -d $(LLAMA_WHEELHOUSE) || third_party/llama-cpp-python/build-wheel.sh $(BIN)/pip $(LLAMA_CPP_PYTHON) $(LLAMA_WHEELHOUSE)
	$(BIN)/pip install --quiet --force-reinstall --no-deps $(LLAMA_WHEELHOUSE)/llama_cpp_python-*.whl
	$(BIN)/pip install --quiet -e '.[test]'
	rm -f $(VENV)/.installed*
	touch $(STAMP)

serve: $(STAMP)
	$(BIN)/qanat serve --host $(HOST) --port $(PORT)

test: $(STAMP)
	$(BIN)/ruff check qanat tests bench
	$(BIN)/mypy
	$(BIN)/python -m pytest

# Debian's Chromium for the browser tests (as root; .ci/run does it on a fresh machine). Playwright drives it;
# `playwright install` is never used (its download host is not reachable here, and Debian's build is patched).
browser:
	test -x /usr/lib/chromium/chromium || (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium)

# Re-takes docs/webui*.png from the browser tests (real server, real model, under load).
screenshots: $(STAMP)
	QANAT_SCREENSHOTS=docs $(BIN)/python -m pytest tests/e2e/test_webui.py -k "second_turn or dashboard_figures or replica"

bench: $(STAMP)
	$(BIN)/python bench/engine_throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
