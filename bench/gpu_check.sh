#!/usr/bin/env bash
# The whole GPU check in one call, for the lent GPU machine (its preinstalled torch and Triton,
# no network, nothing to install): the test suite (CUDA cases included) and the benchmark runner.
#
#   bash bench/gpu_check.sh [OUTDIR]        # from the repository root; OUTDIR defaults to $OUT or bench/results
#
# Leaves gpu-tests.log, gpu-bench.log and the runner's cuda-*.{json,csv,md} + latest-cuda.md in
# OUTDIR: copy them into bench/results/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${1:-${OUT:-bench/results}}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

$PY - <<'PYEOF' | tee "$OUTDIR/gpu-env.txt"
import platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError:
    print("triton not installed")
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA DEVICE")
PYEOF

status=0
echo "== tests ==" 
$PY -m pytest -q -rs tests 2>&1 | tee "$OUTDIR/gpu-tests.log" || status=1
echo "== benchmarks ==" 
$PY -m bench --output "$OUTDIR" 2>&1 | tee "$OUTDIR/gpu-bench.log" || status=1
exit $status
