"""GPU time of the CUDA backend's bfloat16 channels_last forward at the benchmark shapes for
several tiles of the tensor-core kernel, against eager's: is the plan's cost model
(csrc/cuda/forward_mma_plan.h: traffic per CTA times waves, at most two CTAs per SM) right,
or does a larger tile (less halo, one CTA per SM), a smaller one (three CTAs per SM), one
tile per CTA (no rows carried down a column), whole columns per CTA (x read once, few
CTAs), the cheapest plan that reads x at most 1.3 times, or that plan with thread-block
clusters sharing each run of tiles (x read once per cluster, so no SM left idle) win?

    python tools/gpu/forward_sweep.py            # every variant, one subprocess each
    python tools/gpu/forward_sweep.py --one      # this process's settings only

Variants set MSFUSED_CUDA_FWD_TILE (THxTW or THxTWxRUN, used where it fits; RUN: tiles per CTA
down a column, at most the column's), MSFUSED_CUDA_FWD_SMEM (a cap on the shared memory per
CTA), MSFUSED_CUDA_FWD_XMAX (only plans that stage x at most that many times) or
MSFUSED_CUDA_FWD_CLUSTER (clusters of 2 or 4 CTAs where the cost model prefers them); each
is read once per process, hence the subprocesses. One
line per (variant, shape): GPU ms of the fused forward (cold L2), of eager (best of NCHW and
channels_last), the ratio and the fused output's error against eager's.
"""
import os
import subprocess
import sys

import torch

import msfused
from msfused.benchmark import SHAPES, gpu_time_fn

VARIANTS = [
    {},
    # the cheapest plan that stages x at most 1.3 times (the CUDA forward issue's bound):
    # whole columns or images per CTA at paper-u3, mnet-56, mnet-28 and mnet-14; second, so
    # a run cut short by its time limit still has it
    {"MSFUSED_CUDA_FWD_XMAX": "1.3"},
    # the same bound with clusters (benchmarks/NOTES.md entry 61): at least 128 CTAs at
    # every shape where the plan above leaves 68 SMs idle at mnet-28 and mnet-14; then
    # clusters where the cost model alone picks them (paper-u3)
    {"MSFUSED_CUDA_FWD_XMAX": "1.3", "MSFUSED_CUDA_FWD_CLUSTER": "1"},
    {"MSFUSED_CUDA_FWD_CLUSTER": "1"}] + [
    {"MSFUSED_CUDA_FWD_TILE": t}
    for t in ("16x16x1", "8x16x1", "8x8x1", "4x8x1", "8x16", "4x16x99")] + [
    {"MSFUSED_CUDA_FWD_SMEM": str(75 * 1024)}]  # 75 KB: three CTAs per SM


def one():
    name = " ".join(f"{k[len('MSFUSED_CUDA_FWD_'):].lower()}={os.environ[k]}"
                    for k in ("MSFUSED_CUDA_FWD_TILE", "MSFUSED_CUDA_FWD_SMEM",
                              "MSFUSED_CUDA_FWD_XMAX", "MSFUSED_CUDA_FWD_CLUSTER")
                    if os.environ.get(k)) or "plan"
    torch.backends.cudnn.benchmark = True
    for group in SHAPES.values():
        for s in group:
            m = msfused.MultiScaleSeparableBlock(s.c, s.n, merge=s.merge, stride=s.stride,
                                                 backend="cuda", device="cuda",
                                                 dtype=torch.bfloat16)
            ref = msfused.MultiScaleSeparableBlock(s.c, s.n, merge=s.merge, stride=s.stride,
                                                   backend="reference", device="cuda",
                                                   dtype=torch.bfloat16)
            ref.load_state_dict(m.state_dict())
            x = torch.randn(s.batch, s.c, s.h, s.w, device="cuda", dtype=torch.bfloat16)
            xcl = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                err = (m(xcl).float() - ref(xcl).float()).norm() / ref(xcl).float().norm()
                fused = gpu_time_fn(lambda: m(xcl), min_time=0.1)
                eager = min(gpu_time_fn(lambda: ref(x), min_time=0.1),
                            gpu_time_fn(lambda: ref(xcl), min_time=0.1))
            print(f"{name:16} {s.name:9} fused {fused * 1e3:8.4f} ms  "
                  f"eager {eager * 1e3:8.4f} ms  eager/fused {eager / fused:6.2f}x  "
                  f"rel.err {err.item():.1e}", flush=True)


def main():
    if "--one" in sys.argv:
        one()
        return 0
    rc = 0
    for variant in VARIANTS:
        env = dict(os.environ, **variant)
        rc |= subprocess.run([sys.executable, __file__, "--one"], env=env).returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
