# Loom: `make setup` once (idempotent), then `make demo` or `make test`.
#
# TORCH picks the PyTorch build. The default is the CPU build of 2.13.0; on a GPU machine use
#   make setup TORCH=torch                  (PyPI's default Linux wheel, built for CUDA)
# or install your own CUDA build into .venv first and pass TORCH= (empty) to keep it.
PYTHON ?= python3
TORCH  ?= torch==2.13.0
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.loom-setup-done

.PHONY: setup demo test clean-venv

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ -n "$(TORCH)" ]; then echo "installing $(TORCH)"; $(PY) -m pip install -q "$(TORCH)"; fi
	@echo "installing loom-train (editable) with its test extras"
	@$(PY) -m pip install -q -e ".[test]"
	@# OpenFold (PyPI 0.0.1 = v1.0.1) needs torch at build time and a scripts.utils module its sdist lacks
	@$(PY) -c "import openfold" 2>/dev/null || { echo "building openfold 0.0.1 (a few minutes)"; \
		PYTHONPATH=apps/protein/openfold_build $(PY) -m pip install -q --no-build-isolation openfold==0.0.1; }
	@touch $(STAMP)

# The main job on the embedded default: a tiny Stable Diffusion learns coloured shapes (~6 minutes on 2 cores).
demo: setup
	$(PY) -m apps.diffusion.finetune output.overwrite=true

test: setup
	$(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)
