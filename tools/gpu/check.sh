#!/usr/bin/env bash
# One GPU check, end to end, on a machine with PyTorch preinstalled and no network: install,
# the CUDA and Triton tests, the benchmark harness (bfloat16 and float32), compute-sanitizer
# memcheck, racecheck and synccheck over a small forward+backward, ncu's view of what limits
# each tensor-core kernel, random configurations against float64, a sweep of the tensor-core
# forward's tile size, ncu's DRAM bytes of the 16-bit backward, the machine probe (where a
# C++ exception crashes), the backward's batch-slice budgets, float32 without TF32, the
# kernels started early (programmatic dependent launch), the emulator's probes of the PTX
# stand-ins (mma, ldmatrix, cp.async, thread-block clusters) on the hardware, and the
# backward's launch 1 and the forward as clusters.
#
#   bash tools/gpu/check.sh OUTDIR [--fast] [--pack FILE]
#   STAGES="install tests memcheck" bash tools/gpu/check.sh OUTDIR   # a subset
#   BUDGET_S=540 ...          seconds for all stages together (default 540)
#   MSFUSED_COMMIT=<sha> ...  names the commit in the results (the device copy has no .git)
#
# The lent GPU machine runs one command for at most 10 minutes and returns at most 8 files
# from its output folder, so the stages run in order of what a run must not miss, each
# under its own limit clipped to what is left of BUDGET_S (a stage with under 30 s left is
# skipped and says so), and --pack FILE rewrites FILE (a .tar.gz of OUTDIR) and a
# summary.txt beside it after every stage: a run cut off anywhere still returns every log
# written so far in two files. On the device machine:
#   bash tools/gpu/check.sh /tmp/check --pack "$OUT/check.tar.gz"
# The default stages fill the budget before the later ones; a second run on the same warm
# machine (the install kept) picks up the opt-in variants' timings and tests:
#   STAGES="fwd-sweep probes bench-cluster tests-cluster ncu-limits fuzz bench-pdl tests-pdl" \
#     bash tools/gpu/check.sh /tmp/check2 --fast --pack "$OUT/check2.tar.gz"
# The tests stage runs the tests that touch the GPU backends (ids naming cuda or triton,
# not the CPU emulator's); CI runs the rest on every commit. STAGES=tests-all runs all.
# --fast: shorter benchmark timing (it never runs torch.compile inside the budget: compiling
# 12 shape-modes would take minutes; STAGES=bench-compile measures it on its own).
set -u
OUT=${1:?usage: tools/gpu/check.sh OUTDIR [--fast] [--pack FILE]}
shift
FAST="" PACK=""
while [ $# -gt 0 ]; do
  case $1 in
    --fast) FAST=1 ;;
    --pack) PACK=${2:?--pack needs a file}; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$OUT"
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)} MSFUSED_NVCC_THREADS=${MSFUSED_NVCC_THREADS:-4}
BUDGET_S=${BUDGET_S:-540}
declare -A STATUS TIMES

ALL_STAGES="install backends tests bench-bf16 memcheck bench-fp32 racecheck synccheck ncu-limits"
ALL_STAGES+=" fuzz fwd-sweep bwd-dram bwd-dram-warm probe bwd-slices bench-fp32-ieee bench-pdl"
ALL_STAGES+=" tests-pdl probes bench-cluster tests-cluster"
STAGES=${STAGES:-$ALL_STAGES}
KNOWN="$ALL_STAGES tests-all bench-compile"
RAN=""

summary() {  # the per-stage table, the test count, failed test names, the benchmarks' means
  echo "=== summary ($(head -n 2 "$OUT/env.txt" | tail -n 1 | cut -d, -f1)), ${SECONDS}s of ${BUDGET_S}s"
  for s in $RAN; do printf '%-13s %-16s %5ss\n' "$s" "${STATUS[$s]}" "${TIMES[$s]}"; done
  grep -h "passed\|failed" "$OUT"/tests*.log 2>/dev/null | tail -n 1
  grep -hE "(FAILED|ERROR) tests/" "$OUT"/tests*.log 2>/dev/null | sed 's/ - .*//' | sort -u | head -n 40
  grep -h -A8 "geometric mean" "$OUT"/bench-*.log 2>/dev/null
  # the issues' targets, per shape and met or not (tools/gpu/targets.py)
  if [ -f "$OUT/bench-cuda-bf16.json" ]; then
    local files=("$OUT/bench-cuda-bf16.json")
    [ -f "$OUT/bench-cuda-bf16-compile.json" ] && files+=("$OUT/bench-cuda-bf16-compile.json")
    python3 tools/gpu/targets.py "${files[@]}" 2>&1
  fi
  local opt
  for opt in pdl cluster; do  # the opt-in variants, each against eager in its own run
    if [ -f "$OUT/bench-cuda-bf16-$opt.json" ]; then
      echo "--- targets with the $opt variant (bench-$opt)"
      python3 tools/gpu/targets.py "$OUT/bench-cuda-bf16-$opt.json" 2>&1
    fi
  done
}

pack() {  # OUTDIR as one tarball and the summary beside it, each written whole, then moved
  [ -n "$PACK" ] || return 0
  local dir; dir=$(dirname "$PACK")
  mkdir -p "$dir"
  summary >"$dir/summary.txt.tmp" 2>&1
  mv "$dir/summary.txt.tmp" "$dir/summary.txt"
  tar czf "$PACK.tmp" -C "$OUT" . 2>/dev/null && mv "$PACK.tmp" "$PACK"
}

stage() {  # stage NAME LIMIT_S CMD...: CMD under min(LIMIT_S, budget left), logged to OUT/NAME.log
  local name=$1 limit=$2; shift 2
  case " $KNOWN " in *" $name "*) ;; *) echo "check.sh: unknown stage $name" >&2; exit 2 ;; esac
  case " $STAGES " in *" $name "*) ;; *) return 0 ;; esac
  RAN="$RAN $name"
  local left=$((BUDGET_S - SECONDS - 15))  # 15 s kept for the last pack
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 30 ]; then
    STATUS[$name]="SKIPPED (budget)"; TIMES[$name]=0
    echo "=== $name: skipped, ${left}s of the budget left"
    pack
    return 0
  fi
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
  pack
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  echo "commit ${MSFUSED_COMMIT:-$(git log -1 --format='%h %s' 2>/dev/null || echo unknown)}"
} 2>&1 | tee "$OUT/env.txt"

# -v: every test's name and result reach the log as it runs, so a stage cut off by its
# time limit still says which tests passed and failed.
PYTEST=(python3 -m pytest tests -v -p no:cacheprovider -n 8 -o addopts="-ra")
python3 -c "import pytest_timeout" 2>/dev/null && PYTEST+=(--timeout 240)  # one hung test
BENCH=(python3 -m msfused.cli bench --device cuda --shapes paper,mobilenet --no-compile)
[ -n "$FAST" ] && BENCH+=(--min-time 0.1)

stage install 300 python3 -m pip install --no-build-isolation --no-deps -v -e .
stage backends 60 python3 -m msfused.cli backends
stage tests 240 "${PYTEST[@]}" -k "(cuda or triton) and not emu" --junitxml="$OUT/tests.xml"
stage bench-bf16 150 "${BENCH[@]}" --dtype bfloat16 --out "$OUT/bench-cuda-bf16.json"
stage memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 3 \
  python3 tools/gpu/cuda_sanitize.py --small
stage bench-fp32 100 "${BENCH[@]}" --min-time 0.1 --dtype float32 --out "$OUT/bench-cuda-fp32.json"
stage racecheck 150 compute-sanitizer --tool racecheck --error-exitcode 3 \
  python3 tools/gpu/cuda_sanitize.py --small
stage synccheck 120 compute-sanitizer --tool synccheck --error-exitcode 3 \
  python3 tools/gpu/cuda_sanitize.py --small
# what limits each tensor-core kernel at each benchmark shape (bfloat16, channels_last: the
# forward and the backward's three launches), the issues' evidence where a target is missed:
# throughput against the peaks, achieved occupancy, the warps' stall reasons, the memory
# workload; one forward and one backward per shape (backward_dram.py), each kernel replayed.
# --clock-control none on every ncu stage: the device library's METHOD.md says to leave the
# GPU's clocks as they are (ncu would otherwise lock them to base)
stage ncu-limits 150 ncu --clock-control none --section SpeedOfLight --section Occupancy \
  --section LaunchStats --section WarpStateStats --section SchedulerStats \
  --section MemoryWorkloadAnalysis \
  --kernel-name regex:"mma_kernel|dw_backward|backward_reduce" --csv --page details \
  python3 tools/gpu/backward_dram.py
# random configurations (shapes, merges, strides, activations, layouts, dtypes) on the CUDA
# backend against float64, on the hardware: what the suite's fixed cases do not pick
stage fuzz 100 python3 tools/gpu/fuzz_backend.py --device cuda --backend cuda --cases 400 \
  --seconds 75
# the tensor-core forward's tile against two / three CTAs per SM (MSFUSED_CUDA_FWD_SMEM), the
# plans that read x at most 1.3 times, without and with clusters (MSFUSED_CUDA_FWD_CLUSTER)
stage fwd-sweep 120 python3 tools/gpu/forward_sweep.py
# the 16-bit backward's DRAM bytes per launch (ncu) against the emulator's global bytes
stage bwd-dram 120 ncu --clock-control none \
  --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
  --kernel-name regex:"backward" --csv python3 tools/gpu/backward_dram.py
# the same with L2 kept across the kernels (ncu flushes it between kernels by default, which
# writes the dirty scratch back before launch 3 can discard it): the L2 model's warm column
stage bwd-dram-warm 120 ncu --clock-control none --cache-control none \
  --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
  --kernel-name regex:"backward" --csv python3 tools/gpu/backward_dram.py
# where a C++ argument error crashes instead of raising, if it does (benchmarks/NOTES.md:
# "A C++ argument error that segfaults"); last, since it only diagnoses
stage probe 60 bash tools/gpu/probe_machine.sh
# the backward's batch slices (the scratch budget) against one slice, forward+backward
stage bwd-slices 90 python3 tools/gpu/backward_sweep.py
# float32 with TF32 off: the fused kernels' GEMMs on exact FMAs against eager without TF32
stage bench-fp32-ieee 100 "${BENCH[@]}" --min-time 0.1 --dtype float32 --no-tf32 \
  --out "$OUT/bench-cuda-fp32-ieee.json"
# the backward's launches 2 and 3 started early (programmatic dependent launch,
# MSFUSED_CUDA_PDL=1; off by default until timed here): the harness against bench-bf16, its
# GPU time under CUDA graph capture included, then the CUDA tests with it on
stage bench-pdl 120 env MSFUSED_CUDA_PDL=1 "${BENCH[@]}" --min-time 0.1 --backends cuda \
  --dtype bfloat16 --out "$OUT/bench-cuda-bf16-pdl.json"
stage tests-pdl 150 env MSFUSED_CUDA_PDL=1 "${PYTEST[@]}" -k "cuda and not emu" \
  --junitxml="$OUT/tests-pdl.xml"
# the emulator's PTX probes on the hardware, and what a cluster barrier and distributed
# shared memory cost (benchmarks/NOTES.md entry 58)
stage probes 90 bash tools/gpu/ptx_probes.sh "$OUT"
# the backward's launch 1 as clusters sharing gz (MSFUSED_CUDA_BWD_CLUSTER=1; off by default
# until timed here; paper-u3 and mnet-14 among the benchmark shapes): the harness against
# bench-bf16, then the CUDA tests with it and the forward's clusters (MSFUSED_CUDA_FWD_CLUSTER=1,
# timed by fwd-sweep) on
stage bench-cluster 120 env MSFUSED_CUDA_BWD_CLUSTER=1 "${BENCH[@]}" --min-time 0.1 \
  --backends cuda --dtype bfloat16 --out "$OUT/bench-cuda-bf16-cluster.json"
stage tests-cluster 150 env MSFUSED_CUDA_BWD_CLUSTER=1 MSFUSED_CUDA_FWD_CLUSTER=1 \
  "${PYTEST[@]}" -k "cuda and not emu" \
  --junitxml="$OUT/tests-cluster.xml"
# outside the default run: the whole suite, and torch.compile in the harness
stage tests-all 540 "${PYTEST[@]}" --junitxml="$OUT/tests-all.xml"
stage bench-compile 540 python3 -m msfused.cli bench --device cuda --shapes paper,mobilenet \
  --dtype bfloat16 --out "$OUT/bench-cuda-bf16-compile.json"

echo
summary
fail=0
for s in $RAN; do [ "${STATUS[$s]}" = ok ] || fail=1; done
exit $fail
