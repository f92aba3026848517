"""Per benchmark shape, the CUDA kernels' resources and what they allow per SM, offline: each
launch's kernel instantiation (as the plans pick it), its registers (from the built
extension's SASS, tools/cuda_sass.py), its dynamic shared memory (from the plans, through
the emulator's driver), and the CTAs and warps per SM of an H100/H200 (228 KB of shared
memory and 64 K registers per SM, 1 KB per CTA reserved, at most 64 warps) that both allow,
with the kernel's __launch_bounds__ minimum. The table the CUDA issues ask for beside the
byte counts (benchmarks/NOTES.md).

    python tools/cuda_emu/resources.py [--dtype bfloat16|float32|tf32|float64]
"""
import argparse
import ctypes
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import cuda_sass  # noqa: E402
import run_emu  # noqa: E402

from msfused.benchmark import SHAPES  # noqa: E402

SMEM_SM, REGS_SM, WARPS_SM, THREADS = 228 * 1024, 65536, 64, 256


def per_sm(regs, smem):
    """CTAs of 256 threads per SM that registers (allocated per warp in units of 256; 0:
    unknown, not counted), shared memory and the warp limit allow."""
    warps = THREADS // 32
    by_regs = REGS_SM // ((regs * 32 + 255) // 256 * 256 * warps) if regs else WARPS_SM
    return min(by_regs, SMEM_SM // (smem + 1024), WARPS_SM // warps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "tf32",
                                                           "float64"])
    args = ap.parse_args()
    elem = {"bfloat16": 2, "float32": 4, "tf32": 4, "float64": 8}[args.dtype]
    short = {"bfloat16": "bfloat16", "float32": "float", "tf32": "float",
             "float64": "double"}[args.dtype]
    tc = "false" if args.dtype in ("float32", "float64") else "true"
    lib = run_emu.build()
    tool, so = cuda_sass.cuobjdump(), cuda_sass.shared_object()
    regs = {}
    if tool and so:
        regs = {cuda_sass.demangle_short(k): v["regs"] for k, v in cuda_sass.kernels(so, tool).items()}
    else:
        print("(no cuobjdump or built extension: registers unknown, shown as 0)")
    print(f"{args.dtype}, channels_last, the benchmark's batch; CTAs / warps per SM that "
          "registers and shared memory allow")
    print("| shape | launch | kernel | regs | smem KB | CTAs/SM | warps/SM |")
    print("|---|---|---|---|---|---|---|")
    for group in SHAPES.values():
        for s in group:
            case = ((s.c, s.n, s.h, s.w, s.batch), s.merge, s.stride, True, True, "relu")
            cfg = run_emu.BlockConfig(stride=s.stride, merge=run_emu.merge_code(s.merge),
                                      act=run_emu.act_code("relu"), residual=True)
            desc = run_emu.block_desc(s.batch, s.c, s.h, s.w, s.n, cfg, True)
            fwd = run_emu.forward_plan(lib, case, elem)
            bwd = run_emu.backward_plan(lib, case, elem)
            lib.emu_dw_smem.restype = ctypes.c_int64
            rows = [("forward", f"block_forward_mma_kernel<{short}, {s.stride}, {fwd['TW']}, "
                     f"{tc}>", fwd["smem"]),
                    ("bwd 1", f"block_backward_mma_kernel<{short}, {s.stride}, {tc}>",
                     bwd["smem"]),
                    ("bwd 2", f"dw_backward_kernel<{short}, {s.stride}>",
                     lib.emu_dw_smem(desc, elem))]
            for launch, kernel, smem in rows:
                r = regs.get(kernel, 0)
                n = per_sm(r, smem)
                print(f"| {s.name} | {launch} | `{kernel}` | {r} | {smem / 1024:.1f} | {n} | "
                      f"{n * THREADS // 32} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
