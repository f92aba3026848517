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
