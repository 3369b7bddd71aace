#!/usr/bin/env bash
# GPU validation in one call of the device tool (one command of at most 10 minutes; 15 minutes of
# device time in all, the machine's 1-3 minute start included: so ONE real attempt, with room for
# a short rerun of a step). From the repository root:
#
#     bash scripts/gpu_validate.sh                  # on the GPU machine (device tool: timeout_s=600)
#     bash scripts/gpu_validate.sh --dry-run        # CPU stand-ins (CI): same steps, summary, files
#     GPU_VALIDATE_DRY=1 bash scripts/gpu_validate.sh
#
# Steps, cheapest and most informative first (the number is the step's limit in seconds; every
# limit is also cut to what is left of the total budget; NOTE: untuned = an estimate from counts,
# never timed on the GPU machine):
#   build      200  pip install --no-build-isolation --no-deps -e . : _C for sm_90 only
#                   (TORCH_CUDA_ARCH_LIST=9.0, -lineinfo from CMakeLists.txt, emulation module off),
#                   then checks that every csrc/cuda op has its CUDA C++ kernel. 9 translation units
#                   (3 .cu for one arch, 6 .cpp) compile in parallel (MAX_JOBS=16 cores), so the wall
#                   time is CMake's CUDA configure (~20 s) + the slowest unit: a .cu unit took ~25 s
#                   per arch on the 2-core CPU machines, a torch/extension.h .cpp unit 16-21 s.
#                   Expect 60-120 s; 200 s covers a cold nvcc/ptxas start. NOTE: untuned
#   gpu_tests  100  pytest -m cuda test_cuda_kernels_*.py test_cuda.py under xdist (-n 8), outputs
#                   poisoned (MOLORA_POISON_OUTPUTS=1), every comparison on the GPU. ~400 cases:
#                   ~350 at T=16384 (a few launches + the reference on the GPU, 10-50 ms each) and a
#                   few heavy ones (4 GiB int64-offset router, 2M-token rank_topk, host dispatch
#                   reference up to E=20000: seconds each); worker start (torch + CUDA context)
#                   ~15 s in parallel. Expect 30-60 s. NOTE: untuned
#   bench       75  python -m bench.router_dispatch_gpu with MOLORA_POISON_OUTPUTS=0 (poisoning
#                   adds a NaN fill per output to every timed call: up to ~1.5x slower), alone on
#                   the GPU: 64 rows x 0.2 s of timing = 13 s, + warm-ups, input sets drawn on the
#                   GPU, tie-aware checks, the copy/matmul ceilings (~3 s), imports and the plot.
#                   Expect 35-45 s. NOTE: untuned
#   layer      150  the MoE-LoRA linear alone (python -m bench --preset layer --ops moe_lora, bf16):
#                   T=4096 at the plan's shape (4096 -> 4096, E=8, k=2, r=16, both routings) and
#                   Llama-2-7B's up projection, against the base linear, the per-expert loop,
#                   torch._grouped_mm and the reference; 3 cases x ~12 rows x 3 modes x 0.1 s of
#                   timing = ~35 s + warm-ups, Triton compiles and fp64 checks. Then one forward of
#                   each formulation and of the base linear under ncu (scripts/ncu_layer.py: DRAM
#                   bytes read / written against molora_ops.plan, ~10 kernels x a few replay
#                   passes, torch's start ~15 s). Then the forward rows again as CUDA-graph
#                   replays (--cuda-graph: the device's time without the host's), ~15 s.
#                   Measured 42-62 s on the H200. NOTE: untuned
#   memcheck    90  compute-sanitizer --tool memcheck on scripts/sanitize_kernels.py (~100 calls of
#                   the 13 ops with a CUDA C++ kernel), instrumenting only our kernels (one
#                   --kernel-name kns=<kernel> per __global__ of csrc/kernels: torch's own kernels
#                   run uninstrumented; should the tool refuse repeated filters, the step reruns
#                   at once with the one filter kns=molora), PYTORCH_NO_CUDA_MEMORY_CACHING=1.
#                   Start of torch under the tool 15-30 s + instrumented calls (~100x slower,
#                   small sizes: ms each).
#                   Expect 40-60 s. NOTE: untuned
#   racecheck   75  compute-sanitizer --tool racecheck on sanitize_kernels.py --smem-only: only the
#                   4 kernels that use shared memory (read from the sources) are instrumented, ~30
#                   calls of dispatch / id_histogram / softmax_topp. Same start cost; expect
#                   30-45 s. NOTE: untuned
#   triton     180  pytest -m "cuda or triton" test_cuda_triton.py test_cuda_hot_path.py
#                   test_value_check_kernel.py under xdist (-n 8): 23 + 19 + 8 cases (the hot-path
#                   ones: whole layers, sync-debug "error", CUDA graphs; the one-launch value checks
#                   on CUDA tensors, 2 more small compiles), 124 distinct Triton
#                   compiles (~1-1.5 s each: 130-180 s in one process, ~20-30 s over 8 workers),
#                   fp64 references on the GPU and on-device comparisons (they used to copy ~1.3 G
#                   elements to the host). Expect 60-90 s. NOTE: untuned
# memcheck+racecheck (one lane, 165 s) run beside the triton step (GPU_VALIDATE_PARALLEL=1, the
# default): the sanitizers use 1-2 cores and little of the GPU, the Triton compiles the CPU; the
# bench runs alone before them so its timings are undisturbed.
# Total budget GPU_VALIDATE_BUDGET_S=540 s: the device tool stops a command at 600 s; 540 s leaves
# ~50 s for the last step's kill grace (10 s), packing the logs and the tool's own overhead, so the
# summary is always written by this script. Critical path with every step at its limit:
# 200 + 100 + 75 + 150 + max(165, 180) = 705 s, so the last lanes are cut to what is left;
# expected 60-120 + 30-60 + 35-45 + 70-110 + 60-90 = ~270-430 s.
#
# Output ($OUT, the device tool's folder; /tmp/gpu_validate when unset): at most 8 files come back
# from it, so this script writes exactly
#     summary.txt            one line per step: name, PASS/FAIL/TIMEOUT/SKIPPED, seconds, limit,
#                            the key numbers (pytest counts, sanitizer verdicts, bench summary)
#     logs.tgz               every step's log, junit XML, env.txt, the bench table (rewritten
#                            after each step, so a hard stop still leaves the logs so far), and
#                            crash_bt.log: the native stack of a test that crashed its worker
#     router_dispatch.json   the benchmark's rows          (when the bench ran)
#     router_dispatch.png    GB/s per row vs the copy ceiling (when matplotlib is there)
#     layer.json             the layer step's bench results (its table goes into logs.tgz)
#     layer_ncu.json         the layer's DRAM bytes per formulation against the plan (when ncu ran)
#     layer_graph.json       the layer's forward rows as CUDA-graph replays (its table: logs.tgz)
# summary.txt is rewritten before and after each step: a step that is running shows TIMEOUT
# ("stopped while it ran") and the steps after it SKIPPED ("not reached") until they finish.
# Exit status: 0 when every selected step passed, 1 otherwise (any FAIL, TIMEOUT or a step skipped
# for lack of budget or a failed build).
#
# Nothing needs carrying. The GPU machine's python3 (/opt/torch/.venv, Python 3.12) has every
# package used here: torch 2.11.0+cu130, triton 3.6.0, numpy 2.5, pytest, pytest-xdist,
# pytest-timeout, hypothesis, matplotlib, cmake, ninja, pybind11; nvcc 13.0, compute-sanitizer and
# ncu are in the toolkit. If a package is ever missing there, the one documented way: put its
# wheels in .gpu_carry/wheels/ here (`echo /.gpu_carry/ >> .git/info/exclude`; download with
# `python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp
# --platform manylinux_2_28_x86_64 -d .gpu_carry/wheels NAME==VERSION`) and name ".gpu_carry" in
# the device tool's `carry`; this script installs them with `pip --no-index --target` into a
# scratch folder on PYTHONPATH. A carried build folder does not help: the CPU machines' torch is a
# CPU build for Python 3.11, the GPU machine's a CUDA build for 3.12, so _C is built there (a warm
# machine keeps the ignored build/ folder between calls, so a rerun there only recompiles what
# changed; ccache is used when it is on PATH, with CCACHE_DIR=.gpu_carry/ccache).
#
# Knobs: GPU_VALIDATE_BUDGET_S (540), GPU_VALIDATE_LIMIT_<step> (one step's limit),
# GPU_VALIDATE_STEPS=build,bench (run only these; the others show SKIPPED "not selected"),
# GPU_VALIDATE_PARALLEL=0 (sanitizers and Triton one after another), GPU_VALIDATE_WORKERS (xdist
# workers, 8), PYTHON (the interpreter), CUDA_HOME, NCU (the ncu of the layer step),
# GPU_VALIDATE_SANITIZER (the compute-sanitizer to run; in the dry run a stand-in is then run
# instead of logging the command line). Dry run only:
# GPU_VALIDATE_DRY_CMD_<step> replaces a step's command (tests of the FAIL / TIMEOUT handling).
#
# The dry run runs every step's command on the CPU stand-ins: build = load the built extension and
# the emulation module (no rebuild); tests = the emulated-kernel tests and a Triton-interpreter
# subset, with the GPU test modules collected (they skip without CUDA); sanitizers =
# sanitize_kernels.py --emulate --quick (the compute-sanitizer command line is logged, not run);
# bench = --quick --emulate at T=64. Same summary.txt and $OUT layout as a real run.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

DRY="${GPU_VALIDATE_DRY:-0}"
[ "$DRY" = "0" ] || DRY=1
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^set -uo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_validate: unknown argument $arg (--dry-run, --help)" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-/tmp/gpu_validate}"
mkdir -p "$OUT"
rm -f "$OUT/summary.txt" "$OUT/logs.tgz" "$OUT/router_dispatch.json" "$OUT/router_dispatch.png" \
  "$OUT/layer.json" "$OUT/layer_ncu.json" "$OUT/layer_graph.json"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_validate.XXXXXX")"
LOGS="$WORK/logs"
STATE="$WORK/state"
mkdir -p "$LOGS" "$STATE" "$WORK/bench" "$WORK/layer" "$WORK/layer_graph"
export LOGS STATE WORK

T0=$(date +%s)
BUDGET="${GPU_VALIDATE_BUDGET_S:-540}"
RESERVE=10     # seconds kept for packing the logs after the last step
MIN_STEP=15    # a step with less than this left is SKIPPED (it could not answer anything)
STEPS=(build gpu_tests bench layer memcheck racecheck triton)
declare -A LIMIT=([build]=200 [gpu_tests]=100 [bench]=75 [layer]=150 [memcheck]=90 [racecheck]=75
                  [triton]=180)
for s in "${STEPS[@]}"; do
  v="GPU_VALIDATE_LIMIT_$s"
  [ -n "${!v:-}" ] && LIMIT[$s]="${!v}"
done
SELECTED=",${GPU_VALIDATE_STEPS:-$(IFS=,; echo "${STEPS[*]}")},"
PARALLEL="${GPU_VALIDATE_PARALLEL:-1}"

# --- interpreter, toolkit, packages -----------------------------------------------------------
if [ -n "${PYTHON:-}" ]; then PY="$PYTHON"
elif [ "$DRY" = 1 ] && [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"
else PY="$(command -v python3 || command -v python)"; fi
export PY

if [ "$DRY" = 0 ]; then
  if [ -z "${CUDA_HOME:-}" ]; then
    for c in /usr/local/cuda /usr/local/cuda-13.0; do
      if [ -x "$c/bin/nvcc" ]; then CUDA_HOME="$c"; break; fi
    done
  fi
  export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
  export PATH="$CUDA_HOME/bin:$PATH"
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"   # sm_90 only: one arch to compile
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export MOLORA_BUILD_EMU=0             # the CPU emulation module is for CI only
export PYTHONUNBUFFERED=1
if ! grep -q -- '-lineinfo' CMakeLists.txt 2>/dev/null; then
  # sanitizer reports with source lines need -lineinfo (CMakeLists.txt normally sets it)
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CUDA_FLAGS=-lineinfo"
fi
if command -v ccache >/dev/null 2>&1; then
  export CCACHE_DIR="${CCACHE_DIR:-$ROOT/.gpu_carry/ccache}"
  export CMAKE_ARGS="${CMAKE_ARGS:-} -DCMAKE_CXX_COMPILER_LAUNCHER=ccache -DCMAKE_CUDA_COMPILER_LAUNCHER=ccache"
fi
if compgen -G "$ROOT/.gpu_carry/wheels/*.whl" >/dev/null; then   # see "Nothing needs carrying"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$WORK/site" "$ROOT"/.gpu_carry/wheels/*.whl >"$LOGS/carry.log" 2>&1 \
    && export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
fi
SAN_STANDIN="${GPU_VALIDATE_SANITIZER:-}"
SAN="${SAN_STANDIN:-$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")}"

# one interpreter start for every version and optional package; versions come from the package
# metadata (importing torch costs seconds), CUDA's presence (GPU mode) from torch itself
PYINFO="$(DRY="$DRY" "$PY" - 2>&1 <<'EOF'
import importlib.metadata as md, importlib.util, os, sys
def version(dist, mod):
    if importlib.util.find_spec(mod) is None:
        return "missing"
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "?"
cuda, gpu = "-", "-"
if os.environ.get("DRY") != "1":
    try:
        import torch
        cuda, gpu = torch.version.cuda, torch.cuda.is_available()
    except Exception as exc:  # noqa: BLE001
        gpu = f"torch-unusable:{type(exc).__name__}"
print("torch", sys.version.split()[0], version("torch", "torch"), cuda, gpu)
for dist, mod in (("triton", "triton"), ("numpy", "numpy"), ("pytest-xdist", "xdist"),
                  ("pytest-timeout", "pytest_timeout"), ("matplotlib", "matplotlib"),
                  ("hypothesis", "hypothesis")):
    print("module", mod, version(dist, mod))
EOF
)"
has_module() { grep -q "^module $1 [^m]" <<<"$PYINFO"; }
WORKERS="${GPU_VALIDATE_WORKERS:-8}"
[ "$DRY" = 1 ] && WORKERS=0   # 2-core CI: xdist start-up would cost more than it saves
PYTEST_EXTRA=()
if [ "$WORKERS" -gt 1 ] && has_module xdist; then PYTEST_EXTRA+=(-n "$WORKERS" --dist load); fi
if has_module pytest_timeout; then PYTEST_EXTRA+=(--timeout 150); fi   # one hung case != the step

# --- state and summary ------------------------------------------------------------------------
elapsed() { echo $(( $(date +%s) - T0 )); }

# set_state STEP STATUS SECONDS NOTE: one file per step (atomic), so lanes in the background
# update the summary too
set_state() {
  printf '%s\t%s\t%s\n' "$2" "$3" "$4" > "$STATE/$1.tmp" && mv -f "$STATE/$1.tmp" "$STATE/$1"
  write_summary
}

write_summary() {   # serialised (the sanitizer lane runs beside the triton step)
  if command -v flock >/dev/null 2>&1; then
    ( flock 9; render_summary ) 9>"$STATE/.lock"
  else
    render_summary
  fi
}

render_summary() {
  local tmp="$OUT/.summary.$$.$BASHPID" s status secs note all_pass=1
  {
    echo "# gpu_validate mode=$([ "$DRY" = 1 ] && echo dry-run || echo gpu) budget=${BUDGET}s elapsed=$(elapsed)s $(cat "$WORK/header" 2>/dev/null)"
    printf '%-10s %-8s %5s %5s  %s\n' step status secs limit notes
    for s in "${STEPS[@]}"; do
      IFS=$'\t' read -r status secs note < "$STATE/$s"
      printf '%-10s %-8s %5s %5s  %s\n' "$s" "$status" "$secs" "${LIMIT[$s]}" "$note"
      case "$status" in PASS) ;; SKIPPED) [[ "$note" == "not selected"* ]] || all_pass=0 ;; *) all_pass=0 ;; esac
    done
    echo "# result: $([ "$all_pass" = 1 ] && echo PASS || echo FAIL)"
  } > "$tmp" && mv -f "$tmp" "$OUT/summary.txt"
}

pack_logs() {
  cp -f "$OUT/summary.txt" "$LOGS/summary.txt" 2>/dev/null
  [ -f "$WORK/bench/router_dispatch_table.txt" ] && cp -f "$WORK/bench/router_dispatch_table.txt" "$LOGS/"
  [ -f "$WORK/layer/table.txt" ] && cp -f "$WORK/layer/table.txt" "$LOGS/layer_table.txt"
  [ -f "$WORK/layer/ncu.csv" ] && cp -f "$WORK/layer/ncu.csv" "$LOGS/layer_ncu.csv"
  [ -f "$WORK/layer_graph/table.txt" ] && cp -f "$WORK/layer_graph/table.txt" "$LOGS/layer_graph_table.txt"
  # keep the archive well under the 16 MiB a file may have: huge logs keep their head and tail
  local f
  for f in "$LOGS"/*; do
    if [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt $((4 << 20)) ]; then
      { head -c $((1 << 20)) "$f"; printf '\n[... %s bytes cut ...]\n' "$(stat -c %s "$f")"; tail -c $((2 << 20)) "$f"; } > "$f.cut" && mv -f "$f.cut" "$f"
    fi
  done
  tar -C "$WORK" -czf "$OUT/.logs.tgz.$BASHPID" logs && mv -f "$OUT/.logs.tgz.$BASHPID" "$OUT/logs.tgz"
}

selected() { [[ "$SELECTED" == *",$1,"* ]]; }

copy_bench() {
  local f
  for f in router_dispatch.json router_dispatch.png; do
    [ -f "$WORK/bench/$f" ] && cp -f "$WORK/bench/$f" "$OUT/.$f.tmp" && mv -f "$OUT/.$f.tmp" "$OUT/$f"
  done
  [ -f "$WORK/layer/results.json" ] && cp -f "$WORK/layer/results.json" "$OUT/.layer.tmp" \
    && mv -f "$OUT/.layer.tmp" "$OUT/layer.json"
  [ -f "$WORK/layer/ncu.json" ] && cp -f "$WORK/layer/ncu.json" "$OUT/.layer_ncu.tmp" \
    && mv -f "$OUT/.layer_ncu.tmp" "$OUT/layer_ncu.json"
  [ -f "$WORK/layer_graph/results.json" ] && cp -f "$WORK/layer_graph/results.json" "$OUT/.layer_graph.tmp" \
    && mv -f "$OUT/.layer_graph.tmp" "$OUT/layer_graph.json"
  return 0
}

# note_<kind> LOG: the key numbers of a finished step, from its log
note_pytest() {
  local counts first
  counts="$(grep -aE '[0-9]+ (passed|failed|errors?|skipped|deselected|xfailed)' "$1" | tail -1 | sed -E 's/^=+ //; s/ =+$//')"
  first="$(grep -aE '^(FAILED|ERROR) ' "$1" | head -1 | cut -c1-90)"
  echo "${counts:-no pytest summary (see log)}${first:+; first: $first}"
}
note_sanitizer() {
  local verdict calls none="no sanitizer verdict"
  [ "$DRY" = 1 ] && [ -z "$SAN_STANDIN" ] && none="dry run, no sanitizer"
  verdict="$(grep -aE 'ERROR SUMMARY|RACECHECK SUMMARY' "$1" | tail -1 | sed -E 's/^=+ *//')"
  calls="$(grep -a '^sanitize_kernels: ' "$1" | tail -1 | sed -E 's/^sanitize_kernels: //; s/; skipped.*//')"
  grep -q '^gpu_validate: compute-sanitizer stopped before' "$1" && calls="${calls:+$calls; }one filter kns=molora"
  echo "${verdict:-$none}${calls:+; $calls}"
}
note_bench() { grep -a '^summary: ' "$1" | tail -1 | sed 's/^summary: //' | cut -c1-200; }
note_build() { grep -a '^build: ' "$1" | sed 's/^build: //' | paste -sd';' | cut -c1-240; }
note_layer() { grep -a '^layer: ' "$1" | sed 's/^layer: //' | paste -sd';' | cut -c1-300; }

# run_step STEP NOTE_FN CMD...: CMD under `timeout` within min(limit, what is left of the budget),
# output in $LOGS/STEP.log; PASS / FAIL / TIMEOUT / SKIPPED into the summary
run_step() {
  local name="$1" notefn="$2"; shift 2
  if ! selected "$name"; then set_state "$name" SKIPPED - "not selected (GPU_VALIDATE_STEPS)"; return 0; fi
  local left=$(( BUDGET - RESERVE - $(elapsed) )) limit="${LIMIT[$name]}"
  if [ "$left" -lt "$MIN_STEP" ]; then
    set_state "$name" SKIPPED - "out of budget (${left}s left of ${BUDGET}s)"
    echo "[+$(elapsed)s] $name SKIPPED: out of budget"; return 1
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  local log="$LOGS/$name.log" override="GPU_VALIDATE_DRY_CMD_$name"
  if [ "$DRY" = 1 ] && [ -n "${!override:-}" ]; then set -- bash -c "${!override}"; fi
  set_state "$name" TIMEOUT - "started at +$(elapsed)s with a ${limit}s limit; the run stopped while it ran"
  echo "[+$(elapsed)s] $name: start (limit ${limit}s)"
  { echo "== $name (limit ${limit}s, +$(elapsed)s): $*"; echo; } > "$log"
  local s rc status note
  s=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - s ))
  if [ "$rc" -eq 0 ]; then status=PASS
  elif [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status=TIMEOUT
  else status=FAIL; fi
  note="$($notefn "$log" 2>/dev/null | tr -d '\t' | head -1)"
  [ "$status" = TIMEOUT ] && note="killed at the ${limit}s limit; ${note}"
  [ "$status" = FAIL ] && [ -z "$note" ] && note="exit $rc: $(grep -av '^\s*$' "$log" | tail -1 | cut -c1-120)"
  echo "== exit $rc after ${dt}s" >> "$log"
  set_state "$name" "$status" "$dt" "$note"
  pack_logs
  echo "[+$(elapsed)s] $name $status ${dt}s: $note"
  [ "$status" = PASS ]
}

for s in "${STEPS[@]}"; do
  if selected "$s"; then note="not reached (the run stopped before this step)"
  else note="not selected (GPU_VALIDATE_STEPS)"; fi
  printf 'SKIPPED\t-\t%s\n' "$note" > "$STATE/$s"
done

# --- environment --------------------------------------------------------------------------------
{
  echo "mode: $([ "$DRY" = 1 ] && echo dry-run || echo gpu); host: $(hostname); cores: $(nproc)"
  echo "gpu: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
  echo "python: $PY: $(grep '^torch ' <<<"$PYINFO" | awk '{print $2, "torch", $3, "cuda", $4, "gpu", $5}')"
  echo "packages: $(grep '^module ' <<<"$PYINFO" | awk '{printf "%s=%s ", $2, $3}')"
  echo "nvcc: $(nvcc --version 2>/dev/null | tail -1); compute-sanitizer: $("$SAN" --version 2>/dev/null | tail -1)"
  echo "CUDA_HOME=${CUDA_HOME:-} TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MAX_JOBS=$MAX_JOBS CMAKE_ARGS=${CMAKE_ARGS:-}"
  echo "pytest extra: ${PYTEST_EXTRA[*]:-}; parallel lanes: $PARALLEL; budget ${BUDGET}s"
  echo "git: $(git rev-parse --short HEAD 2>/dev/null) ($(git status --porcelain 2>/dev/null | wc -l) changed files)"
} > "$LOGS/env.txt" 2>&1
cat "$LOGS/env.txt"
echo "git=$(git rev-parse --short HEAD 2>/dev/null || echo -) torch=$(grep '^torch ' <<<"$PYINFO" | cut -d' ' -f3) gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' _ || true)" > "$WORK/header"
write_summary
pack_logs

# --- the steps' commands ----------------------------------------------------------------------
# The GPU command of each step, and (dry run) its CPU stand-in: the same tools, emulated kernels /
# Triton's interpreter / tiny sizes.
GPU_TESTS=(python_tests/test_cuda_kernels_router.py python_tests/test_cuda_kernels_dispatch.py
           python_tests/test_cuda_kernels_masked.py python_tests/test_cuda.py)
PYTEST=("$PY" -m pytest -q -rfE -p no:cacheprovider "${PYTEST_EXTRA[@]}")

check_build() {   # after the build: every csrc/cuda op must have its kernel
  "$PY" - <<'EOF'
import os, sys
sys.path.insert(0, "python_tests")
import torch
import molora_ops
from gpu_compare import cpp_cuda_ops, resolve_cuda_kernel
dry = os.environ.get("GPU_VALIDATE_DRY_RUN") == "1"
ops = cpp_cuda_ops()
if dry:
    from molora_ops._emu import has_emu_kernel, load_emu
    load_emu()
    have = [n for n in ops if has_emu_kernel(n)]
    where = "CPU emulation (molora_emu)"
else:
    have = [n for n in ops if resolve_cuda_kernel(n) is not None]
    where = f"CUDA kernels on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}"
missing = sorted(set(ops) - set(have))
print(f"build: _C loaded ({molora_ops.has_extension()}); {len(have)}/{len(ops)} csrc/cuda ops have "
      f"their {where}" + (f"; MISSING {','.join(missing)}" if missing else ""))
static_cudart = static_cxx = False
if not dry and molora_ops.has_extension():
    # _C must use torch's shared CUDA runtime (CMakeLists.txt: CUDA_RUNTIME_LIBRARY Shared), not
    # carry a private static copy: its cudaLaunchKernel would be a local symbol of _C.
    import re, subprocess
    import molora_ops._C as ext

    def tool(*cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=60).stdout
        except (OSError, subprocess.TimeoutExpired):
            return None
    syms, dyn = tool("nm", ext.__file__), tool("readelf", "-d", ext.__file__)
    static_cudart = bool(syms and re.search(r" [tT] cudaLaunchKernel$", syms, re.M))
    needed = re.findall(r"\[(libcudart[^\]]*)\]", dyn or "")
    print(f"build: CUDA runtime of _C: "
          f"{'a static copy inside _C (FAIL)' if static_cudart else 'no static copy' if syms else 'nm unavailable'}"
          f"; NEEDED {','.join(needed) if needed else 'no libcudart' if dyn is not None else '? (no readelf)'}")
    # Which C++ runtime _C carries: libstdc++'s own (non-template) code defined inside _C means
    # a static copy beside the process's libstdc++.so (a host-mode error message crashed in
    # ostream code that cuda-gdb placed inside _C). Log only: the link line and the symbols.
    # (cmake/SharedLibstdcxx.cmake names the runtime: a module without it fails the build step)
    static_cxx = dyn is not None and "libstdc++.so.6" not in dyn
    demangled = tool("nm", "-C", "--defined-only", ext.__file__) or ""
    own = [l.split(" ", 2)[2] for l in demangled.splitlines()
           if re.search(r" [TtWw] std::(codecvt|locale|basic_ostream|ios_base|num_put)", l)
           and "[clone " not in l]
    print("build: C++ runtime of _C: " + ("a static copy inside _C, NEEDED lacks libstdc++.so.6 "
          "(FAIL)" if static_cxx else "libstdc++.so.6" if dyn is not None else "? (no readelf)"))
    print(f"build-diag: std:: runtime definitions inside _C: {len(own)}"
          + (f" (e.g. {'; '.join(own[:4])})" if own else "")
          + "; NEEDED " + ",".join(re.findall(r"\[(lib[^\]]*)\]", dyn or "")))
    import glob
    for ninja in glob.glob("build/*/build.ninja"):
        lines = open(ninja).read().splitlines()
        for i, l in enumerate(lines):
            if l.startswith("build ") and "_C." in l.split(":")[0] and "LINKER" in l:
                print("build-diag: link " + " ".join(x.strip() for x in lines[i + 1:i + 8]
                                                     if x.strip().startswith("LINK"))[:1500])
sys.exit(0 if molora_ops.has_extension() and not missing and not static_cudart
         and not static_cxx and (dry or torch.cuda.is_available()) else 1)
EOF
}
export -f check_build

layer_summary() {   # "layer: " lines from the layer step's bench results (its step note)
  "$PY" - <<'EOF'
import json, os
res = json.load(open(os.path.join(os.environ["WORK"], "layer", "results.json")))
rows = [r for r in res["rows"] if r["op"] == "moe_lora"]
print(f"layer: {len(rows)} rows, {len([r for r in rows if not r['check'].get('ok')])} failures")
for label in dict.fromkeys(r["label"] for r in rows):
    med = {(r["impl"], r["mode"]): r["time"]["median"] for r in rows if r["label"] == label}
    xb = {(r["impl"], r["mode"]): r.get("x_base") for r in rows if r["label"] == label}
    impl = "native" if ("native", "fwd") in med else next(i for i, _ in med if i not in (
        "reference", "loop", "bmm", "grouped_mm", "base"))
    parts = label.split(" ")
    words = [" ".join(parts[:2] + parts[-1:]), impl]
    for mode in ("fwd", "fwd+bwd"):
        words.append(f"{mode} {xb.get((impl, mode)) or float('nan'):.3f}x base")
    for other in ("loop", "grouped_mm"):
        if (other, "fwd+bwd") in med and (impl, "fwd+bwd") in med:
            words.append(f"fwd+bwd {med[(other, 'fwd+bwd')] / med[(impl, 'fwd+bwd')]:.2f}x vs {other}")
    print("layer: " + ", ".join(words))
EOF
}
export -f layer_summary

graph_summary() {   # "layer: graph ..." lines: forward times as CUDA-graph replays (device time)
  "$PY" - <<'EOF'
import json, os
res = json.load(open(os.path.join(os.environ["WORK"], "layer_graph", "results.json")))
rows = [r for r in res["rows"] if r["op"] == "moe_lora" and r["mode"] == "fwd"]
for label in dict.fromkeys(r["label"] for r in rows):
    case = [r for r in rows if r["label"] == label]
    eager = [r["impl"] for r in case if r.get("timing") != "cuda-graph"]
    parts = label.split(" ")
    words = [f"{r['impl']} {r.get('x_base') or float('nan'):.2f}x" for r in case
             if r["impl"] not in ("reference", "loop", "bmm", "grouped_mm", "base")]
    base = next((r["time"]["median"] * 1e6 for r in case if r["impl"] == "base"), float("nan"))
    print(f"layer: graph {' '.join(parts[:2] + parts[-1:])} fwd base {base:.0f} us, "
          + ", ".join(words) + (f" (eager: {','.join(eager)})" if eager else ""))
EOF
}
export -f graph_summary

layer_step() {   # the layer step: bench rows, then the DRAM bytes under ncu where it is there
  local dir="$WORK/layer"
  if [ "$DRY" = 1 ]; then
    "$PY" -m bench --device cpu --quick --ops moe_lora --no-overhead --no-progress --no-plots \
      --out "$dir" || return 1
    layer_summary
    echo "layer: ncu not run (dry run)"
    "$PY" -m bench --device cpu --quick --ops moe_lora --modes fwd --cuda-graph --no-overhead \
      --no-progress --no-plots --out "$WORK/layer_graph" || return 1
    graph_summary
    return 0
  fi
  # A row that fails its check fails the step, but the other rows and the ncu pass still run:
  # they answer independently (the first H200 run lost its DRAM numbers to one backend's rows).
  local rc=0
  "$PY" -m bench --device cuda --preset layer --ops moe_lora --no-overhead --no-progress \
    --no-plots --out "$dir" || rc=1
  [ -f "$dir/results.json" ] && layer_summary
  local ncu="${NCU:-$(command -v ncu || echo "${CUDA_HOME:-/usr/local/cuda}/bin/ncu")}"
  if [ ! -x "$ncu" ]; then echo "layer: no ncu ($ncu)"; return "$rc"; fi
  # --clock-control none: the card's clocks stay as they are
  if timeout 100 "$ncu" --clock-control none --profile-from-start off --csv --print-units base \
       --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
       --log-file "$dir/ncu.csv" "$PY" scripts/ncu_layer.py --run --order "$dir/ncu.order" \
     && "$PY" scripts/ncu_layer.py --report "$dir/ncu.csv" --order "$dir/ncu.order" \
          --json "$dir/ncu.json" > "$dir/ncu.txt"; then
    cat "$dir/ncu.txt"
    awk '$1 ~ /^(grouped|dense|fused)$/ {printf "layer: ncu %s %.2fx plan %.2fx min\n", $1, $5, $6}' "$dir/ncu.txt"
  else
    echo "layer: ncu FAILED (see layer.log; the rows above stand)"
  fi
  # The forward rows again as CUDA-graph replays: the device's time without the host's launch
  # and dispatch cost, which the eager rows above include (the first H200 run: kernels 148-533 us
  # by ncu against 0.9-1.7 ms by wall clock).
  "$PY" -m bench --device cuda --preset layer --ops moe_lora --modes fwd --cuda-graph \
    --no-overhead --no-progress --no-plots --out "$WORK/layer_graph" || rc=1
  [ -f "$WORK/layer_graph/results.json" ] && graph_summary
  return "$rc"
}
export -f layer_step

if [ "$DRY" = 1 ]; then
  export GPU_VALIDATE_DRY_RUN=1
  BUILD_CMD=(bash -c 'echo "dry run: the GPU build would be: $PY -m pip install --no-build-isolation --no-deps -v -e . (TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST MOLORA_BUILD_EMU=$MOLORA_BUILD_EMU); checking the existing build instead"; check_build')
  GPU_TESTS_CMD=("${PYTEST[@]}" --junitxml="$LOGS/gpu_tests.xml" "${GPU_TESTS[@]}"
                 python_tests/test_cuda_emulated_ops.py -k "softmax_topk or dispatch")
  BENCH_CMD=("$PY" -m bench.router_dispatch_gpu --out "$WORK/bench" --quick --emulate -T 16
             --experts 8 --topk 2 --budget 0.002 --no-ceiling --plot)
  TRITON_CMD=("${PYTEST[@]}" --junitxml="$LOGS/triton.xml" python_tests/test_cuda_triton.py
              python_tests/test_cuda_hot_path.py
              python_tests/test_triton_sgmv.py -k "test_cuda_triton or test_cuda_hot_path or (test_shrink and f32-T1)")
else
  BUILD_CMD=(bash -c '"$PY" -m pip install --no-build-isolation --no-deps -v -e . && check_build')
  GPU_TESTS_CMD=("${PYTEST[@]}" -m cuda --junitxml="$LOGS/gpu_tests.xml" "${GPU_TESTS[@]}")
  BENCH_CMD=("$PY" -m bench.router_dispatch_gpu --out "$WORK/bench" --plot)
  # test_cuda_hot_path.py: whole layers (Triton matmuls + CUDA C++ routing) under
  # set_sync_debug_mode("error") and CUDA-graph capture: with the Triton step, whose JIT it shares.
  # test_value_check_kernel.py: the one-launch value checks on CUDA tensors against the composites.
  TRITON_CMD=("${PYTEST[@]}" -m "cuda or triton" --junitxml="$LOGS/triton.xml"
              python_tests/test_cuda_triton.py python_tests/test_cuda_hot_path.py
              python_tests/test_value_check_kernel.py)
fi

# sanitizer TOOL [ARGS...]: compute-sanitizer, restricted to our kernels, around
# sanitize_kernels.py. One --kernel-name kns=<kernel> per kernel (the filters select their union);
# should this compute-sanitizer refuse repeated filters (it stops before the script prints its
# verdict), it runs once more with the single filter kns=molora (every kernel in namespace molora).
# Dry run: the command line is logged and the calls run in CPU emulation, unless
# GPU_VALIDATE_SANITIZER names a stand-in sanitizer to run (this script's tests).
sanitizer() {
  local tool="$1"; shift
  local app=("$PY" scripts/sanitize_kernels.py) filter rc out t0=$SECONDS
  [ "$DRY" = 1 ] && app+=(--emulate --quick)
  filter="$("$PY" scripts/sanitize_kernels.py --print-filter "$tool")" || return 2
  # --report-api-errors no: torch's own benign CUDA API errors must not fail the step; ours surface
  # as exceptions in sanitize_kernels.py (it synchronises after every call)
  local opts=(--tool "$tool" --error-exitcode 1 --report-api-errors no --print-limit 100)
  if [ "$DRY" = 1 ] && [ -z "$SAN_STANDIN" ]; then
    echo "dry run (no compute-sanitizer; kernels emulated on the CPU): $SAN ${opts[*]} $filter ${app[*]} $*"
    "${app[@]}" "$@"
    return
  fi
  out="$(mktemp)"
  # shellcheck disable=SC2086  # the filter is a list of words by construction
  "$SAN" "${opts[@]}" $filter "${app[@]}" "$@" 2>&1 | tee "$out"
  rc=${PIPESTATUS[0]}
  if [ "$rc" -ne 0 ] && ! grep -q '^sanitize_kernels: ' "$out" && [ $((SECONDS - t0)) -lt 30 ]; then
    echo "gpu_validate: compute-sanitizer stopped before the script ran (exit $rc); again with one filter, --kernel-name kns=molora"
    "$SAN" "${opts[@]}" --kernel-name kns=molora "${app[@]}" "$@"
    rc=$?
  fi
  rm -f "$out"
  return "$rc"
}
export -f sanitizer
export SAN DRY SAN_STANDIN

# crash_backtrace STEP: a test that killed its xdist worker (a signal: no Python exception, and
# faulthandler shows only the Python frames) runs once more, alone, under cuda-gdb (the GPU
# machine has no gdb) for the native stack, into $LOGS/crash_bt.log and a line of the step's note.
# At most one per step, 90 s, and only with 150 s of the budget left. GPU_VALIDATE_GDB names a
# stand-in debugger (this script's tests).
crash_backtrace() {
  local step="$1" log="$LOGS/$1.log" id gdb
  [ -f "$log" ] || return 0
  id="$(grep -aoE "crashed while running '[^']+'" "$log" | head -1 | sed -E "s/^.*running '(.*)'$/\1/")"
  [ -n "$id" ] || return 0
  if [ $(( BUDGET - RESERVE - $(elapsed) )) -lt 150 ]; then
    echo "crash_bt: $step: $id crashed its worker; no budget left for its native stack" | tee -a "$LOGS/crash_bt.log"
    return 0
  fi
  gdb="${GPU_VALIDATE_GDB:-$(command -v cuda-gdb || echo "${CUDA_HOME:-/usr/local/cuda}/bin/cuda-gdb")}"
  echo "[+$(elapsed)s] crash_bt: $step: $id crashed its worker; again alone under $gdb"
  {
    echo "== $step: $id, alone under $gdb"
    timeout --kill-after=10 90 "$gdb" -q -batch -ex "set pagination off" -ex run -ex bt \
      -ex 'info symbol $pc' -ex 'x/6i $pc' -ex 'info registers rip rsp' -ex 'frame 1' \
      -ex 'info symbol $pc' -ex 'x/3i $pc-12' -ex "info sharedlibrary" --args "$PY" -m pytest -q -p no:cacheprovider -p no:xdist "$id"
    echo "== exit $?"
  } >> "$LOGS/crash_bt.log" 2>&1
  # the innermost native frame, for the console (the full stack is in logs.tgz)
  grep -aE '^#0 ' "$LOGS/crash_bt.log" | tail -1 | cut -c1-200 | sed 's/^/crash_bt: /'
  pack_logs
}

# --- run ------------------------------------------------------------------------------------------
if ! run_step build note_build "${BUILD_CMD[@]}"; then
  if selected build; then
    for s in gpu_tests bench layer memcheck racecheck triton; do
      selected "$s" && set_state "$s" SKIPPED - "build did not pass (see build.log)"
    done
    BUILD_FAILED=1
  fi
fi

if [ -z "${BUILD_FAILED:-}" ]; then
  MOLORA_POISON_OUTPUTS=1 run_step gpu_tests note_pytest "${GPU_TESTS_CMD[@]}"
  MOLORA_POISON_OUTPUTS=1 crash_backtrace gpu_tests
  MOLORA_POISON_OUTPUTS=0 run_step bench note_bench "${BENCH_CMD[@]}"
  copy_bench   # now, so a hard stop later still leaves the numbers
  MOLORA_POISON_OUTPUTS=0 run_step layer note_layer bash -c layer_step
  copy_bench
  sanitizer_lane() {
    MOLORA_POISON_OUTPUTS=0 PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_step memcheck note_sanitizer \
      bash -c 'sanitizer memcheck'
    MOLORA_POISON_OUTPUTS=0 run_step racecheck note_sanitizer \
      bash -c 'sanitizer racecheck --smem-only'
  }
  if [ "$PARALLEL" = 1 ]; then
    sanitizer_lane &
    LANE=$!
    MOLORA_POISON_OUTPUTS=1 run_step triton note_pytest "${TRITON_CMD[@]}"
    wait "$LANE"
  else
    sanitizer_lane
    MOLORA_POISON_OUTPUTS=1 run_step triton note_pytest "${TRITON_CMD[@]}"
  fi
  MOLORA_POISON_OUTPUTS=1 crash_backtrace triton
fi

# --- results --------------------------------------------------------------------------------------
write_summary
copy_bench
pack_logs
rm -rf "$WORK"

echo
echo "================ gpu_validate ($([ "$DRY" = 1 ] && echo dry-run || echo gpu)): $(elapsed)s of ${BUDGET}s; in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
if [ -f "$OUT/logs.tgz" ]; then
  tar -xzOf "$OUT/logs.tgz" logs/router_dispatch_table.txt 2>/dev/null && echo
  tar -xzOf "$OUT/logs.tgz" logs/layer.log 2>/dev/null | grep -a -A12 '^ncu_layer: DRAM' && echo
  tar -xzOf "$OUT/logs.tgz" logs/layer.log 2>/dev/null | grep -a '^layer: ' && echo
  tar -xzOf "$OUT/logs.tgz" logs/gpu_tests.log logs/triton.log 2>/dev/null | grep -aE '^(FAILED|ERROR) ' | head -15
  tar -xzOf "$OUT/logs.tgz" logs/crash_bt.log 2>/dev/null | grep -aE '^(== |#[0-9]+ )' | cut -c1-240 | head -14
  tar -xzOf "$OUT/logs.tgz" logs/build.log 2>/dev/null | grep -a '^build-diag: ' | cut -c1-1600
fi
cat "$OUT/summary.txt"
grep -q '^# result: PASS' "$OUT/summary.txt"
