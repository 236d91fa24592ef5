#!/usr/bin/env bash
# benchmarks/gpu_check.sh — every GPU check of dist_gc in ONE command, sized to finish in
# <= 8 minutes on one H200-class GPU.
#
#   bash benchmarks/gpu_check.sh            # from any directory of a checkout
#
# 1. pytest -q tests/test_gpu.py: CUDA tensors through every adapter at W=1 (plain, DDP,
#    FSDP1, FSDP2, DeepSpeed ZeRO-1/2/3), DDP/FSDP2/ZeRO-2 at W=2 over gloo on the one GPU,
#    the engine with kernel="torch"/"triton", constant kernel launches (3 vs 300 tensors);
#    all against the single-process oracle.
# 2. python benchmarks/run.py --device cuda --preset gpu,many --sections engine,overhead
#    --kernel auto,torch,triton: engine throughput (kernels side by side in the same
#    alternating repetitions, vs the per-tensor loop and a copy), kernel launches per step
#    for the 'many' (1,051 tensors) and 'tiny' sets, and the step overhead of DDP, FSDP2,
#    ZeRO-2, ZeRO-3 (W=1, NCCL). Writes benchmarks/results/gpu.json,
#    benchmarks/results/engine_gpu.png and the "## GPU — <device name>" section of
#    benchmarks/RESULTS.md (the CPU section is kept).
#
# Environment: PYTHON (interpreter, default: python), KERNELS (default auto,torch,triton),
# REPS (benchmark repetitions, default 15), TEST_TIMEOUT / BENCH_TIMEOUT (seconds, default
# 270 / 190, together under 8 minutes: each step is killed past its limit and fails).
# Exit status: 0 everything passed; 1 the tests failed (the benchmark still runs, so a GPU
# session is never wasted, and the script then fails); 2 no CUDA device (or no python);
# anything else: the step that failed (124: it timed out).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
KERNELS="${KERNELS:-auto,torch,triton}"
REPS="${REPS:-15}"
TEST_TIMEOUT="${TEST_TIMEOUT:-270}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-190}"
START=$SECONDS

say() { printf '\n==> [gpu_check %3ss] %s\n' "$((SECONDS - START))" "$*"; }
die() { printf '\ngpu_check: ERROR: %s\n' "$1" >&2; exit "${2:-1}"; }

command -v "$PYTHON" >/dev/null 2>&1 || die "no python interpreter '$PYTHON' (set PYTHON=...)" 2

say "checking for a CUDA device ($PYTHON)"
if ! DEVICE="$("$PYTHON" -c 'import sys, torch
if not torch.cuda.is_available():
    sys.exit(f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda})")
print(torch.cuda.get_device_name())')"; then
    die "no CUDA device: this script needs a GPU machine (the CPU suite is 'pytest -q tests')" 2
fi
"$PYTHON" - <<'EOF'
import inspect, torch
from dist_gc.engine.engine import GCEngine
try:
    import triton
    tv = triton.__version__
except ImportError:
    tv = "not installed"
p = torch.cuda.get_device_properties(0)
print(f"device: {p.name}, {p.total_memory / 2**30:.0f} GiB, {torch.cuda.device_count()} visible; torch {torch.__version__} "
      f"(CUDA {torch.version.cuda}); triton {tv}; GCEngine kernel= option: {'kernel' in inspect.signature(GCEngine).parameters}")
EOF

# Kernel backends the installed engine and environment can run (said loudly when dropped).
if [[ ",$KERNELS," == *",triton,"* ]] && ! "$PYTHON" -c 'import triton' 2>/dev/null; then
    echo "gpu_check: WARNING: triton is not installed: benchmarking without kernel=triton (tests/test_gpu.py skips its triton checks)" >&2
    KERNELS="$(echo ",$KERNELS," | sed 's/,triton,/,/; s/^,//; s/,$//')"
    KERNELS="${KERNELS:-auto}"
fi
if [[ "$KERNELS" != "auto" ]] && ! "$PYTHON" -c 'import inspect, sys; from dist_gc.engine.engine import GCEngine; sys.exit("kernel" not in inspect.signature(GCEngine).parameters)'; then
    echo "gpu_check: WARNING: this dist_gc's GCEngine has no kernel= option: benchmarking kernel=auto only (the kernel tests will FAIL)" >&2
    KERNELS="auto"
fi

TESTS_RC=0
say "[1/2] GPU tests: pytest -q -rs --durations=0 tests/test_gpu.py (limit ${TEST_TIMEOUT}s) on $DEVICE"
timeout --kill-after=10 "$TEST_TIMEOUT" "$PYTHON" -m pytest -q -rs --durations=0 tests/test_gpu.py || TESTS_RC=$?
if [[ $TESTS_RC -ne 0 ]]; then
    echo "gpu_check: ERROR: the GPU tests FAILED (status $TESTS_RC$([[ $TESTS_RC -eq 124 ]] && echo ': timed out')); running the benchmark anyway" >&2
fi

say "[2/2] benchmark: run.py --device cuda --preset gpu,many --sections engine,overhead --kernel $KERNELS --reps $REPS (limit ${BENCH_TIMEOUT}s)"
BENCH_RC=0
timeout --kill-after=10 "$BENCH_TIMEOUT" "$PYTHON" benchmarks/run.py --device cuda --preset gpu,many --sections engine,overhead \
    --kernel "$KERNELS" --reps "$REPS" || BENCH_RC=$?
if [[ $BENCH_RC -ne 0 ]]; then
    die "the benchmark FAILED (status $BENCH_RC$([[ $BENCH_RC -eq 124 ]] && echo ': timed out')); benchmarks/results/gpu.json holds the sections it finished" "$BENCH_RC"
fi

say "outputs"
ls -l benchmarks/results/gpu.json benchmarks/results/engine_gpu.png
grep -n '^## ' benchmarks/RESULTS.md
if [[ $TESTS_RC -ne 0 ]]; then
    die "benchmark done, but the GPU tests FAILED (status $TESTS_RC): see the pytest output above" 1
fi
say "all GPU checks passed on $DEVICE in $((SECONDS - START)) s"
