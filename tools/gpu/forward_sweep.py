"""GPU time of the CUDA backend's bfloat16 channels_last forward at the benchmark shapes, with
the tensor-core kernel's shared memory capped (MSFUSED_CUDA_FWD_SMEM), against eager's: does a
smaller tile that lets two or three CTAs share an SM beat the largest tile that fits?

    python tools/gpu/forward_sweep.py            # every cap, one subprocess each
    python tools/gpu/forward_sweep.py --one      # this process's cap only (the subprocess)

Prints one line per (cap, shape): GPU ms of the fused forward (cold L2), of eager (best of
NCHW and channels_last) and the ratio. The cap is read once per process, hence subprocesses.
"""
import os
import subprocess
import sys

import torch

import msfused
from msfused.benchmark import SHAPES, gpu_time_fn

# 0: the device's opt-in maximum (one CTA per SM at the benchmark shapes); 113 KB: two CTAs
# per SM of an H100/H200 (228 KB, 1 KB reserved per CTA); 75 KB: three.
CAPS = [0, 113 * 1024, 75 * 1024]


def one():
    cap = os.environ.get("MSFUSED_CUDA_FWD_SMEM", "0")
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
                fused = gpu_time_fn(lambda: m(xcl))
                eager = min(gpu_time_fn(lambda: ref(x)), gpu_time_fn(lambda: ref(xcl)))
            print(f"cap {int(cap) // 1024:4d} KB  {s.name:9} fused {fused * 1e3:8.4f} ms  "
                  f"eager {eager * 1e3:8.4f} ms  eager/fused {eager / fused:6.2f}x  "
                  f"rel.err {err.item():.1e}", flush=True)


def main():
    if "--one" in sys.argv:
        one()
        return 0
    rc = 0
    for cap in CAPS:
        env = dict(os.environ, MSFUSED_CUDA_FWD_SMEM=str(cap))
        rc |= subprocess.run([sys.executable, __file__, "--one"], env=env).returncode
    return rc


if __name__ == "__main__":
    sys.exit(main())
