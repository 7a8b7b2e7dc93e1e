#!/usr/bin/env bash
# Create ./.venv with roberta-ds and its test extras (idempotent; a second run only checks).
#   TORCH_SPEC   the torch requirement (default torch==2.13.0: the CPU build on our CI machines,
#                a CUDA build from PyPI elsewhere; set e.g. TORCH_SPEC='torch==2.7.1' to match a cluster)
#   PYTHON       the interpreter for the venv (default python3, >= 3.10)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
deps="import roberta_ds, deepspeed, transformers, megatron.core, pytest, tensorboard"
if ! .venv/bin/python -c "$deps" 2>/dev/null; then
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
  .venv/bin/python -m pip install -q -e ".[test,mpi]" 2>&1 | grep -v "^WARNING: Location" || true
fi
.venv/bin/python -c "import roberta_ds, deepspeed, torch; print(f'roberta-ds ready: torch {torch.__version__}, deepspeed {deepspeed.__version__}')"
