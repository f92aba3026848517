#!/usr/bin/env bash
# One GPU check, end to end, on a machine with PyTorch preinstalled and no network:
# install, the whole test suite on CUDA, compute-sanitizer memcheck, racecheck and synccheck
# over a small forward+backward, a sweep of the tensor-core forward's tile size, ncu's DRAM
# bytes of the 16-bit backward, and the
# benchmark harness (bfloat16 and float32, NCHW and channels_last).
#
#   bash tools/gpu/check.sh OUTDIR [--fast]
#   STAGES="install tests memcheck" bash tools/gpu/check.sh OUTDIR   # a subset
#   MSFUSED_COMMIT=<sha> ...   names the commit in the results (the device copy has no .git)
#
# Logs and results land in OUTDIR; the last lines printed are a summary table. Each stage
# has its own time limit so that one slow stage cannot eat the others' time. --fast runs
# the benchmark without torch.compile and with shorter timing.
set -u
OUT=${1:?usage: tools/gpu/check.sh OUTDIR [--fast]}
FAST=${2:-}
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)} MSFUSED_NVCC_THREADS=${MSFUSED_NVCC_THREADS:-4}
declare -A STATUS TIMES

ALL_STAGES="install backends tests memcheck racecheck synccheck fwd-sweep bwd-dram bench-bf16 bench-fp32"
STAGES=${STAGES:-$ALL_STAGES}

stage() {  # stage NAME LIMIT_S CMD...: runs CMD with a time limit, logs to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$SECONDS
  echo "=== $name (limit ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  TIMES[$name]=$((SECONDS - t0))
  case $rc in
    0) STATUS[$name]=ok ;;
    124|137) STATUS[$name]="TIMEOUT" ;;
    *) STATUS[$name]="FAIL rc=$rc" ;;
  esac
  tail -n 5 "$OUT/$name.log"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  git log -1 --format='commit %h %s' 2>/dev/null; } 2>&1 | tee "$OUT/env.txt"

stage install 300 python3 -m pip install --no-build-isolation --no-deps -v -e .
stage backends 60 python3 -m msfused.cli backends
# -v: every test's name and result reach the log as it runs, so a stage cut off by its
# time limit still says which tests failed.
stage tests ${TESTS_LIMIT:-330} python3 -m pytest tests -v -p no:cacheprovider -n 8 --timeout 240 \
  -o addopts="-ra" --junitxml="$OUT/tests.xml"
stage memcheck 150 compute-sanitizer --tool memcheck --error-exitcode 3 \
  python3 tools/gpu/cuda_sanitize.py --small
stage racecheck 200 compute-sanitizer --tool racecheck --error-exitcode 3 \
  python3 tools/gpu/cuda_sanitize.py --small
stage synccheck 150 compute-sanitizer --tool synccheck --error-exitcode 3 \
  python3 tools/gpu/cuda_sanitize.py --small
# the tensor-core forward's tile against two / three CTAs per SM (MSFUSED_CUDA_FWD_SMEM)
stage fwd-sweep 150 python3 tools/gpu/forward_sweep.py
# the 16-bit backward's DRAM bytes per launch (ncu) against the emulator's global bytes
stage bwd-dram 150 ncu --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
  --kernel-name regex:"backward" --csv python3 tools/gpu/backward_dram.py
BENCH_OPTS=(--device cuda --shapes paper,mobilenet)
[ "$FAST" = --fast ] && BENCH_OPTS+=(--no-compile --min-time 0.1)
stage bench-bf16 300 python3 -m msfused.cli bench "${BENCH_OPTS[@]}" --dtype bfloat16 \
  --out "$OUT/bench-cuda-bf16.json"
stage bench-fp32 200 python3 -m msfused.cli bench "${BENCH_OPTS[@]}" --no-compile --min-time 0.1 \
  --dtype float32 --out "$OUT/bench-cuda-fp32.json"

echo
echo "=== summary ($(head -n 2 "$OUT/env.txt" | tail -n 1 | cut -d, -f1))"
for s in $ALL_STAGES; do
  [ -n "${STATUS[$s]:-}" ] && printf '%-12s %-14s %5ss\n' "$s" "${STATUS[$s]}" "${TIMES[$s]}"
done
grep -h "passed\|failed" "$OUT/tests.log" 2>/dev/null | tail -n 1
grep -hE "(FAILED|ERROR) tests/" "$OUT/tests.log" 2>/dev/null | sed 's/ - .*//' | sort -u | head -n 40
grep -h -A8 "geometric mean" "$OUT"/bench-*.log 2>/dev/null
fail=0
for s in "${!STATUS[@]}"; do [ "${STATUS[$s]}" = ok ] || fail=1; done
exit $fail
