# edge-sdk: two commands for a new user.
#   make demo  - build the demo models (once), convert them, run both pipelines on held-out samples
#   make test  - run the whole test suite (what CI runs)
#   make bench - benchmarks (ratios against baselines measured in the same run)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
BUILD  := build/demo

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.test-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[convert,serve,dev]"
	touch $@

$(VENV)/.demo-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[convert,demo]"
	touch $@

demo: $(VENV)/.demo-deps
	$(BIN)/python -m demo.build_image_model --out $(BUILD)/image
	$(BIN)/python -m demo.build_text_model --out $(BUILD)/text
	$(BIN)/python -m demo.run --build $(BUILD)

test: $(VENV)/.test-deps
	$(BIN)/python -m mypy
	$(BIN)/python -m pytest

bench: $(VENV)/.demo-deps $(VENV)/.test-deps
	$(BIN)/python -m bench.runtime_overhead
	$(BIN)/python -m bench.int8 --out build/bench/int8.json
	$(BIN)/python -m bench.prune --out build/bench/prune.json
	$(BIN)/python -m bench.pipeline --out build/bench/pipeline.json
	$(BIN)/python -m bench.daemon --out build/bench/daemon.json

clean:
	rm -rf $(BUILD) $(VENV)
