#!/usr/bin/env bash
# `make setup`: build .venv from nothing, one named and timed step at a time.
#
#   tools/setup.sh PYTHON TORCH_SPEC
#
# Each step prints what it installs and how long it took; a step that fails names itself and the
# one command that retries it, and the stamp that makes `make setup` a no-op is written only
# after every step has passed. OpenFold is always built from its source (`--no-cache-dir`), as a
# new machine builds it: a wheel left in pip's cache must never hide a broken build step.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PYTHON=${1:-python3}
TORCH=${2-torch==2.13.0}
VENV=.venv
PY=$VENV/bin/python
STAMP=$VENV/.loom-setup-done
setup_start=$(date +%s)

step() {  # step NAME COMMAND...
    local name=$1; shift
    echo "==> $name"
    local t0; t0=$(date +%s)
    if "$@"; then
        echo "    $name: done in $(( $(date +%s) - t0 )) s"
    else
        local rc=$?
        echo "error: setup step '$name' failed (exit $rc) after $(( $(date +%s) - t0 )) s." >&2
        printf 'retry it with:  %q' "$1" >&2; shift; printf ' %q' "$@" >&2; echo >&2
        echo "then run 'make setup' again; the steps that passed are kept." >&2
        exit "$rc"
    fi
}

if [ ! -x "$PY" ]; then
    step "create the virtual environment $VENV" "$PYTHON" -m venv "$VENV"
fi
if [ -n "$TORCH" ]; then
    step "install $TORCH" "$PY" -m pip install -q "$TORCH"
else
    echo "==> keeping the torch already in $VENV ($("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo 'none found'))"
fi
step "install loom-train (editable) with its test and lightning extras" "$PY" -m pip install -q -e ".[test,lightning]"
# OpenFold (PyPI 0.0.1 = v1.0.1) needs torch at build time and a `scripts.utils` module its sdist
# lacks: the shim folder goes on PYTHONPATH as an absolute path, since pip runs OpenFold's
# setup.py from a temporary folder of its own.
if "$PY" -c "import openfold" 2>/dev/null; then
    echo "==> openfold 0.0.1 is already installed"
else
    step "build openfold 0.0.1 from source (about 2 minutes)" \
        env PYTHONPATH="$ROOT/apps/protein/openfold_build" \
        "$PY" -m pip install -q --no-cache-dir --no-build-isolation openfold==0.0.1
fi
step "compile the C++ CPU Adam kernel" "$PY" -m loom_kernels.cpu_adam
touch "$STAMP"
echo "setup complete in $(( $(date +%s) - setup_start )) s: $ROOT/$VENV"
