"""A small forward + backward through the `cuda` backend over every code path, compared with
msfused.block_reference, sized to run under compute-sanitizer:

    compute-sanitizer --tool memcheck  python benchmarks/cuda_sanitize.py
    compute-sanitizer --tool racecheck python benchmarks/cuda_sanitize.py

float32 and bfloat16, NCHW and channels_last, both merges, stride 1 and 2, projection and
identity shortcut, each activation at least once; shapes that leave partial tiles, C and N not
multiples of 16 and more than one 64-channel block. Exits 1 on any mismatch, 2 when the
backend cannot run here.
"""
import itertools
import sys

import torch

import msfused
from msfused.config import BlockConfig, act_code, merge_code

TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def one(c, n, h, w, merge, stride, act, residual, dtype, channels_last, batch=2):
    torch.manual_seed(0)
    dev = "cuda"
    m = msfused.MultiScaleSeparableBlock(c, n, merge=merge, stride=stride, activation=act,
                                         residual=residual, backend="cuda", device=dev,
                                         dtype=torch.float32)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    m = m.to(dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, c, h, w, device=dev).to(dtype).contiguous(memory_format=fmt)
    x.requires_grad_(True)
    y = m(x)
    gy = torch.randn_like(y)
    y.backward(gy)
    torch.cuda.synchronize()
    grads = [x.grad] + [t.grad for t in m.params() if t is not None]

    # reference in float64 from the same (rounded) parameters and input
    p64 = [t.detach().double().requires_grad_(True) if t is not None else None for t in m.params()]
    x64 = x.detach().double().requires_grad_(True)
    cfg = BlockConfig(stride=stride, merge=merge_code(merge), act=act_code(act), residual=residual)
    y64 = msfused.block_reference(x64, msfused.BlockParams(*p64), cfg)
    y64.backward(gy.double())
    ref = [x64.grad] + [t.grad for t in p64 if t is not None]
    errs = [rel(y, y64)] + [rel(g, r) for g, r in zip(grads, ref)]
    return max(errs), len(grads) == len(ref)


def main():
    st = msfused.available_backends()["cuda"]
    if not st.available:
        print(f"cuda backend unavailable: {st.reason}")
        return 2
    fails = 0
    shapes = [(5, 3, 7, 9), (20, 70, 11, 10), (1, 1, 1, 1)]
    acts = itertools.cycle(["relu", "silu", "relu6", "none"])
    if "--small" in sys.argv:  # for the sanitizers: every path once, shapes taking turns
        sizes = itertools.cycle(shapes)
        cases = [(dt, cl, m, s, next(sizes), r) for dt, cl, m, s, r in itertools.product(
            (torch.float32, torch.bfloat16), (False, True), ("concat", "add"), (1, 2),
            (True, False)) if r or s == 2]
    else:
        cases = itertools.product((torch.float32, torch.bfloat16), (False, True),
                                  ("concat", "add"), (1, 2), shapes, (True, False))
    for dtype, cl, merge, stride, (c, n, h, w), residual in cases:
        act = next(acts)
        err, same = one(c, n, h, w, merge, stride, act, residual, dtype, cl)
        ok = same and err <= TOL[dtype]
        fails += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {str(dtype):15} {'nhwc' if cl else 'nchw'} {merge:6} "
              f"s{stride} C{c} N{n} {h}x{w} {act:5} {'res' if residual else 'nores'}  "
              f"max rel err {err:.2e}")
    # identity shortcut explicitly (add, N == C, stride 1)
    for dtype, cl in itertools.product((torch.float32, torch.bfloat16), (False, True)):
        err, same = one(8, 8, 9, 6, "add", 1, "relu", True, dtype, cl)
        ok = same and err <= TOL[dtype]
        fails += not ok
        print(f"{'ok  ' if ok else 'FAIL'} identity {dtype} {'nhwc' if cl else 'nchw'} "
              f"max rel err {err:.2e}")
    print(f"{fails} failure(s)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
