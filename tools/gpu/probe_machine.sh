#!/usr/bin/env bash
# Quick facts about the GPU machine's build of msfused (OpenMP runtimes, a C++ exception
# thrown from the extension), for diagnosing crashes seen only there.
set -u
so=$(python3 -c "import msfused._C as m; print(m.__file__)")
echo "== $so"; ldd "$so" | grep -Ei "gomp|omp|stdc|torch_cpu" 
python3 -c "import torch, os; d=os.path.dirname(torch.__file__)+'/lib'; print(sorted(f for f in os.listdir(d) if 'omp' in f))"
gcc --version | head -1
for env in "" "OMP_NUM_THREADS=1"; do
  echo "== exception from the CPU op ($env)"
  env $env python3 -X faulthandler -c "
import torch, msfused
from msfused.params import BlockParams
m = msfused.MultiScaleSeparableBlock(4, 3)
x = torch.randn(2, 4, 6, 5)
try:
    torch.ops.msfused.block_forward(x, *m.params(), 3, 0, 1, True, False)
except ValueError as e:
    print('ValueError ok:', str(e)[:80])
" 2>&1 | tail -5
done

# Where does the exception crash? (benchmarks/NOTES.md "C++ argument errors that crash")
call_bad='import torch, msfused
dev = "cuda" if torch.cuda.is_available() and "cuda" in __import__("sys").argv else "cpu"
m = msfused.MultiScaleSeparableBlock(4, 3, device=dev)
x = torch.randn(2, 4, 6, 5, device=dev)
try:
    torch.ops.msfused.block_forward(x, *m.params(), 3, 0, 1, True, False)
except ValueError as e:
    print(dev, "ValueError ok:", str(e)[:60])'
echo "== torch's own C++ error through torch.ops (no msfused frames): a crash here too => environment"
python3 -X faulthandler -c "
import torch
try:
    torch.ops.aten.view(torch.zeros(2), [3])
except RuntimeError as e:
    print('aten RuntimeError ok:', str(e)[:60])" 2>&1 | tail -3
for dev in cpu cuda; do
  for env in "" "TORCH_SHOW_CPP_STACKTRACES=1"; do
    echo "== msfused error, $dev tensors ($env)"
    env $env python3 -X faulthandler -c "$call_bad" $dev 2>&1 | tail -4
  done
done
echo "== which libraries the unwinder symbols bind to (two unwinders => crashes on throw)"
LD_DEBUG=bindings python3 -c "import torch, msfused._C" 2>&1 \
  | grep -E "symbol .(_Unwind_RaiseException|_Unwind_Backtrace|_Unwind_Find_FDE)'" \
  | sed -E "s/.* to ([^ ]+) .*symbol .([A-Za-z_]+)'.*/\\2 -> \\1/" | sort | uniq -c | head -8
echo "== unwind tables of _C (an EH_FRAME program header must be there)"
readelf -lW "$so" | grep -E "GNU_EH_FRAME" || echo "NO GNU_EH_FRAME header"
if command -v gdb >/dev/null; then
  echo "== native stack of the crash (gdb)"
  timeout 120 gdb -q -batch -ex run -ex bt -ex "info sharedlibrary" --args python3 -c "$call_bad" cuda 2>&1 \
    | grep -E "^#|signal|From|0x0000" | head -60
fi
