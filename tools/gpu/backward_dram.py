"""DRAM bytes of the CUDA backend's bfloat16 channels_last backward at the benchmark shapes,
per launch, for ncu to measure: are the re-reads the emulator counts (halos, dy and y per
channel block, the 16-bit scratch between launches 1 and 2; benchmarks/NOTES.md entry 17)
L2 hits on the GPU, and how far is the DRAM traffic from the backward floor?

    ncu --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
        --kernel-name regex:"backward" --csv python3 tools/gpu/backward_dram.py

Runs each shape's forward, then one backward (its three launches are the k-th group of
backward kernels in ncu's table for the k-th line printed here), and prints the floor (x,
dy, y read; dx written; weights and gradients once) in MB per shape.
"""
import torch

import msfused
from msfused.benchmark import SHAPES


def main():
    for group in SHAPES.values():
        for s in group:
            m = msfused.MultiScaleSeparableBlock(s.c, s.n, merge=s.merge, stride=s.stride,
                                                 backend="cuda", device="cuda",
                                                 dtype=torch.bfloat16)
            x = torch.randn(s.batch, s.c, s.h, s.w, device="cuda", dtype=torch.bfloat16)
            x = x.contiguous(memory_format=torch.channels_last).requires_grad_(True)
            y = m(x)
            gy = torch.randn_like(y)
            torch.cuda.synchronize()
            w = sum(p.numel() for p in m.parameters()) * 2
            floor = (2 * x.numel() + 2 * y.numel()) * 2 + 2 * w
            print(f"{s.name}: backward floor {floor / 1e6:.1f} MB", flush=True)
            y.backward(gy)
            torch.cuda.synchronize()


if __name__ == "__main__":
    main()
