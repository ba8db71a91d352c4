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

$(VENV)/.bench-deps: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e ".[convert,demo,bench]"
	touch $@

bench: $(VENV)/.demo-deps $(VENV)/.test-deps $(VENV)/.bench-deps
	$(BIN)/python -m bench.runtime_overhead
	$(BIN)/python -m bench.int8_kernels --json build/bench/int8_kernels.json
	$(BIN)/python -m bench.int8 --out build/bench/int8.json
	$(BIN)/python -m bench.cpu --out build/bench/cpu.json
	$(BIN)/python -m bench.prune --out build/bench/prune.json
	$(BIN)/python -m bench.pipeline --out build/bench/pipeline.json
	$(BIN)/python -m bench.daemon --out build/bench/daemon.json
	$(BIN)/python -m bench.graph_ir --out build/bench/graph_ir.json
	$(BIN)/python -m bench.anomaly --out build/bench/anomaly.json

clean:
	rm -rf $(BUILD) $(VENV)

# Arm64 (Jetson CPU) check by emulation: see demo/verify_device.py and tools/arm64/
#   make verify-arm64  - builds (once, cached) an arm64 Debian root under build/arm64-root, installs
#                        the device side there (no extras) and checks build/demo/packages under
#                        QEMU_CPU=max (int8 dot product, i8mm; SVE/SME off) and cortex-a57 (none);
#                        needs root.
#   make verify-arm64 ARM64_CPUS=cortex-a76 VERIFY_SAMPLES=16   (one pass: Orin-like core, more samples)
ARM64_CPUS     ?= max,sve=off,sme=off cortex-a57
VERIFY_SAMPLES ?= 10

.PHONY: verify-arm64 verify-arm64-root verify-arm64-clean demo-packages-exist-check

demo-packages-exist-check:
	@ls $(BUILD)/packages/*.int8.edgepkg >/dev/null 2>&1 || \
		{ echo "verify-arm64: no $(BUILD)/packages/*.int8.edgepkg; run 'make demo' first" >&2; exit 1; }

verify-arm64-root:
	tools/arm64/root.sh

verify-arm64: demo-packages-exist-check
	DEMO_BUILD=$(BUILD) ARM64_CPUS="$(ARM64_CPUS)" VERIFY_SAMPLES=$(VERIFY_SAMPLES) tools/arm64/run.sh

verify-arm64-clean:
	-for m in proc dev sys; do umount build/arm64-root/$$m 2>/dev/null; done
	rm -rf --one-file-system build/arm64-root build/arm64-qemu build/arm64-verify

# x86 without VNNI (AVX2) by emulation: qemu-user's TCG has AVX2 but no AVX-512 or VNNI, so onnxruntime
# dispatches the kernels such a CPU runs. Correctness only (emulation is ~50x slower).
#   make verify-avx2  - the int8 kernel probe and the ISA tests under qemu-x86_64-static -cpu max
.PHONY: verify-avx2
verify-avx2: $(VENV)/.test-deps
	command -v qemu-x86_64-static >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q qemu-user-static; }
	qemu-x86_64-static -cpu max $(BIN)/python -m bench.int8_kernels
	qemu-x86_64-static -cpu max $(BIN)/python -m pytest -q -p no:cacheprovider tests/unit/converters/test_reference.py \
		tests/integration/test_int8_isa.py -k "not mixed_precision_ends and not every_layer_in_float"
