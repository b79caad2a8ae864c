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

$(STAMP): pyproject.toml tools/setup.sh
	@bash tools/setup.sh "$(PYTHON)" "$(TORCH)"

# The main job on the embedded default: a tiny Stable Diffusion learns coloured shapes (~6 minutes on 2 cores).
demo: setup
	$(PY) -m apps.diffusion.finetune output.overwrite=true

test: setup
	$(PY) -m pytest -q --durations=15

clean-venv:
	rm -rf $(VENV)
