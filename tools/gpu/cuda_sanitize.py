"""A small forward + backward through the `cuda` backend over every code path, compared with
msfused.block_reference, sized to run under compute-sanitizer:

    compute-sanitizer --tool memcheck  python tools/gpu/cuda_sanitize.py
    compute-sanitizer --tool racecheck python tools/gpu/cuda_sanitize.py

float32 and bfloat16, NCHW and channels_last, both merges, stride 1 and 2, projection and
identity shortcut, each activation at least once; shapes that leave partial tiles, C and N not
multiples of 16 and more than one 64-channel block. Exits 1 on any mismatch, 2 when the
backend cannot run here.

float32: relative (norm-wise) error against float64 at most 1e-4 for y and every gradient.
bfloat16: at most 1.5e-2 for y and every gradient against a float64 reference whose final
relu/relu6 derivative is read off the kernel's own bf16 output, i.e. the information its
backward has. Against plain float64 a kink of the activation makes the error a lottery: where
relu6's pre-activation lies within half an ulp below 6 the bf16 y is 6.0 and the derivative 0
(eager PyTorch in bf16 does the same), and one such element out of ~2000 put 4.3e-2 into
every gradient of the H200 run's add/s2/C20/N70/relu6 case (benchmarks/NOTES.md); relu flips
the same way where a kernel with bf16 intermediates gets the sign of a tiny z wrong. The
plain error and eager PyTorch's (same dtype) are printed for comparison.

    --backend NAME   another backend (e.g. triton with TRITON_INTERPRET=1 on CPU tensors)
"""
import itertools
import sys

import torch

import msfused
from msfused import activations
from msfused.config import BlockConfig, act_code, apply_act, merge_code
from msfused.reference import block_preactivation

TOL = {torch.float32: 1e-4}
EXACT_MASK_TOL = {torch.bfloat16: 1.5e-2}
BACKEND = "cuda"


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def grads_of(x, params):
    return [x.grad] + [t.grad for t in params if t is not None]


def one(c, n, h, w, merge, stride, act, residual, dtype, channels_last, batch=2):
    """(ok, worst error against float64, text)."""
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = msfused.MultiScaleSeparableBlock(c, n, merge=merge, stride=stride, activation=act,
                                         residual=residual, backend=BACKEND, device=dev,
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
    if dev == "cuda":
        torch.cuda.synchronize()
    grads = [x.grad] + [t.grad for t in m.params() if t is not None]

    # reference in float64 from the same (rounded) parameters and input
    p64 = [t.detach().double().requires_grad_(True) if t is not None else None for t in m.params()]
    x64 = x.detach().double().requires_grad_(True)
    cfg = BlockConfig(stride=stride, merge=merge_code(merge), act=act_code(act), residual=residual)
    y64 = msfused.block_reference(x64, msfused.BlockParams(*p64), cfg)
    y64.backward(gy.double())
    ref = grads_of(x64, p64)
    errs = [rel(y, y64)] + [rel(g, r) for g, r in zip(grads, ref)]
    if len(grads) != len(ref):
        return False, max(errs), "gradient count differs"
    if dtype in TOL:
        return max(errs) <= TOL[dtype], max(errs), ""
    # exact mask: relu/relu6 derivative from the kernel's (rounded) output
    xm = x.detach().double().requires_grad_(True)
    pm = [t.detach().double().requires_grad_(True) if t is not None else None for t in m.params()]
    z = block_preactivation(xm, msfused.BlockParams(*pm), cfg)
    yd = y.detach().double()
    if activations.saves(cfg.act) == "output":  # relu, relu6: act' from the saved output
        z.backward(activations.grad_from_saved(cfg.act, gy.double(), yd))
    else:
        apply_act(z, cfg.act).backward(gy.double())
    exact = [rel(y, y64)] + [rel(g, r) for g, r in zip(grads, grads_of(xm, pm))]
    # eager PyTorch in the same dtype
    pe = [t.detach().requires_grad_(True) if t is not None else None for t in m.params()]
    xe = x.detach().requires_grad_(True)
    ye = msfused.block_reference(xe, msfused.BlockParams(*pe), cfg)
    ye.backward(gy)
    eager = [rel(ye, y64)] + [rel(g, r) for g, r in zip(grads_of(xe, pe), ref)]
    ok = max(exact) <= EXACT_MASK_TOL[dtype]
    return ok, max(errs), f"(eager bf16 {max(eager):.2e}; exact-mask {max(exact):.2e})"


TF32_TOL = 3e-3


def one_tf32(c, n, h, w, merge, channels_last, batch=2):
    """(ok, error of y against float64, worst gradient's error against float64 over eager
    PyTorch's in TF32) of one float32 forward and backward with TF32 allowed; activation
    none, so no relu mask that TF32's rounding of y could flip. ok: y within TF32_TOL and
    every gradient at most twice eager's TF32 error (plus a tenth of a TF32 unit)."""
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    m = msfused.MultiScaleSeparableBlock(c, n, merge=merge, activation="none", backend=BACKEND,
                                         device=dev)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, c, h, w, device=dev).contiguous(memory_format=fmt)

    def reference(params, xx, gy):  # eager PyTorch: y and [dx, parameter gradients]
        xx = xx.detach().requires_grad_(True)
        ps = [t.detach().requires_grad_(True) if t is not None else None for t in params]
        y = msfused.block_reference(xx, msfused.BlockParams(*ps), m.config)
        y.backward(gy)
        return y, [xx.grad] + [t.grad for t in ps if t is not None]

    params = m.params()
    xr = x.detach().requires_grad_(True)
    y = m(xr)
    gy = torch.randn_like(y)
    y.backward(gy)
    grads = [xr.grad] + [t.grad for t in params if t is not None]
    y64, g64 = reference([t.double() if t is not None else None for t in params], x.double(),
                         gy.double())
    _, ge = reference(params, x, gy)  # float32 with TF32 allowed
    err = rel(y, y64)
    ratios = [rel(g, r) / (2 * rel(e, r) + 2.0 ** -10 / 10) for g, e, r in zip(grads, ge, g64)]
    return err < TF32_TOL and max(ratios) <= 1, err, max(ratios)


def main():
    global BACKEND
    # float32 means float32 for the comparisons (cuDNN's convolutions in the reference, and
    # the kernels' forward, would otherwise use TF32); the TF32 path is checked on its own
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    if "--backend" in sys.argv:
        BACKEND = sys.argv[sys.argv.index("--backend") + 1]
    st = msfused.available_backends()[BACKEND]
    if not st.available:
        print(f"{BACKEND} backend unavailable: {st.reason}")
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
        ok, err, more = one(c, n, h, w, merge, stride, act, residual, dtype, cl)
        fails += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {str(dtype):15} {'nhwc' if cl else 'nchw'} {merge:6} "
              f"s{stride} C{c} N{n} {h}x{w} {act:5} {'res' if residual else 'nores'}  "
              f"max rel err {err:.2e} {more}", flush=True)
    # float32 forward and backward on TF32 tensor cores (the kernels' path where
    # cudnn.allow_tf32 is on, PyTorch's default; everything above runs with it off)
    torch.backends.cudnn.allow_tf32 = True
    for cl, (c, n, h, w), merge in [(True, (20, 70, 11, 10), "concat"), (False, (5, 3, 7, 9), "add"),
                                    (True, (8, 8, 9, 6), "add")]:
        ok, err, ratio = one_tf32(c, n, h, w, merge, cl)
        fails += not ok
        print(f"{'ok  ' if ok else 'FAIL'} tf32 forward+backward {'nhwc' if cl else 'nchw'} "
              f"{merge} C{c} N{n} {h}x{w} y rel err {err:.2e} (tolerance {TF32_TOL:.0e}), "
              f"worst gradient error / (2 x eager TF32's + floor) {ratio:.2f}", flush=True)
    torch.backends.cudnn.allow_tf32 = False
    # identity shortcut explicitly (add, N == C, stride 1)
    for dtype, cl in itertools.product((torch.float32, torch.bfloat16), (False, True)):
        ok, err, more = one(8, 8, 9, 6, "add", 1, "relu", True, dtype, cl)
        fails += not ok
        print(f"{'ok  ' if ok else 'FAIL'} identity {dtype} {'nhwc' if cl else 'nchw'} "
              f"max rel err {err:.2e} {more}", flush=True)
    print(f"{fails} failure(s)")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
