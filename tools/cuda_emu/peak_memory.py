"""Peak training memory per block, offline: eager PyTorch's against the CUDA kernels' plan
(the CUDA backward issue's target: the fused block's peak at most 30% of eager's).

What `msfused bench --device cuda` reports as "peak MB" for forward+backward is the memory
one call allocates beyond what was allocated before it (torch.cuda.max_memory_allocated).
Without a GPU:
  - eager: the same call on the CPU under a TorchDispatchMode that adds up the storages each
    op returns while they are alive (the CUDA caching allocator rounds blocks up, a few
    percent at these sizes; measured against the H200 run's eager paper-u1 peak: 66.2 MB
    both);
  - the kernels: what they allocate, from the plan (tools/cuda_emu): y (and the saved
    pre-activation for silu), the backward's workspace (batch-slice scratch and partials,
    csrc/cuda/backward_mma.h), dx and the weight gradients.

    python tools/cuda_emu/peak_memory.py [--dtype bfloat16] [--shapes mnet-56,...] [--batch N]
"""
import argparse
import dataclasses
import os
import sys
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import run_emu  # noqa: E402

import msfused  # noqa: E402
from msfused import activations  # noqa: E402
from msfused.benchmark import SHAPES  # noqa: E402
from msfused.config import act_code, merge_code, needs_projection, out_channels  # noqa: E402


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages that ops create, while they are alive, and their peak."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key, n = st.data_ptr(), st.nbytes()
            if n == 0 or key in self.seen:  # a view, or an op returning its input
                continue
            self.seen.add(key)
            self.live += n
            self.peak = max(self.peak, self.live)
            weakref.finalize(st, self._free, key, n)
        return out

    def _free(self, key, n):
        self.live -= n
        self.seen.discard(key)


def eager_peak(shape, dtype, act="relu"):
    """Peak bytes of one eager forward+backward (the reference backend, channels_last),
    beyond x, dy and the weights (allocated before the call, as in the harness)."""
    torch.manual_seed(0)
    blk = msfused.MultiScaleSeparableBlock(shape.c, shape.n, merge=shape.merge,
                                           stride=shape.stride, activation=act,
                                           backend="reference", dtype=dtype)
    x = torch.randn(shape.batch, shape.c, shape.h, shape.w, dtype=dtype).contiguous(
        memory_format=torch.channels_last).requires_grad_()
    params = [x] + list(blk.parameters())
    with torch.no_grad():
        gy = torch.randn_like(blk(x))
    mode = LiveBytes()
    with mode:
        y = blk(x)
        grads = torch.autograd.grad(y, params, gy)
        del y, grads
    return mode.peak


def kernel_peak(lib, shape, dtype, act="relu"):
    """(bytes, plan) the CUDA kernels allocate in one forward+backward at this shape: y, the
    saved pre-activation where the activation needs it, the backward's workspace, dx and
    the weight gradients."""
    esz = torch.empty((), dtype=dtype).element_size()
    cout = out_channels(shape.n, merge_code(shape.merge))
    ho, wo = (shape.h - 1) // shape.stride + 1, (shape.w - 1) // shape.stride + 1
    case = ((shape.c, shape.n, shape.h, shape.w, shape.batch), shape.merge, shape.stride, True,
            True, act)
    plan = run_emu.backward_plan(lib, case, esz)
    y = shape.batch * cout * ho * wo * esz
    pre = y if activations.TABLE[act_code(act)].saves == "preact" else 0
    dx = shape.batch * shape.c * shape.h * shape.w * esz
    proj = needs_projection(shape.c, cout, shape.stride)
    weights = (3 * 10 * shape.c + 2 * shape.n * (shape.c + 1)
               + (cout * (shape.c + 1) if proj else 0)) * esz
    return y + pre + plan["workspace"] + dx + weights, plan


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--shapes", default="")
    ap.add_argument("--batch", type=int, default=0, help="instead of each shape's batch")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    lib = run_emu.build()
    names = set(args.shapes.split(",")) if args.shapes else None
    budget = os.environ.get("MSFUSED_CUDA_BWD_SCRATCH_KB")
    default = "L2 / 4 (15 MiB of the emulated 60), slices of a wave of CTAs at least"
    print(f"{args.dtype}, relu, channels_last; scratch budget "
          f"{budget + ' KiB' if budget is not None else default}")
    print(f"{'shape':9} {'eager MiB':>9} {'kernels MiB':>11} {'ratio':>6} {'workspace':>9} "
          f"{'slices':>9}")
    for group in SHAPES.values():
        for s in group:
            if names and s.name not in names:
                continue
            if args.batch:
                s = dataclasses.replace(s, batch=args.batch)
            e = eager_peak(s, dtype)
            k, plan = kernel_peak(lib, s, dtype)
            print(f"{s.name:9} {e / 2**20:9.1f} {k / 2**20:11.1f} {k / e:6.2f} "
                  f"{plan['workspace'] / 2**20:9.1f} {plan['nslices']:3d} x {plan['slice_imgs']:3d}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
