# Two commands on a fresh machine (each sets itself up):
#   make demo   the main job
#   make test   lint, then the test suite (what CI runs), with the fixed seed of tests/conftest.py
#   make lint   ruff's lint and format checks (make format applies the formatting)
#   make fuzz   the kernel property and accuracy tests with fresh seeds (ROUNDS=N rounds)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines here have this build on local disk; GPU users keep the CUDA torch they have
# (installed in the venv beforehand, or TORCH_SPEC=... for another build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup browser demo app lint format test fuzz bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

# Chromium lets Kaleido write PNG figures (HTML figures need nothing) and runs the explorer's
# browser test; Debian's package when this machine can install it, else PNGs are skipped with a
# notice (and the browser test fails, saying how to install it).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v google-chrome >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1; } || \
	  echo "no Chromium here: figures are written as HTML only"

demo: setup browser
	$(BIN)/workbench score

app: setup
	$(BIN)/workbench app

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

test: setup browser lint
	$(BIN)/python -m pytest -n auto -q

# Fresh random seeds for the kernel tests; a failing round prints its seed (rerun it with
# WORKBENCH_TEST_SEED=<seed> make fuzz, or with make test).
ROUNDS ?= 1
FUZZ_TESTS ?= tests/kernels/test_kernel_accuracy.py tests/kernels/test_kernel_properties.py tests/kernels/test_kernel_merge.py \
              tests/kernels/test_merge.py
fuzz: setup
	@for round in $$(seq $(ROUNDS)); do \
	  seed=$${WORKBENCH_TEST_SEED:-$$($(BIN)/python -c 'import secrets; print(secrets.randbits(31))')}; \
	  echo "fuzz round $$round of $(ROUNDS): WORKBENCH_TEST_SEED=$$seed"; \
	  WORKBENCH_TEST_SEED=$$seed $(BIN)/python -m pytest -n auto -q -p no:cacheprovider $(FUZZ_TESTS) || \
	    { echo "FUZZ FAILURE with WORKBENCH_TEST_SEED=$$seed (replay: WORKBENCH_TEST_SEED=$$seed make fuzz)"; exit 1; }; \
	done

bench: setup
	$(BIN)/python -m kernels.benchmark

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
