"""Runs the CUDA kernels of csrc/cuda on the CPU through emu.h (g++, one std::thread per CUDA
thread) and compares forward and backward with msfused.block_reference. No GPU needed;
checks index math, halos, masking, strides, layouts and the reductions (float32/float64).

    python tools/cuda_emu/run_emu.py [--quick]
"""
import ctypes
import itertools
import os
import subprocess
import sys

import torch

import msfused
from msfused.config import BlockConfig, act_code, merge_code, needs_projection, out_channels

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LIB = os.path.join(os.environ.get("TMPDIR", "/tmp"), "libmsfused_cuda_emu.so")


def build():
    src = [os.path.join(ROOT, "csrc/cuda/block_forward.cu"),
           os.path.join(ROOT, "csrc/cuda/block_backward.cu"), os.path.join(HERE, "driver.cpp")]
    cmd = ["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-DMSFUSED_CUDA_EMU",
           "-Wno-unknown-pragmas", "-include", os.path.join(HERE, "emu.h"),
           "-I" + os.path.join(ROOT, "csrc"), "-I" + os.path.join(ROOT, "csrc/cuda"),
           "-x", "c++", *src, "-o", LIB]
    subprocess.run(cmd, check=True)
    return ctypes.CDLL(LIB)


def ptr(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def run(lib, c, n, h, w, merge, stride, act, residual, bias, dtype, cl, batch):
    torch.manual_seed(c * 1000 + n * 10 + h + w)
    m = msfused.MultiScaleSeparableBlock(c, n, merge=merge, stride=stride, activation=act,
                                         residual=residual, bias=bias, backend="reference",
                                         dtype=torch.float64)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    m = m.to(dtype)
    params = [t.detach().contiguous() if t is not None else None for t in m.params()]
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(batch, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
    cfg = BlockConfig(stride=stride, merge=merge_code(merge), act=act_code(act), residual=residual)
    cout = out_channels(n, cfg.merge)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    proj = residual and needs_projection(c, cout, stride)
    chl = cl and c > 1
    x = x.contiguous(memory_format=torch.channels_last if chl else torch.contiguous_format)
    desc = (ctypes.c_int64 * 14)(batch, c, h, w, n, cout, ho, wo, stride, cfg.merge, cfg.act,
                                 int(residual), int(proj), int(chl))
    ofmt = torch.channels_last if chl else torch.contiguous_format
    y = torch.full((batch, cout, ho, wo), float("nan"), dtype=dtype).contiguous(memory_format=ofmt)
    pre = torch.full_like(y, float("nan"))
    ptrs = (ctypes.c_void_p * 13)(ptr(x), *[ptr(t) for t in params])
    es = x.element_size()
    assert lib.emu_forward(es, desc, ptrs, ptr(y), ptr(pre)) == 0
    # reference
    x64 = x.double().requires_grad_(True)
    p64 = [t.double().requires_grad_(True) if t is not None else None for t in params]
    y64 = msfused.block_reference(x64, msfused.BlockParams(*p64), cfg)
    gy = torch.randn(y64.shape, dtype=dtype).contiguous(memory_format=ofmt)
    y64.backward(gy.double())
    # backward
    saved = {0: None, 3: pre}.get(cfg.act, y)
    lib.emu_ws.restype = ctypes.c_size_t
    wsb = lib.emu_ws(desc, es)
    ws = torch.full((wsb // 4 + 1,), float("nan"), dtype=torch.float32)
    dx = torch.full_like(x, float("nan"))
    gr = [dx] + [torch.full(t.shape, float("nan"), dtype=dtype) if t is not None else None
                 for t in params]
    # bias grads are always produced by the kernels; projection grads only with one
    for i, t in enumerate(params):
        if t is None and (i < 10 or (i == 11 and proj)):  # like alloc_grads
            gr[i + 1] = torch.full((c if i < 6 else (n if i < 10 else cout),), float("nan"),
                                   dtype=dtype)
    gptrs = (ctypes.c_void_p * 13)(*[ptr(t) for t in gr])
    assert lib.emu_backward(es, desc, ptrs, ptr(gy), ptr(saved), gptrs, ptr(ws)) == 0
    ref = [x64.grad] + [t.grad if t is not None else None for t in p64]
    errs = {"y": rel(y, y64)}
    names = ["dx", "wa", "ba", "wb", "bb", "wc", "bc", "pa", "qa", "pb", "qb", "ws", "bs"]
    for name, g, r in zip(names, gr, ref):
        if r is not None:
            errs[name] = rel(g, r)
    return errs


def rel(a, b):
    a, b = a.double(), b.double().detach()
    if torch.isnan(a).any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main():
    quick = "--quick" in sys.argv
    lib = build()
    shapes = [(5, 3, 7, 9, 2), (1, 1, 1, 1, 3), (20, 70, 11, 10, 1), (3, 2, 17, 18, 1),
              (4, 2, 2, 33, 1)]
    if quick:
        shapes = shapes[:2]
    fails = 0
    acts = itertools.cycle(["relu", "silu", "relu6", "none"])
    cases = list(itertools.product(shapes, ("concat", "add"), (1, 2), (True, False), (False, True)))
    cases += [((8, 8, 9, 6, 2), "add", 1, True, False), ((8, 8, 9, 6, 2), "add", 1, True, True),
              ((4, 4, 5, 5, 1), "add", 1, True, False),
              # enough pixels for several splits of the weight-gradient reduction (S > 1)
              ((3, 2, 25, 24, 2), "concat", 1, True, True), ((3, 3, 25, 24, 2), "add", 2, True, False)]
    for (c, n, h, w, batch), merge, stride, residual, cl in cases:
        act = next(acts)
        for dtype in (torch.float64,):
            bias = (c + h) % 2 == 0 or merge == "add"
            errs = run(lib, c, n, h, w, merge, stride, act, residual, bias, dtype, cl, batch)
            worst = max(errs, key=errs.get)
            ok = errs[worst] < 1e-9
            fails += not ok
            print(f"{'ok  ' if ok else 'FAIL'} C{c} N{n} {h}x{w} B{batch} {merge} s{stride} {act} "
                  f"{'res' if residual else 'nores'} {'nhwc' if cl else 'nchw'} bias={bias}: "
                  f"worst {worst} {errs[worst]:.2e}" + ("" if ok else f"  {errs}"), flush=True)
    print(f"{fails} failure(s) of {len(cases)}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
