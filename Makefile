# Two commands on a fresh machine (each sets itself up):
#   make demo   the main job
#   make test   the test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines here have this build on local disk; GPU users keep the CUDA torch they have
# (installed in the venv beforehand, or TORCH_SPEC=... for another build).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup demo test bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

demo: setup
	$(BIN)/workbench zoo measure

test: setup
	$(BIN)/python -m pytest -n auto -q

bench: setup
	$(BIN)/python -m kernels.benchmark

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
