#!/usr/bin/env bash
# Creates .venv (once) and installs altlora with everything its tests, benchmarks and examples
# need. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
echo "setup: installing requirements.txt (torch, transformers, peft, pytest)"
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
echo "setup: installing altlora (editable)"
.venv/bin/pip install --quiet --disable-pip-version-check --no-deps -e .
.venv/bin/python -c "import torch, altlora; print(f'setup: done (altlora {altlora.__version__}, torch {torch.__version__})')"
