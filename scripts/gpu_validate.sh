#!/usr/bin/env bash
# The one command of a GPU session (device tool), from the repository root:
#     bash scripts/gpu_validate.sh            (logs + JSON under $OUT, or /tmp/gpu_validate)
# Steps, each under `timeout` within a total budget (GPU_VALIDATE_BUDGET_S, default 580 s, so the
# whole call fits the device tool's 10-minute command limit):
#   1. build the extension in place for sm_90 (pip install --no-build-isolation --no-deps -e .;
#      ../shared/docs/BUILD_NOTES.md "GPU machine"), CPU-emulation module off  [budget 270 s]
#   2. GPU tests: pytest -m cuda python_tests/test_cuda*.py (not the emulated ones), outputs
#      poisoned (MOLORA_POISON_OUTPUTS=1)                                          [120 s]
#   3. compute-sanitizer --tool memcheck   on scripts/sanitize_kernels.py          [ 75 s]
#   4. compute-sanitizer --tool racecheck  on scripts/sanitize_kernels.py          [ 50 s]
#   5. benchmark: python -m bench.router_dispatch_gpu                              [ 60 s]
#   6. the Triton GPU tests (python_tests/test_cuda_triton.py), in what is left    [<=120 s]
# A step that would not fit in what is left of the budget is skipped (reported). If the build
# fails, the rest is skipped. The summary table (and the benchmark's table) are printed last.
# Exit status: 0 if every step that ran passed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

OUT="${OUT:-/tmp/gpu_validate}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"   # the GPU machine's python has torch (no venv there)
if ! "$PY" -c 'import torch' 2>/dev/null; then PY=python3; fi

if [ -z "${CUDA_HOME:-}" ]; then
  for c in /usr/local/cuda /usr/local/cuda-13.0; do
    if [ -x "$c/bin/nvcc" ]; then CUDA_HOME="$c"; break; fi
  done
fi
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
export PATH="$CUDA_HOME/bin:$PATH"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export MOLORA_BUILD_EMU="${MOLORA_BUILD_EMU:-0}"   # the emulation module is for CPU CI only
export MOLORA_POISON_OUTPUTS=1
SAN="$(command -v compute-sanitizer || echo "$CUDA_HOME/bin/compute-sanitizer")"

BUDGET="${GPU_VALIDATE_BUDGET_S:-580}"
T0=$(date +%s)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
FAILED=0

# step NAME LIMIT_S CMD...: runs CMD with its output in $OUT/NAME.log, within min(LIMIT, left).
step() {
  local name="$1" limit="$2"; shift 2
  local left=$(( BUDGET - ($(date +%s) - T0) ))
  if [ "$left" -lt 20 ]; then
    printf '%-10s %-8s %6s  %s\n' "$name" "SKIPPED" "-" "out of time budget" >> "$SUMMARY"
    return 2
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  local s=$(date +%s)
  echo "== $name (limit ${limit}s): $*" | tee "$OUT/$name.log"
  timeout --kill-after=10 "$limit" "$@" >> "$OUT/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - s ))
  local status="ok"
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMEOUT"; FAILED=1
  elif [ "$rc" -ne 0 ]; then status="FAIL($rc)"; FAILED=1; fi
  local note
  note="$(grep -E '(passed|failed|error)[^a-z]*in [0-9.]+s|ERROR SUMMARY|RACECHECK SUMMARY|sanitize_kernels:|^wrote ' "$OUT/$name.log" | tail -2 | tr '\n' ' ' | cut -c1-110)"
  [ -z "$note" ] && note="$(tail -1 "$OUT/$name.log" | cut -c1-110)"
  printf '%-10s %-8s %5ss  %s\n' "$name" "$status" "$dt" "$note" >> "$SUMMARY"
  return "$rc"
}

{
  echo "host: $(hostname); $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)"
  echo "python: $("$PY" -c 'import sys, torch; print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1)"
  echo "CUDA_HOME=$CUDA_HOME TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST nvcc: $("$CUDA_HOME/bin/nvcc" --version 2>/dev/null | tail -1)"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
} > "$OUT/env.txt"
cat "$OUT/env.txt"

if step build 270 "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then
  # the CUDA C++ kernel tests first; the Triton GPU tests (JIT compiles: slow) run last, with
  # whatever budget is left
  TESTS="$(ls python_tests/test_cuda_kernels_*.py 2>/dev/null) $(ls python_tests/test_cuda*.py | grep -v -e emulated -e test_cuda_kernels_ -e test_cuda_triton)"
  step gpu_tests 120 "$PY" -m pytest -m cuda -q -rfEs -p no:cacheprovider \
    --junitxml="$OUT/gpu_tests.xml" $TESTS
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 step memcheck 75 "$SAN" --tool memcheck --error-exitcode 1 \
    --log-file "$OUT/memcheck_sanitizer.txt" "$PY" scripts/sanitize_kernels.py
  step racecheck 50 "$SAN" --tool racecheck --racecheck-report hazard --error-exitcode 1 \
    --log-file "$OUT/racecheck_sanitizer.txt" "$PY" scripts/sanitize_kernels.py
  step bench 60 "$PY" -m bench.router_dispatch_gpu --out "$OUT/bench"
  [ -f python_tests/test_cuda_triton.py ] && step triton 120 "$PY" -m pytest -m cuda -q -rfEs \
    -p no:cacheprovider python_tests/test_cuda_triton.py
else
  for s in gpu_tests memcheck racecheck bench triton; do
    printf '%-10s %-8s %6s  %s\n' "$s" "SKIPPED" "-" "build failed (see build.log)" >> "$SUMMARY"
  done
fi

# the sanitizer verdicts live in their --log-file
for t in memcheck racecheck; do
  f="$OUT/${t}_sanitizer.txt"
  [ -f "$f" ] && grep -hE 'ERROR SUMMARY|RACECHECK SUMMARY' "$f" | sed "s/^/$t: /" >> "$SUMMARY"
done

echo
echo "================ gpu_validate: $(( $(date +%s) - T0 ))s of ${BUDGET}s, logs in $OUT ================"
[ -f "$OUT/bench/router_dispatch_table.txt" ] && cat "$OUT/bench/router_dispatch_table.txt" && echo
grep -hE '^(FAILED|ERROR) ' "$OUT/gpu_tests.log" "$OUT/triton.log" 2>/dev/null | head -15
printf '%-10s %-8s %6s  %s\n' "step" "status" "time" "note"
cat "$SUMMARY"
exit "$FAILED"
