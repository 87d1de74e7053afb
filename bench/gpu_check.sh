#!/usr/bin/env bash
# The GPU check, for the lent GPU machine: its preinstalled torch and Triton, no network, nothing to
# install (never run ./setup.sh there: it would replace the machine's torch).
#
#   bash bench/gpu_check.sh --quick [OUTDIR]            # ≤ 8 minutes: run this first on a lent GPU
#   bash bench/gpu_check.sh --quick --dry-run [OUTDIR]  # the same parts on the CPU, tiny shapes (~1 min)
#   bash bench/gpu_check.sh [OUTDIR]                    # the whole suite and every benchmark (too long for one lease)
#
# OUTDIR defaults to $OUT, else bench/results. Run from anywhere; PYTHON picks the interpreter.
# GPU_CHECK_PARTS=sweep,linear runs only those parts of --quick; GPU_CHECK_BOX_<part>=SECONDS
# changes a part's time box (e2e-hf: GPU_CHECK_BOX_e2e_hf).
#
# --quick runs these parts, each under its own `timeout` (one hang cannot eat the lease), and then a
# summary (summary.md, quick-parts.tsv); each part leaves quick-<part>.log and <part>.json:
#   env            versions, the device, the first-use self-check of the Triton phase update
#   tests          the CUDA tests only (tests/test_triton_cuda.py, the CUDA cases of the phase-update,
#                  fused-linear and model-change tests); no interpreter test runs (Triton 3.6's
#                  interpreter fails with numpy >= 2.4)
#   sweep          every launch configuration the code can choose against the torch backend / float64
#                  (beside the tests: both mostly build kernels)
#   memcheck       compute-sanitizer memcheck of one small step (skipped when compute-sanitizer is missing)
#   optimizer      the optimizer step at Llama-3-8B adapter shapes (32 × q,k,v,o; r 8 and 64)
#   linear         the fused LoRA linear at 8192 tokens × 4096², bf16
#   e2e            a training step of 2 Llama-shaped blocks built from altlora.LoRALinear
#   e2e-hf         bench/end_to_end.py's comparison at one 8B-wide layer, if transformers and peft are installed
# Copy OUTDIR's summary.md, *.json, sweep.jsonl and logs into bench/results/gpu-quick/ and commit them.
set -uo pipefail
cd "$(dirname "$0")/.."

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }

QUICK=0
DRY=0
OUTDIR=""
for arg in "$@"; do
    case "$arg" in
        --quick) QUICK=1 ;;
        --dry-run) DRY=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; usage >&2; exit 2 ;;
        *) OUTDIR=$arg ;;
    esac
done
if [ "$DRY" = 1 ] && [ "$QUICK" = 0 ]; then
    echo "gpu_check.sh: --dry-run goes with --quick" >&2
    exit 2
fi
OUTDIR=${OUTDIR:-${OUT:-bench/results}}
mkdir -p "$OUTDIR"
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

if [ "$QUICK" = 0 ]; then
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
fi

# ------------------------------------------------------------------------------------ --quick
# Time boxes in seconds, and the Python parts' flags. tests and sweep run side by side (both
# mostly build Triton kernels on the CPU; neither is timed); the rest one after the other. The
# longest path: 25 + 160 + 50 + 45 + 40 + 35 + 45 = 400 s, under 8 minutes with the start-ups.
# A dry run gets looser boxes: a shared CPU is slower than a lent GPU.
if [ "$DRY" = 1 ]; then
    export TRITON_INTERPRET=1
    PART_FLAGS=(--dry-run)
    declare -A BOX=([env]=90 [tests]=120 [sweep]=120 [memcheck]=90 [optimizer]=90 [linear]=90 [e2e]=90 [e2e-hf]=120)
else
    unset TRITON_INTERPRET  # nothing here may run Triton's interpreter (numpy >= 2.4 breaks Triton 3.6's)
    PART_FLAGS=()
    declare -A BOX=([env]=25 [tests]=160 [sweep]=160 [memcheck]=50 [optimizer]=45 [linear]=40 [e2e]=35 [e2e-hf]=45)
    # One Triton cache for every part, outside OUTDIR (whose files are copied back): later parts
    # reuse the kernels the earlier ones built.
    export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/altlora-triton-cache}
fi
for name in "${!BOX[@]}"; do  # GPU_CHECK_BOX_<part> overrides
    override="GPU_CHECK_BOX_${name//-/_}"
    [ -n "${!override:-}" ] && BOX[$name]=${!override}
done
SELECTED=",${GPU_CHECK_PARTS:-env,tests,sweep,memcheck,optimizer,linear,e2e,e2e-hf},"
selected() { [[ "$SELECTED" == *",$1,"* ]]; }
PARTS_TSV="$OUTDIR/quick-parts.tsv"
: > "$PARTS_TSV"
START=$(date +%s)

# timed ROWS NAME COMMAND...: COMMAND under NAME's time box; appends the row "name, exit status
# (124/137: timed out), seconds, time box" to the file ROWS.
timed() {
    local rows=$1 name=$2
    shift 2
    local limit=${BOX[$name]} t0 rc
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@"
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$limit" >> "$rows"
}

say_if_timed_out() {  # say_if_timed_out ROW
    case "$(cut -f2 <<<"$1")" in 124|137) echo "!! $(cut -f1 <<<"$1"): timed out after $(cut -f4 <<<"$1") s" ;; esac
}

# run_part NAME COMMAND...: run under NAME's time box, log to quick-NAME.log, record its row.
run_part() {
    local name=$1
    shift
    selected "$name" || return 0
    echo
    echo "== $name (time box ${BOX[$name]} s, $(( $(date +%s) - START )) s so far) =="
    timed "$PARTS_TSV" "$name" "$@" 2>&1 | tee "$OUTDIR/quick-$name.log"
    say_if_timed_out "$(tail -n 1 "$PARTS_TSV")"
    return 0
}

py_part() {  # py_part NAME: the Python part NAME of bench/gpu_quick.py
    run_part "$1" $PY -m bench.gpu_quick "$1" --out "$OUTDIR" "${PART_FLAGS[@]}"
}

# start_part NAME COMMAND...: run_part in the background, its output only in quick-NAME.log;
# finish_part NAME waits for it, shows the log and records its row.
declare -A BG_PIDS=()
start_part() {
    local name=$1
    shift
    selected "$name" || return 0
    echo
    echo "== $name (time box ${BOX[$name]} s, in the background: quick-$name.log) =="
    rm -f "$OUTDIR/.quick-$name.row"
    timed "$OUTDIR/.quick-$name.row" "$name" "$@" > "$OUTDIR/quick-$name.log" 2>&1 &
    BG_PIDS[$name]=$!
}
finish_part() {
    local name=$1
    selected "$name" || return 0
    wait "${BG_PIDS[$name]}"
    echo
    echo "== $name (ran in the background) =="
    cat "$OUTDIR/quick-$name.log"
    local row
    row=$(cat "$OUTDIR/.quick-$name.row")
    rm -f "$OUTDIR/.quick-$name.row"
    echo "$row" >> "$PARTS_TSV"
    say_if_timed_out "$row"
}

py_part env

start_part sweep $PY -m bench.gpu_quick sweep --out "$OUTDIR" "${PART_FLAGS[@]}"

# The CUDA tests, new cases first; the selection (-k cuda) never reaches an interpreter test. -v:
# a test's line is in the log as soon as it ends, so a time-out still shows how far it got.
if $PY -c "import pytest" 2>/dev/null; then
    run_part tests env ALTLORA_TRITON_SELF_CHECK=0 $PY -m pytest -v -rfEs -p no:cacheprovider -k cuda \
        tests/test_triton_cuda.py tests/test_triton_phase_update.py tests/test_lora_linear.py tests/test_model_changes.py
elif selected tests; then
    echo "== tests: skipped, pytest is not installed =="
    printf 'tests\t3\t0\t0\n' >> "$PARTS_TSV"
fi

finish_part sweep

SANITIZER=$(command -v compute-sanitizer || true)
for candidate in "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" /usr/local/cuda/bin/compute-sanitizer; do
    [ -z "$SANITIZER" ] && [ -x "$candidate" ] && SANITIZER=$candidate
done
if [ -n "$SANITIZER" ] && [ "$DRY" = 0 ]; then
    # Without the caching allocator every tensor is its own allocation, so an access past its end
    # is an error the sanitizer sees instead of a read of the cached block's next tensor.
    run_part memcheck env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 86 \
        --print-limit 20 $PY -m bench.gpu_quick memcheck-step --out "$OUTDIR"
else
    reason="compute-sanitizer is not on PATH (nor in \$CUDA_HOME/bin)"
    [ "$DRY" = 1 ] && reason="dry run"
    run_part memcheck bash -c 'echo "memcheck skipped: $0; the step runs without it"; exec "$@"' "$reason" \
        $PY -m bench.gpu_quick memcheck-step --out "$OUTDIR" "${PART_FLAGS[@]}"
    # Recorded as skipped (3) when the step itself passed: nothing was sanitized.
    last=$(tail -n 1 "$PARTS_TSV")
    if selected memcheck && [ "$(cut -f2 <<<"$last")" = 0 ]; then
        sed -i '$ d' "$PARTS_TSV"
        printf 'memcheck\t3\t%s\t%s\n' "$(cut -f3 <<<"$last")" "$(cut -f4 <<<"$last")" >> "$PARTS_TSV"
    fi
fi

py_part optimizer
py_part linear
py_part e2e
py_part e2e-hf

echo
echo "== summary ($(( $(date +%s) - START )) s) =="
$PY -m bench.gpu_quick summary --out "$OUTDIR" --elapsed "$(( $(date +%s) - START ))" "${PART_FLAGS[@]}"
