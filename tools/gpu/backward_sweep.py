"""GPU time of the CUDA backend's bfloat16 channels_last forward+backward at the benchmark
shapes whose backward runs in batch slices by default (csrc/cuda/backward_mma.h: the scratch
between launches 1 and 2 over a quarter of L2), for several scratch budgets, against eager's:
do the slices' extra launches cost more than the scratch they keep in L2 saves?

    python tools/gpu/backward_sweep.py            # every budget, one subprocess each
    python tools/gpu/backward_sweep.py --one      # this process's setting only

Budgets set MSFUSED_CUDA_BWD_SCRATCH_KB (read once per process, hence the subprocesses):
the default (L2 / 4 in slices of at least a wave of CTAs: one slice at these batches), then
L2 / 8, L2 / 4 and L2 / 2 set explicitly (kept whatever the wave: more, smaller slices).
One line per (budget, shape): GPU ms of the fused forward+backward (cold L2), of eager's
(best of NCHW and channels_last), their ratio, and the fused call's peak memory beyond what
was allocated before it (the harness's "peak MB").
"""
import os
import subprocess
import sys

import torch

import msfused
from msfused.benchmark import SHAPES, gpu_time_fn

SHAPE_NAMES = ("mnet-56", "mnet-28", "paper-u2")


def budgets():
    l2_kb = torch.cuda.get_device_properties(0).L2_cache_size // 1024
    return [None, str(l2_kb // 8), str(l2_kb // 4), str(l2_kb // 2)]


def one():
    name = os.environ.get("MSFUSED_CUDA_BWD_SCRATCH_KB")
    name = f"scratch {name} KiB" if name is not None else "default"
    shapes = {s.name: s for g in SHAPES.values() for s in g}
    for sname in SHAPE_NAMES:
        s = shapes[sname]
        m = msfused.MultiScaleSeparableBlock(s.c, s.n, merge=s.merge, stride=s.stride,
                                             backend="cuda", device="cuda", dtype=torch.bfloat16)
        ref = msfused.MultiScaleSeparableBlock(s.c, s.n, merge=s.merge, stride=s.stride,
                                               backend="reference", device="cuda",
                                               dtype=torch.bfloat16)
        ref.load_state_dict(m.state_dict())
        x = torch.randn(s.batch, s.c, s.h, s.w, device="cuda", dtype=torch.bfloat16)
        xcl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        x = x.requires_grad_()
        gy = torch.randn_like(m(xcl)).contiguous(memory_format=torch.channels_last)

        def step(mod, inp):
            return lambda: torch.autograd.grad(mod(inp), [inp] + list(mod.parameters()), gy)

        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(m, xcl)()
        torch.cuda.synchronize()
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
        fused = gpu_time_fn(step(m, xcl), min_time=0.1)
        eager = min(gpu_time_fn(step(ref, x), min_time=0.1),
                    gpu_time_fn(step(ref, xcl), min_time=0.1))
        print(f"{name:20} {s.name:9} fused {fused * 1e3:8.4f} ms  eager {eager * 1e3:8.4f} ms  "
              f"eager/fused {eager / fused:6.2f}x  fused peak {peak:7.1f} MiB", flush=True)


def main():
    if "--one" in sys.argv:
        one()
        return 0
    rc = 0
    for b in budgets():
        env = dict(os.environ)
        env.pop("MSFUSED_CUDA_BWD_SCRATCH_KB", None)
        if b is not None:
            env["MSFUSED_CUDA_BWD_SCRATCH_KB"] = b
        rc |= subprocess.run([sys.executable, __file__, "--one"], env=env).returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
