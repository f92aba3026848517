"""Runs the CUDA kernels of csrc/cuda on the CPU through emu.h (g++, one fiber per CUDA
thread) and compares forward and backward with msfused.block_reference. No GPU needed;
checks index math, halos, masking, strides, layouts and the reductions, in float64 and, for
a set of cases, bfloat16 and float16 (emu.h's __half / __nv_bfloat16 stand-ins).

float16/bfloat16 are judged two ways:
  exact-mask: against float64 whose final activation's derivative is read off the tensor the
      kernel saved (y for relu/relu6, the pre-activation for silu), i.e. the information
      the backward really has. What remains is rounding of the stored results (~eps), so
      any indexing / halo / masking bug shows up well above the tolerance.
  policy: the project's rule (README "Tolerances"): error against plain float64 at most 2x
      eager PyTorch's in the same dtype plus eps/10, per tensor.
The plain float64 error is printed too; with relu6 it can be several 1e-2 where the
pre-activation lies within half an ulp below 6 (the stored y rounds to 6.0 and act' = 0).

    python tools/cuda_emu/run_emu.py [--quick]
    python tools/cuda_emu/run_emu.py --forward-low   # one-launch forward, every config
    python tools/cuda_emu/run_emu.py --backward-low  # three-launch backward, every config
        (both in bfloat16, float16, float32 on TF32, float32 on FMAs and float64)
    python tools/cuda_emu/run_emu.py --bytes         # forward's global bytes, benchmark shapes
        (bfloat16; --float32: float32)
    python tools/cuda_emu/run_emu.py --backward-bytes  # the same for the backward (--tf32: float32 on TF32)
    (either with --l2: also the DRAM bytes by the L2 model, tools/cuda_emu/emu_l2.h)
"""
import ctypes
import itertools
import os
import subprocess
import sys

import torch

import msfused
from msfused import activations
from msfused.config import BlockConfig, act_code, merge_code, needs_projection, out_channels
from msfused.layout import memory_format_of
from msfused.reference import block_preactivation

DTYPE_CODE = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
NAMES = ["dx", "wa", "ba", "wb", "bb", "wc", "bc", "pa", "qa", "pb", "qb", "ws", "bs"]
# exact-mask tolerance (relative norm): a few units of the dtype's rounding
EXACT_TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 1.5e-2,
             torch.float16: 2e-3,
             # float32 on TF32 against its rounding model (tf32_preactivation): float32
             # rounding and accumulation order (1e-7..1e-5), and the odd operand that float32
             # rounding put on the other side of a TF32 truncation step, which moves that
             # product by one TF32 unit (seen: 1.1e-4 in a 32-element weight gradient); an
             # indexing bug is O(1)
             "tf32": 2.0 ** -10}

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LIB = os.path.join(os.environ.get("TMPDIR", "/tmp"), "libmsfused_cuda_emu.so")


def build():
    src = [os.path.join(ROOT, "csrc/cuda/block_forward.cu"),
           os.path.join(ROOT, "csrc/cuda/block_forward_mma.cu"),
           os.path.join(ROOT, "csrc/cuda/block_backward.cu"),
           os.path.join(ROOT, "csrc/cuda/block_backward_dw.cu"),
           os.path.join(ROOT, "csrc/cuda/block_backward_mma.cu"), os.path.join(HERE, "driver.cpp")]
    cmd = ["g++", "-std=c++20", "-O1", "-fPIC", "-shared", "-pthread", "-DMSFUSED_CUDA_EMU",
           "-Wno-unknown-pragmas", "-include", os.path.join(HERE, "emu.h"),
           "-I" + os.path.join(ROOT, "csrc"), "-I" + os.path.join(ROOT, "csrc/cuda"),
           "-x", "c++", *src, "-o", LIB]
    subprocess.run(cmd, check=True)
    return ctypes.CDLL(LIB)


ACT_RELU, ACT_RELU6 = act_code("relu"), act_code("relu6")


def dact_from_saved(act, saved):
    """act' as the kernels compute it from what the forward saved (msfused.activations)."""
    if saved is None:
        return 1.0
    return activations.grad_from_saved(act, torch.ones_like(saved), saved)


def grads_of(x, params):
    return [x.grad] + [t.grad if t is not None else None for t in params]


def ptr(t):
    return ctypes.c_void_p(0 if t is None else t.data_ptr())


def restore_environ(old):
    """Puts back the environment variables saved as {name: value or None (unset)}: the plan
    knobs a measurement or a fuzzed case set (the driver reads them at every call)."""
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def tensors(lib, read=(), write=()):
    """Registers the tensors of the next emu_* call (tools/cuda_emu/emu_bounds.h): the call
    then fails (returns 3) if a kernel reads or writes global memory outside all of them,
    or writes one of `read`. None entries are skipped."""
    ts = [(t, 0) for t in read if t is not None] + [(t, 1) for t in write if t is not None]
    for t, _ in ts:
        assert t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last), t.shape
    n = len(ts)
    lib.emu_tensors(n, (ctypes.c_void_p * n)(*[t.data_ptr() for t, _ in ts]),
                    (ctypes.c_uint64 * n)(*[t.numel() * t.element_size() for t, _ in ts]),
                    (ctypes.c_int * n)(*[w for _, w in ts]))


def emulate(lib, x, params, cfg, gy, backward=True, fwd_bytes=None, ws_out=None):
    """Forward and backward of the emulated CUDA kernels, as the binding calls them.
    x (B, C, H, W) in the layout to use; params the 12 BlockParams tensors (None if absent);
    gy like the output (unused when not backward). Returns y, the tensor saved for
    backward, and the 13 gradients [dx, dwa, ..., dbs] (projection grads None without a
    projection; all None when not backward). fwd_bytes: a list that gets the global bytes the forward moved (the counters
    are read and reset between the forward and the backward). ws_out: a list that gets the
    backward's workspace (a float32 tensor, NaN where no kernel wrote)."""
    dtype = x.dtype
    batch, c, h, w = x.shape
    n, stride = params[6].shape[0], cfg.stride
    cout = out_channels(n, cfg.merge)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    proj = cfg.residual and needs_projection(c, cout, stride)
    # the binding's rule (csrc/block_args.cpp suggests_channels_last)
    chl = (c > 1 and x.stride(1) == 1) if x.is_contiguous() else x.stride(1) == 1
    ofmt = torch.channels_last if chl else torch.contiguous_format
    x = x.contiguous(memory_format=ofmt)
    params = [t.detach().contiguous() if t is not None else None for t in params]
    desc = (ctypes.c_int64 * 14)(batch, c, h, w, n, cout, ho, wo, stride, cfg.merge, cfg.act,
                                 int(cfg.residual), int(proj), int(chl))
    y = torch.full((batch, cout, ho, wo), float("nan"), dtype=dtype).contiguous(memory_format=ofmt)
    pre = torch.full_like(y, float("nan"))
    ptrs = (ctypes.c_void_p * 13)(ptr(x), *[ptr(t) for t in params])
    code = DTYPE_CODE[dtype]
    tensors(lib, read=[x, *params], write=[y, pre])
    assert lib.emu_forward(code, desc, ptrs, ptr(y), ptr(pre)) == 0
    if fwd_bytes is not None:
        fwd_bytes.append(_bytes_moved(lib))
    saved = activations.saved_for_backward(cfg.act, y, pre)
    if not backward:
        return y, saved, [None] * 13
    gy = gy.contiguous(memory_format=ofmt)
    lib.emu_ws.restype = ctypes.c_size_t
    wsb = lib.emu_ws(desc, x.element_size())
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
    tensors(lib, read=[x, *params, gy, saved], write=[*gr, ws])
    assert lib.emu_backward(code, desc, ptrs, ptr(gy), ptr(saved), gptrs, ptr(ws)) == 0
    if ws_out is not None:
        ws_out.append(ws)
    return y, saved, gr


def block_desc(batch, c, h, w, n, cfg, channels_last):
    """The 14 integers of csrc/cuda/block_desc.h's BlockDesc for emu_* calls (the driver's
    desc_of), C_out, the output size and the projection derived as the binding does."""
    cout = out_channels(n, cfg.merge)
    ho, wo = (h - 1) // cfg.stride + 1, (w - 1) // cfg.stride + 1
    proj = cfg.residual and needs_projection(c, cout, cfg.stride)
    return (ctypes.c_int64 * 14)(batch, c, h, w, n, cout, ho, wo, cfg.stride, cfg.merge,
                                 cfg.act, int(cfg.residual), int(proj), int(channels_last))


def case_params(c, n, merge, stride, act, residual, dtype, seed, bias=None):
    """The 12 BlockParams tensors (None where absent) of a test block in `dtype`, drawn in
    float64 from `seed` (N(0, 0.4^2), so every term matters), and its BlockConfig; bias None:
    the module's default."""
    torch.manual_seed(seed)
    kw = {} if bias is None else {"bias": bias}
    m = msfused.MultiScaleSeparableBlock(c, n, merge=merge, stride=stride, activation=act,
                                         residual=residual, backend="reference",
                                         dtype=torch.float64, **kw)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    m = m.to(dtype)
    params = [t.detach().contiguous() if t is not None else None for t in m.params()]
    cfg = BlockConfig(stride=stride, merge=merge_code(merge), act=act_code(act), residual=residual)
    return params, cfg


def run(lib, c, n, h, w, merge, stride, act, residual, bias, dtype, cl, batch, backward=True,
        tf32=False, fwd_bytes=None, eager32=False):
    params, cfg = case_params(c, n, merge, stride, act, residual, dtype,
                              c * 1000 + n * 10 + h + w, bias)
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = torch.randn(batch, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
    chl = cl and c > 1
    x = x.contiguous(memory_format=torch.channels_last if chl else torch.contiguous_format)
    # reference
    x64 = x.double().requires_grad_(True)
    p64 = [t.double().requires_grad_(True) if t is not None else None for t in params]
    y64 = msfused.block_reference(x64, msfused.BlockParams(*p64), cfg)
    gy = torch.randn(y64.shape, dtype=dtype).contiguous(memory_format=memory_format_of(x))
    y64.backward(gy.double())
    y, saved, gr = emulate(lib, x, params, cfg, gy, backward, fwd_bytes)
    ref = grads_of(x64, p64) if backward else [None] * 13
    errs = {"y": rel(y, y64)}
    for name, g, r in zip(NAMES, gr, ref):
        if r is not None:
            errs[name] = rel(g, r)
    if dtype == torch.float64 or (dtype == torch.float32 and not tf32):
        # eager32: also eager float32's errors against float64 (for sums that cancel, where
        # float32 itself is a few 1e-5 off)
        eager = eager_errors(x, params, cfg, gy, y64, ref) if eager32 else None
        if not (backward and dtype == torch.float32 and cfg.act in (ACT_RELU, ACT_RELU6)):
            return errs, None, eager
        # relu, relu6 in float32: act' read off the kernel's saved tensor can flip where z
        # lies within float32's rounding of a kink (so can eager's, by other roundings); the
        # exact-mask reference tells such a flip from an error, as for 16-bit below
        return errs, exact_mask_errors(x, params, cfg, gy, saved, gr, errs, dtype, False), eager
    if tf32:
        tc = backward and backward_plan_of(lib, x, params, cfg, 4)
        # the forward ran the tensor-core kernel unless it moved no counted bytes (the older
        # FMA forward, where no tile fits the device's shared memory: no TF32 rounding)
        tc_fwd = fwd_bytes is None or fwd_bytes[0] > 0
        return (errs,) + tf32_judged(x, params, cfg, gy, y, saved, gr, y64, ref, backward, tc,
                                     tc_fwd)
    modeled = backward and tensor_core_backward_ran(lib, x, params, cfg)
    exact = exact_mask_errors(x, params, cfg, gy, saved, gr, errs, dtype, modeled, backward)
    return errs, exact, eager_errors(x, params, cfg, gy, y64, ref)


def exact_mask_errors(x, params, cfg, gy, saved, gr, errs, dtype, modeled, backward=True):
    """The exact-mask reference's errors: float64 with act' read off the kernel's saved
    tensor; modeled: also rounded where the tensor-core backward rounds
    (modeled_preactivation). "_flips": act_flips of that mask against float64's own."""
    xm = x.double().requires_grad_(True)
    pm = [t.double().requires_grad_(True) if t is not None else None for t in params]
    z = (modeled_preactivation(xm, msfused.BlockParams(*pm), cfg, dtype) if modeled
         else block_preactivation(xm, msfused.BlockParams(*pm), cfg))
    sv = torch.ones_like(z) if saved is None else saved.double()
    gz = gy.double() * dact_from_saved(cfg.act, sv)
    z.backward(gz.to(dtype).double() if modeled else gz)
    exact = {"y": errs["y"]}
    for name, g, r in zip(NAMES, gr, grads_of(xm, pm)):
        if g is not None and r is not None:
            exact[name] = rel(g, r)
    if backward:
        exact["_flips"] = act_flips(cfg.act, z.detach(), sv, dtype)
    return exact


def eager_errors(x, params, cfg, gy, y64, ref):
    """Eager PyTorch's output and gradients in x's dtype against float64 (y64 and the
    gradients ref), per tensor: the yardstick of the tolerance policy."""
    xe = x.detach().requires_grad_(True)
    pe = [t.detach().requires_grad_(True) if t is not None else None for t in params]
    ye = msfused.block_reference(xe, msfused.BlockParams(*pe), cfg)
    eager = {"y": rel(ye, y64)}
    if ref[0] is None:  # forward only
        return eager
    ye.backward(gy)
    for name, g, r in zip(NAMES, grads_of(xe, pe), ref):
        if r is not None:
            eager[name] = rel(g, r)
    return eager


def tf32_judged(x, params, cfg, gy, y, saved, gr, y64, ref, backward, tc_backward,
                tc_forward=True):
    """(exact, eager) for a TF32 run, as run() gives them for 16-bit dtypes: exact, the kernel
    against the TF32 model (tf32_preactivation) differentiated with act' read off the kernel's
    saved tensor (where the backward is the FMA one, tc_backward False, its gradients against
    float64's instead: it has no TF32 rounding; likewise y where the forward is, tc_forward
    False); eager, the TF32 model end to end (its own act') against float64."""
    from msfused.config import apply_act

    def leaves():
        return (x.double().requires_grad_(True),
                [t.double().requires_grad_(True) if t is not None else None for t in params])

    xm, pm = leaves()
    z = tf32_preactivation(xm, msfused.BlockParams(*pm), cfg)
    zy = z
    if not tc_forward:
        xf, pf = leaves()
        zy = block_preactivation(xf, msfused.BlockParams(*pf), cfg)
    exact = {"y": rel(y, apply_act(zy.detach(), cfg.act))}
    if backward:
        sv = torch.ones_like(z) if saved is None else saved.double()
        if not tc_backward:
            xm, pm = leaves()
            z = block_preactivation(xm, msfused.BlockParams(*pm), cfg)
        z.backward(gy.double() * dact_from_saved(cfg.act, sv))
        for name, g, r in zip(NAMES, gr, grads_of(xm, pm)):
            if g is not None and r is not None:
                exact[name] = rel(g, r)
        exact["_flips"] = act_flips(cfg.act, z.detach(), sv, TF32_EPS)
    xe, pe = leaves()
    ye = apply_act(tf32_preactivation(xe, msfused.BlockParams(*pe), cfg), cfg.act)
    eager = {"y": rel(ye, y64)}
    if backward:
        ye.backward(gy.double())
        for name, g, r in zip(NAMES, grads_of(xe, pe), ref):
            if r is not None:
                eager[name] = rel(g, r)
    return exact, eager


class _RoundGrad(torch.autograd.Function):
    """Identity forward; the gradient rounded to `dtype` on its way back."""

    @staticmethod
    def forward(ctx, t, dtype):
        ctx.dtype = dtype
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype).double(), None


def modeled_preactivation(x, p, cfg, dtype):
    """block_preactivation in float64 whose gradients are rounded to `dtype` exactly where
    the tensor-core backward (block_backward_mma.cu, block_backward_dw.cu) rounds them: the
    scratch da_pre, db_pre and the projection's dx part; gz is rounded by the caller. a and b
    enter the weight-gradient GEMM as value plus rounding residual (float-accurate), b1 and
    db1 stay float in the kernel, and so here. What is left between the kernel and this is
    float32 accumulation order and the rounding of its outputs, so an indexing or masking
    bug stands far above EXACT_TOL."""
    import torch.nn.functional as F
    from msfused.config import MERGE_CONCAT, apply_act

    def rg(t):
        return _RoundGrad.apply(t, dtype)

    c, s, act = x.shape[1], cfg.stride, cfg.act
    a = apply_act(rg(F.conv2d(x, p.wa, p.ba, stride=s, padding=1, groups=c)), act)
    b1 = apply_act(F.conv2d(x, p.wb, p.bb, stride=s, padding=1, groups=c), act)
    b = apply_act(rg(F.conv2d(b1, p.wc, p.bc, stride=1, padding=1, groups=c)), act)
    za, zb = F.conv2d(a, p.pa, p.qa), F.conv2d(b, p.pb, p.qb)
    m = torch.cat([za, zb], dim=1) if cfg.merge == MERGE_CONCAT else za + zb
    if cfg.residual:
        m = m + (x if p.ws is None else F.conv2d(rg(x), p.ws, p.bs, stride=s))
    return m


def tf32_round(t):
    """t rounded to float32, then to TF32 as the (emulated) tensor cores read it: the top 10
    mantissa bits kept, the rest truncated; float64 again."""
    f = t.detach().float().contiguous()
    return (f.view(torch.int32) & -8192).view(torch.float32).double()


class _TF32Pointwise(torch.autograd.Function):
    """A 1x1 conv (stride s) whose forward and both backward GEMMs take TF32 operands, with
    exact (float64) accumulation: the model of a TF32 tensor-core GEMM."""

    @staticmethod
    def forward(ctx, x, w, stride):
        import torch.nn.functional as F
        ctx.save_for_backward(x, w)
        ctx.stride = stride
        return F.conv2d(tf32_round(x), tf32_round(w), stride=stride)

    @staticmethod
    def backward(ctx, g):
        import torch.nn.functional as F
        x, w = ctx.saved_tensors
        gt = tf32_round(g)
        dx = F.grad.conv2d_input(x.shape, tf32_round(w), gt, stride=ctx.stride)
        dw = F.grad.conv2d_weight(tf32_round(x), w.shape, gt, stride=ctx.stride)
        return dx, dw, None


def tf32_preactivation(x, p, cfg):
    """block_preactivation in float64 with the pointwise convs and the projection on the TF32
    model (_TF32Pointwise), forward and backward: what the TF32 kernels compute up to float32
    rounding and accumulation order, and the stand-in for eager's TF32 convolutions in the
    tolerance policy (no GPU here to run eager in TF32). The depthwise convs stay exact, as
    they run on FP32 cores."""
    import torch.nn.functional as F
    from msfused.config import MERGE_CONCAT, apply_act

    def pw(t, w, bias, s=1):
        z = _TF32Pointwise.apply(t, w, s)
        return z if bias is None else z + bias.view(1, -1, 1, 1)

    c, s, act = x.shape[1], cfg.stride, cfg.act
    a = apply_act(F.conv2d(x, p.wa, p.ba, stride=s, padding=1, groups=c), act)
    b1 = apply_act(F.conv2d(x, p.wb, p.bb, stride=s, padding=1, groups=c), act)
    b = apply_act(F.conv2d(b1, p.wc, p.bc, stride=1, padding=1, groups=c), act)
    za, zb = pw(a, p.pa, p.qa), pw(b, p.pb, p.qb)
    m = torch.cat([za, zb], dim=1) if cfg.merge == MERGE_CONCAT else za + zb
    if cfg.residual:
        m = m + (x if p.ws is None else pw(x, p.ws, p.bs, s))
    return m


def backward_plan_of(lib, x, params, cfg, elem):
    """Whether the three-launch backward plans for this call's shape (elem: 2, or 4 for
    float32)."""
    out = (ctypes.c_int64 * 14)()
    lib.emu_bwd_plan(block_desc(*x.shape, params[6].shape[0], cfg, x.stride(1) == 1), out, elem)
    return out[0] > 0


def tensor_core_backward_ran(lib, x, params, cfg):
    """Whether the emulated backward of this call is the tensor-core one (a 16-bit dtype and
    a plan that fits)."""
    if x.dtype not in (torch.float16, torch.bfloat16):
        return False
    return backward_plan_of(lib, x, params, cfg, 2)


def act_flips(act, z, saved, dtype):
    """Where act' read off the kernel's saved tensor differs from act' of the float64
    pre-activation z (relu, relu6: 0/1 masks): (count, elements, largest distance of z to
    the kink among them, the dtype's rounding band 4 eps rms(z)); dtype may be the eps
    itself (TF32_EPS)."""
    if act not in (ACT_RELU, ACT_RELU6):
        return 0, z.numel(), 0.0, 0.0
    mine = dact_from_saved(act, saved)
    exact = dact_from_saved(act, z)
    differ = mine != exact
    dist = z.abs() if act == ACT_RELU else torch.minimum(z.abs(), (z - 6).abs())
    eps = dtype if isinstance(dtype, float) else torch.finfo(dtype).eps
    band = 4 * eps * z.pow(2).mean().sqrt().item()
    n = int(differ.sum())
    return n, z.numel(), (dist[differ].max().item() if n else 0.0), band


def rel(a, b):
    a, b = a.double(), b.double().detach()
    if torch.isnan(a).any():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def judge(dtype, errs, exact, eager):
    """(ok, worst name, text) for one case; dtype "tf32" for float32 on TF32 (exact: against
    the TF32 model, eager: that model against float64)."""
    if exact is None:
        worst = max(errs, key=errs.get)
        ok = errs[worst] < EXACT_TOL[dtype]
        return ok, f"worst {worst} {errs[worst]:.2e}" + ("" if ok else f"  {errs}")
    floor = (TF32_EPS if dtype == "tf32" else torch.finfo(dtype).eps) / 10
    flips = exact.get("_flips")
    exact = {k: v for k, v in exact.items() if not k.startswith("_")}
    we = max(exact, key=exact.get)
    bad_policy = [k for k in errs if errs[k] > 2 * eager[k] + floor]
    wp = max(errs, key=errs.get)
    exact_ok = exact[we] < EXACT_TOL[dtype]
    ok = exact_ok and not bad_policy
    text = (f"exact-mask worst {we} {exact[we]:.2e}; vs float64 worst {wp} {errs[wp]:.2e} "
            f"(eager {dtype_name(dtype)} {eager[wp]:.2e}, max {max(eager.values()):.2e})")
    # A policy miss with the exact-mask check passing comes from act' itself: where the
    # float64 pre-activation lies within the dtype's rounding of a kink (relu's 0, relu6's
    # 0 and 6), the kernel's mask can come out the other way (so can eager's, by other
    # roundings), and one flipped pixel moves a small case's gradients by 1e-1. Accepted
    # only when every flip lies within that band and they are few (at most 1% of elements).
    if exact_ok and bad_policy and flips and flips[0]:
        n, numel, dist, band = flips
        if dist <= band and n <= max(1, numel // 100):
            ok = True
            text += (f"; policy miss on {bad_policy} from {n} act' flip(s) at |z - kink| <= "
                     f"{dist:.1e} (rounding band {band:.1e})")
    if not ok:
        text += f"  exact={exact} policy-fails={bad_policy} act'-flips={flips}"
    return ok, text


def dtype_name(dtype):
    return str(dtype).replace("torch.", "")


# ---- launch 2 of the float16/bfloat16 backward (block_backward_dw.cu) ------------------------
DW_NAMES = ["dwa", "dba", "dwb", "dbb", "dwc", "dbc"]


def run_backward_dw(lib, c, n, h, w, merge, stride, act, residual, bias, dtype, cl, batch):
    """The depthwise part of the backward alone, from given dL/da_pre, dL/db_pre and the
    shortcut's gradient dxs: those come from float64 autograd on the block, rounded to dtype
    (what launch 1 would hand over: pixel-major scratch, and the shortcut's in dx itself at
    the strided input pixels, in x's layout), and the oracle is float64 autograd through
    the three depthwise convs from the SAME rounded tensors, so the only differences are the
    kernel's own rounding (float64: ~1e-13; the partials are float32, ~1e-7 on dw*).
    Returns (errs {dx, dwa, ..., dbc: relative error}, identical: whether a second run gave
    the same bits in dx and the partials, bytes_ok: the emulator's counters say dx and the
    partials were written exactly once and x read once per tile over its window)."""
    import torch.nn.functional as F
    params, cfg = case_params(c, n, merge, stride, act, residual, dtype,
                              c * 1000 + n * 10 + h + w + 7, bias)
    chl = cl and c > 1
    x = torch.randn(batch, c, h, w, dtype=dtype).contiguous(
        memory_format=torch.channels_last if chl else torch.contiguous_format)
    s = stride
    proj = residual and needs_projection(c, out_channels(n, cfg.merge), s)
    # float64 block, decomposed: da_pre, db_pre and the shortcut input's gradient
    p64 = [t.double() if t is not None else None for t in params]
    wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs = p64
    x64 = x.double()
    a_pre = F.conv2d(x64, wa, ba, stride=s, padding=1, groups=c).requires_grad_(True)
    b1 = activations.apply_act(F.conv2d(x64, wb, bb, stride=s, padding=1, groups=c), cfg.act)
    b_pre = F.conv2d(b1, wc, bc, padding=1, groups=c).requires_grad_(True)
    ya = F.conv2d(activations.apply_act(a_pre, cfg.act), pa, qa)
    yb = F.conv2d(activations.apply_act(b_pre, cfg.act), pb, qb)
    z = torch.cat([ya, yb], dim=1) if cfg.merge == merge_code("concat") else ya + yb
    xs = x64[:, :, ::s, ::s].detach().requires_grad_(True)
    if residual:
        z = z + (F.conv2d(xs, ws, bs) if proj else xs)
    y = activations.apply_act(z, cfg.act)
    y.backward(torch.randn_like(y))
    da, db = a_pre.grad.to(dtype), b_pre.grad.to(dtype)
    dxs = xs.grad.to(dtype) if residual else None
    # the oracle from the rounded gradients
    xo = x.double().requires_grad_(True)
    leaf = [t.double().requires_grad_(True) for t in params[:6:2]]
    bl = [(params[i].double() if params[i] is not None else torch.zeros(c, dtype=torch.float64))
          .requires_grad_(True) for i in (1, 3, 5)]
    ao = F.conv2d(xo, leaf[0], bl[0], stride=s, padding=1, groups=c)
    b1o = activations.apply_act(F.conv2d(xo, leaf[1], bl[1], stride=s, padding=1, groups=c),
                                cfg.act)
    bo = F.conv2d(b1o, leaf[2], bl[2], padding=1, groups=c)
    torch.autograd.backward([ao, bo], [da.double(), db.double()])
    dx_ref = xo.grad.clone()
    if residual:
        dx_ref[:, :, ::s, ::s] += dxs.double()
    ref = {"dx": dx_ref}
    for k, (wl, bl_) in enumerate(zip(leaf, bl)):
        ref[DW_NAMES[2 * k]] = wl.grad.reshape(c, 9)
        ref[DW_NAMES[2 * k + 1]] = bl_.grad
    # the kernel
    pm = lambda t: None if t is None else t.permute(0, 2, 3, 1).contiguous()
    desc = block_desc(batch, c, h, w, n, cfg, chl)
    ptrs = (ctypes.c_void_p * 13)(ptr(x), *[ptr(t) for t in params])
    lib.emu_dw_parts.restype = ctypes.c_int64
    parts = lib.emu_dw_parts(desc)
    da_k, db_k = pm(da), pm(db)
    outs, counts = [], [ctypes.c_uint64() for _ in range(3)]
    xb = x.numel() * x.element_size()
    for _ in range(2):
        dx = torch.full_like(x, float("nan"))
        if residual:  # launch 1 leaves the shortcut's gradient in dx
            dx[:, :, ::s, ::s] = dxs
        part = torch.full((parts * c * 30,), float("nan"),  # the accumulation type
                          dtype=torch.float64 if dtype == torch.float64 else torch.float32)
        lib.emu_bytes(ptr(x), ctypes.c_uint64(xb), *[ctypes.byref(k) for k in counts])  # reset
        tensors(lib, read=[x, *params, da_k, db_k], write=[dx, part])
        assert lib.emu_backward_dw(DTYPE_CODE[dtype], desc, ptrs, ptr(da_k), ptr(db_k),
                                   ptr(dx), ptr(part)) == 0
        lib.emu_bytes(ptr(x), ctypes.c_uint64(xb), *[ctypes.byref(k) for k in counts])
        outs.append((dx, part))
    (dx, part), (dx2, part2) = outs
    identical = torch.equal(part, part2) and torch.equal(dx, dx2)
    # every dx element and partial written once; x read once per tile over its window
    # (input rows R0-s-1 .. R0+17 inside the image)
    def window(n_in):
        return sum(min(t0 + 18, n_in) - max(t0 - s - 1, 0) for t0 in range(0, n_in, 16))
    bytes_ok = (counts[2].value == xb + part.numel() * part.element_size() and
                counts[0].value == batch * c * window(h) * window(w) * x.element_size())
    pv = part.double().view(parts, c, 30)
    tot, mag = pv.sum(0), pv.abs().sum(0)
    cols = {"dwa": slice(0, 9), "dba": 9, "dwb": slice(10, 19), "dbb": 19,
            "dwc": slice(20, 29), "dbc": 29}
    errs = {"dx": rel(dx, ref["dx"])}
    for k, col in cols.items():
        # relative to the partials' magnitudes too: float32 partials that cancel (a bias sum
        # over few pixels) leave float32's rounding of the parts, not of the total
        scale = max(ref[k].norm().item(), mag[:, col].norm().item(), 1e-30)
        errs[k] = (tot[:, col] - ref[k]).norm().item() / scale
        if torch.isnan(tot[:, col]).any():
            errs[k] = float("inf")
    return errs, identical, bytes_ok


def dw_ok(dtype, errs):
    """Whether run_backward_dw's errors are within the exact-check tolerances (float64's
    partials are float64, so its dw* at float64's own too)."""
    return all(v < EXACT_TOL[dtype] for v in errs.values())


# The float16/bfloat16 forward (tensor cores: mma.sync, ldmatrix, cp.async; emu_ptx.h emulates
# them and asserts their rules) over every config: merge, stride, residual (identity where C == Cout at
# stride 1, else projection), layout, each activation; C and N not multiples of 16 / 64
# (partial K-chunks, two 64-channel blocks), C = 1, 1x1 images, several tiles and chunks;
# C = 3 with N = 1 on 7x5, and C = 256 (eight chunks, 16-byte paths) with N = 140 (C_out 280
# with concat: five blocks per branch, partial ones).
FORWARD_LOW_SHAPES = [(20, 70, 11, 10, 2), (1, 1, 1, 1, 3), (5, 3, 7, 9, 2), (8, 8, 9, 6, 2),
                      (8, 4, 9, 6, 1), (33, 64, 17, 18, 1), (3, 1, 7, 5, 2), (256, 140, 7, 5, 1)]


def forward_low_cases():
    acts = itertools.cycle(["relu", "silu", "relu6", "none"])
    return [(shape, merge, stride, residual, cl, next(acts))
            for shape in FORWARD_LOW_SHAPES
            for merge, stride, residual, cl in itertools.product(
                ("concat", "add"), (1, 2), (True, False), (False, True))]


def run_forward_low(lib, case, dtype, backward=False):
    """(ok, line) for one float16/bfloat16 case of forward_low_cases(): the forward only, or
    forward and backward (every gradient judged)."""
    (c, n, h, w, batch), merge, stride, residual, cl, act = case
    bias = (c + h) % 2 == 0 or merge == "add"
    errs, exact, eager = run(lib, c, n, h, w, merge, stride, act, residual, bias, dtype, cl,
                             batch, backward=backward)
    ok, text = judge(dtype, errs, exact, eager)
    identity = residual and c == out_channels(n, merge_code(merge)) and stride == 1
    res = ("res-id" if identity else "res-proj") if residual else "nores"
    return ok, (f"{'ok  ' if ok else 'FAIL'} {'bwd' if backward else 'fwd'} "
                f"{dtype_name(dtype):8} C{c} N{n} {h}x{w} "
                f"B{batch} {merge} s{stride} {act} {res} {'nhwc' if cl else 'nchw'} "
                f"bias={bias}: {text}")


# float32 on TF32 tensor cores: the GEMM's operands keep 10 mantissa bits (truncated), so y is
# within a few TF32 units of float64; an indexing bug is off by O(1).
TF32_TOL = 3e-3
TF32_EPS = 2.0 ** -10


def _bytes_moved(lib):
    """Global bytes the tensor-core kernel moved since the last call (the FMA kernel does not
    count its traffic, so zero means it did not run)."""
    counts = [ctypes.c_uint64() for _ in range(3)]
    lib.emu_bytes(None, ctypes.c_uint64(0), *[ctypes.byref(c) for c in counts])
    return sum(c.value for c in counts)


def run_forward_tf32(lib, case):
    """(ok, line) for one float32 forward of forward_low_cases() on the emulated TF32 kernel,
    against float64, checked to have run on the tensor-core kernel (its byte counters)."""
    (c, n, h, w, batch), merge, stride, residual, cl, act = case
    bias = (c + h) % 2 == 0 or merge == "add"
    lib.emu_set_tf32(1)
    _bytes_moved(lib)
    try:
        errs, _, _ = run(lib, c, n, h, w, merge, stride, act, residual, bias, torch.float32, cl,
                         batch, backward=False)
    finally:
        lib.emu_set_tf32(0)
    moved = _bytes_moved(lib)
    fma, _, _ = run(lib, c, n, h, w, merge, stride, act, residual, bias, torch.float32, cl,
                    batch, backward=False)
    ok = errs["y"] < TF32_TOL and moved > 0
    identity = residual and c == out_channels(n, merge_code(merge)) and stride == 1
    res = ("res-id" if identity else "res-proj") if residual else "nores"
    return ok, (f"{'ok  ' if ok else 'FAIL'} fwd tf32 C{c} N{n} {h}x{w} B{batch} {merge} "
                f"s{stride} {act} {res} {'nhwc' if cl else 'nchw'} bias={bias}: y vs float64 "
                f"{errs['y']:.2e} (FMA kernel {fma['y']:.2e}, tolerance {TF32_TOL:.0e}), "
                f"{moved} bytes moved")


def run_backward_tf32(lib, case):
    """(ok, line) for one float32 forward and backward of forward_low_cases() on the emulated
    TF32 kernels (as a GPU runs them with torch.backends.cudnn.allow_tf32), every gradient
    judged by the 16-bit policy with TF32 in the dtype's place (judge): within EXACT_TOL
    of the TF32 rounding model, and against float64 at most twice that model's error; ok also
    needs the backward to have run on the tensor-core kernels where their plan fits (their
    byte counters moved; the FMA backward does not count)."""
    (c, n, h, w, batch), merge, stride, residual, cl, act = case
    bias = (c + h) % 2 == 0 or merge == "add"
    planned = backward_plan(lib, case, 4)["P"] > 0
    lib.emu_set_tf32(1)
    _bytes_moved(lib)
    try:
        errs, exact, eager = run(lib, c, n, h, w, merge, stride, act, residual, bias,
                                 torch.float32, cl, batch, tf32=True, fwd_bytes=[])
    finally:
        lib.emu_set_tf32(0)
    moved = _bytes_moved(lib)  # the backward's (run() read the forward's)
    ok, text = judge("tf32", errs, exact, eager)
    ok = ok and (moved > 0) == planned
    identity = residual and c == out_channels(n, merge_code(merge)) and stride == 1
    res = ("res-id" if identity else "res-proj") if residual else "nores"
    return ok, (f"{'ok  ' if ok else 'FAIL'} bwd tf32 C{c} N{n} {h}x{w} B{batch} {merge} "
                f"s{stride} {act} {res} {'nhwc' if cl else 'nchw'} bias={bias}: {text}, "
                f"{'tensor-core' if planned else 'FMA'} backward, {moved} bytes moved")


def run_float32(lib, case, backward=False, dtype=torch.float32):
    """(ok, line) for one float32 case of forward_low_cases() with TF32 off (as a GPU runs it
    with torch.backends.cudnn.allow_tf32 = False): the one-launch forward and the three-launch
    backward with their GEMMs on exact float32 FMAs, every output within EXACT_TOL[float32]
    of float64, or, where eager float32 itself is further off (a gradient whose sum cancels
    to a small value: seen 1.6e-5 at C = 3, N = 1), within twice eager's error; ok also needs
    those kernels to have run (their byte counters moved; the older FMA kernels do not
    count) exactly where their plans fit. relu and relu6: a miss that comes from act' flipped
    at a kink, where z lies within float32's rounding of it, is accepted as judge() accepts
    it for 16-bit (the kernel exact against float64 with its own act'; the line says so).
    dtype float64: the same for float64 (gradcheck's dtype, the same kernels on FMAs in
    double), within EXACT_TOL[float64] of float64 autograd."""
    (c, n, h, w, batch), merge, stride, residual, cl, act = case
    bias = (c + h) % 2 == 0 or merge == "add"
    elem = dtype.itemsize
    fwd_planned = forward_planned(lib, case, elem)
    planned = fwd_planned if not backward else backward_plan(lib, case, elem)["P"] > 0
    fwd = []
    _bytes_moved(lib)
    errs, exact, eager = run(lib, c, n, h, w, merge, stride, act, residual, bias, dtype, cl,
                             batch, backward=backward, fwd_bytes=fwd, eager32=True)
    moved = _bytes_moved(lib) if backward else fwd[0]
    worst = max(errs, key=errs.get)
    bad = [k for k in errs if errs[k] >= max(EXACT_TOL[dtype], 2 * eager[k])]
    flipped = ""
    if bad and exact is not None:  # relu, relu6 (run()): a miss from act' flips at a kink,
        # accepted as judge() accepts it for 16-bit: the kernel exact against float64 with
        # its own act', every flip within float32's rounding band of the kink, and few
        nflip, numel, dist, band = exact["_flips"]
        worst_exact = max(v for k, v in exact.items() if not k.startswith("_"))
        if (nflip and dist <= band and nflip <= max(1, numel // 100)
                and worst_exact < EXACT_TOL[dtype]):
            flipped = (f"; policy miss on {bad} from {nflip} act' flip(s) at |z - kink| <= "
                       f"{dist:.1e} (rounding band {band:.1e}), exact-mask worst "
                       f"{worst_exact:.2e}")
            bad = []
    ok = not bad and (fwd[0] > 0) == fwd_planned and (moved > 0) == planned
    identity = residual and c == out_channels(n, merge_code(merge)) and stride == 1
    res = ("res-id" if identity else "res-proj") if residual else "nores"
    kernel = ("one-launch" if fwd_planned else "older FMA") if not backward else (
        "three-launch" if planned else "older FMA")
    return ok, (f"{'ok  ' if ok else 'FAIL'} {'bwd' if backward else 'fwd'} "
                f"{dtype_name(dtype):8} C{c} N{n} "
                f"{h}x{w} B{batch} {merge} s{stride} {act} {res} {'nhwc' if cl else 'nchw'} "
                f"bias={bias}: worst {worst} {errs[worst]:.2e} vs float64 (eager "
                f"{dtype_name(dtype)} {eager[worst]:.2e}), {kernel} kernels, {moved} bytes moved"
                + flipped + ("" if ok else f"  {errs} eager {eager}"
                             + (f" exact-mask {exact}" if exact is not None else "")))


def main_forward_low(lib):
    fails = total = 0
    for case in forward_low_cases():
        for dtype in (torch.bfloat16, torch.float16, "tf32", torch.float32, torch.float64):
            ok, line = (run_forward_tf32(lib, case) if dtype == "tf32"
                        else run_float32(lib, case, dtype=dtype)
                        if dtype in (torch.float32, torch.float64)
                        else run_forward_low(lib, case, dtype))
            fails += not ok
            total += 1
            print(line, flush=True)
    print(f"{fails} failure(s) of {total}")
    return 1 if fails else 0


def forward_plan(lib, case, elem):
    """The one-launch forward's plan for a forward_low_cases() case with elements of elem
    bytes: TH (0: no tile fits shared memory, the older FMA kernel runs), TW, run, seg_x
    (the xs segment's offset in A; -1: none, an identity residual read from global memory),
    the shared memory per CTA, and the CTAs of a cluster sharing each run (1: none) with
    whether they split the tile's rows (else the GEMM blocks)."""
    (c, n, h, w, batch), merge, stride, residual, cl, act = case
    cfg = BlockConfig(stride=stride, merge=merge_code(merge), act=act_code(act), residual=residual)
    plan = (ctypes.c_int64 * 12)()
    ptrs = (ctypes.c_void_p * 13)()  # null: 16-byte aligned, which the tile does not depend on
    lib.emu_mma_plan(block_desc(batch, c, h, w, n, cfg, cl and c > 1), ptrs, None, plan, elem)
    return dict(TH=plan[0], TW=plan[1], run=plan[7], seg_x=plan[9], smem=plan[3],
                cluster=plan[10], cluster_rows=bool(plan[11]))


def forward_planned(lib, case, elem):
    """Whether the one-launch forward has a plan for a forward_low_cases() case."""
    return forward_plan(lib, case, elem)["TH"] > 0


def backward_plan(lib, case, elem=2):
    """The three-launch backward's plan (emu_bwd_plan) for a forward_low_cases() case, for
    16-bit elements (elem 2) or float32 (4): P == 0 means the older FMA backward runs;
    rblocks > 1 that its weight-gradient rows are split over row blocks (dg_half: sharing
    out the data gradients by 16-channel half), nslices > 1 that launches 1 and 2 run per
    batch slice of slice_imgs images."""
    (c, n, h, w, batch), merge, stride, residual, cl, act = case
    cfg = BlockConfig(stride=stride, merge=merge_code(merge), act=act_code(act), residual=residual)
    out = (ctypes.c_int64 * 14)()
    lib.emu_bwd_plan(block_desc(batch, c, h, w, n, cfg, cl and c > 1), out, elem)
    return dict(zip(("P", "TH", "GT", "groups", "split", "cblocks", "smem", "workspace",
                     "rblocks", "slice_imgs", "nslices", "dg_half", "red", "parts"), out))


def backward_grads(lib, case, dtype):
    """The 13 gradients of the emulated kernels for a forward_low_cases() case, from fixed
    inputs (seeded by the case): for comparing runs bit by bit."""
    (c, n, h, w, batch), merge, stride, residual, cl, act = case
    params, cfg = case_params(c, n, merge, stride, act, residual, dtype,
                              c * 1000 + n * 10 + h + w)
    fmt = torch.channels_last if cl and c > 1 else torch.contiguous_format
    x = torch.randn(batch, c, h, w, dtype=dtype).contiguous(memory_format=fmt)
    cout = out_channels(n, cfg.merge)
    gy = torch.randn(batch, cout, (h - 1) // stride + 1, (w - 1) // stride + 1, dtype=dtype)
    return emulate(lib, x, params, cfg, gy)[2]


def main_backward_low(lib):
    """Forward and backward in bfloat16, float16, float32 on TF32, float32 on FMAs and float64
    for every case of forward_low_cases(): the three-launch backward (block_backward_mma.cu,
    block_backward_dw.cu) wherever it plans."""
    fails = total = 0
    for case in forward_low_cases():
        for dtype in (torch.bfloat16, torch.float16, "tf32", torch.float32, torch.float64):
            ok, line = (run_backward_tf32(lib, case) if dtype == "tf32"
                        else run_float32(lib, case, backward=True, dtype=dtype)
                        if dtype in (torch.float32, torch.float64)
                        else run_forward_low(lib, case, dtype, backward=True))
            fails += not ok
            total += 1
            print(line, flush=True)
    print(f"{fails} failure(s) of {total}")
    return 1 if fails else 0


def forward_bytes(lib, shape, batch=1, dtype=torch.bfloat16, plan_batch=None, l2=False):
    """Global bytes of one emulated channels_last forward at a benchmark shape (the module's
    default config), counted by the emulator: a dict with the plan (tile, CTAs, shared
    memory), x's size and the bytes read from it, the weights' size and the bytes read of
    them (and the biases), y's size and the bytes written. plan_batch: run `batch` images
    with the tile the plan picks for plan_batch (the plan weighs how full the GPU is).
    l2: also the DRAM bytes read and written by the L2 model (l2_bytes' capacity)."""
    if plan_batch is not None:
        planned = _forward_bytes(lib, shape, plan_batch, dtype, run=False)
        old = os.environ.get("MSFUSED_CUDA_FWD_TILE")
        os.environ["MSFUSED_CUDA_FWD_TILE"] = f"{planned['tile']}x{planned['cluster']}"
        try:
            return forward_bytes(lib, shape, batch, dtype, l2=l2)
        finally:
            if old is None:
                del os.environ["MSFUSED_CUDA_FWD_TILE"]
            else:
                os.environ["MSFUSED_CUDA_FWD_TILE"] = old
    return _forward_bytes(lib, shape, batch, dtype, l2=l2)


def _forward_bytes(lib, shape, batch, dtype, run=True, l2=False):
    torch.manual_seed(0)
    m = msfused.MultiScaleSeparableBlock(shape.c, shape.n, merge=shape.merge,
                                         stride=shape.stride, backend="reference", dtype=dtype)
    cfg = m.config
    params = [t.detach().contiguous() if t is not None else None for t in m.params()]
    x = torch.randn(batch if run else 1, shape.c, shape.h, shape.w, dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    n, stride = shape.n, shape.stride
    cout = out_channels(n, cfg.merge)
    ho, wo = (shape.h - 1) // stride + 1, (shape.w - 1) // stride + 1
    proj = cfg.residual and needs_projection(shape.c, cout, stride)
    desc = (ctypes.c_int64 * 14)(batch, shape.c, shape.h, shape.w, n, cout, ho, wo, stride,
                                 cfg.merge, cfg.act, int(cfg.residual), int(proj), 1)
    y = torch.empty((batch if run else 1, cout, ho, wo), dtype=dtype).contiguous(
        memory_format=torch.channels_last)
    ptrs = (ctypes.c_void_p * 13)(ptr(x), *[ptr(t) for t in params])
    plan = (ctypes.c_int64 * 12)()
    lib.emu_mma_plan(desc, ptrs, ptr(y), plan, x.element_size())
    tile = f"{plan[0]}x{plan[1]}x{plan[7]}"  # TH x TW x tiles per CTA down a column
    # the CTAs of a cluster sharing each run, splitting the rows or the GEMM blocks
    cluster = f"{plan[10]}{'r' if plan[11] else 'b'}" if plan[10] > 1 else "1"
    if not run:
        return dict(tile=tile, cluster=cluster, ctas=batch * plan[2], smem=plan[3])
    counts = [ctypes.c_uint64() for _ in range(3)]
    xb = x.numel() * x.element_size()
    lib.emu_bytes(ptr(x), ctypes.c_uint64(xb), *[ctypes.byref(c) for c in counts])  # reset
    saves = activations.TABLE[cfg.act].saves == "preact"  # the binding saves the pre-activation
    pre = torch.empty_like(y) if saves else None
    tensors(lib, read=[x, *params], write=[y, pre])
    assert lib.emu_forward(DTYPE_CODE[dtype], desc, ptrs, ptr(y), ptr(pre)) == 0
    lib.emu_bytes(ptr(x), ctypes.c_uint64(xb), *[ctypes.byref(c) for c in counts])
    read_x, read_other, written = (c.value for c in counts)
    dram = {}
    if l2:  # the L2 model (emu_l2.h): the same launch again, DRAM bytes read and written
        lib.emu_l2_reset(ctypes.c_uint64(l2_bytes(shape, batch)), 0)
        tensors(lib, read=[x, *params], write=[y, pre])
        assert lib.emu_forward(DTYPE_CODE[dtype], desc, ptrs, ptr(y), ptr(pre)) == 0
        rd, wr = ctypes.c_uint64(), ctypes.c_uint64()
        lib.emu_l2_dram(ctypes.byref(rd), ctypes.byref(wr))
        lib.emu_l2_reset(ctypes.c_uint64(0), 0)
        _bytes_moved(lib)
        dram = dict(dram_read=rd.value, dram_written=wr.value)
    ctas = batch * plan[2]
    wbytes = sum(t.numel() * t.element_size() for t in params if t is not None)
    yb = y.numel() * y.element_size() * (2 if pre is not None else 1)
    return dict(name=shape.name, tile=tile, cluster=cluster, ctas=ctas, tiles=batch * plan[8],
                smem=plan[3],
                vec=(bool(plan[4]), bool(plan[5]), bool(plan[6])), x=xb, read_x=read_x,
                w=wbytes, read_w=read_other, y=yb, written=written, **dram)


def main_bytes(lib, batch):
    from msfused.benchmark import SHAPES
    # --float32: float32 with TF32 off (the GEMM on FMAs; TF32 plans and moves the same)
    dtype = torch.float32 if "--float32" in sys.argv else torch.bfloat16
    print(f"emulated {dtype_name(dtype)} channels_last forward, batch {batch} with the tile "
          "planned for the benchmark's batch: global bytes per launch")
    l2 = "--l2" in sys.argv
    if l2:
        print("DRAM: the L2 model's estimate (tools/cuda_emu/emu_l2.h; EMU_L2_MB="
              f"{os.environ.get('EMU_L2_MB', '60')} scaled by batch / the benchmark's), cold "
              "at the launch")
    print(f"{'shape':9} {'tile x run':>10} {'CTAs':>5} {'smem KB':>7} {'x read/x':>9} "
          f"{'w read/(tiles*w)':>17} {'y written/y':>12}"
          + (f" {'DRAM read/(x+w)':>16} {'DRAM written/y':>15}" if l2 else ""))
    for group in SHAPES.values():
        for shape in group:
            r = forward_bytes(lib, shape, batch, dtype, plan_batch=shape.batch, l2=l2)
            tile = r["tile"] + (f"/{r['cluster']}" if r["cluster"] != "1" else "")
            print(f"{r['name']:9} {tile:>10} {r['ctas']:5d} {r['smem'] / 1024:7.1f} "
                  f"{r['read_x'] / r['x']:9.3f} {r['read_w'] / (r['tiles'] * r['w']):17.3f} "
                  f"{r['written'] / r['y']:12.3f}"
                  + (f" {r['dram_read'] / (r['x'] + r['w']):16.3f} "
                     f"{r['dram_written'] / r['y']:15.3f}" if l2 else ""), flush=True)
    return 0


def l2_bytes(shape, batch):
    """The L2 model's capacity for `batch` images of a benchmark shape: the GPU's L2
    (EMU_L2_MB, default 60: the H200's, as PyTorch reports it) scaled by batch over the
    benchmark's batch, so that every tensor keeps its size against the cache."""
    return int(float(os.environ.get("EMU_L2_MB", "60")) * 2**20 * batch / shape.batch)


def backward_bytes(lib, shape, batch=1, dtype=torch.bfloat16, l2=False, group=None,
                   scratch_kb=None):
    """Global bytes of one emulated channels_last backward (all launches, scratch and
    partials included) at a benchmark shape and the module's default config, with the pixel
    groups the plan picks at the benchmark's batch, against the backward floor: x, dy and
    the saved tensor read, dx written, the weights read and their gradients written once.
    dtype "tf32": float32 on the TF32 kernels. l2: also the DRAM bytes by the L2 model
    (tools/cuda_emu/emu_l2.h, capacity l2_bytes), cold at the backward's start and warm
    across its launches ("dram"), and emptied before each launch as ncu measures
    ("dram_cold"). group: tiles per group instead of the benchmark batch's plan's;
    scratch_kb: the scratch budget (MSFUSED_CUDA_BWD_SCRATCH_KB) instead of the default,
    for what-if runs of the batch slices at a small batch."""
    if dtype == "tf32":
        lib.emu_set_tf32(1)
        try:
            return backward_bytes(lib, shape, batch, torch.float32, l2, group, scratch_kb)
        finally:
            lib.emu_set_tf32(0)
    torch.manual_seed(0)
    m = msfused.MultiScaleSeparableBlock(shape.c, shape.n, merge=shape.merge,
                                         stride=shape.stride, backend="reference", dtype=dtype)
    cfg = m.config
    params = [t.detach().contiguous() if t is not None else None for t in m.params()]
    n, stride = shape.n, shape.stride
    cout = out_channels(n, cfg.merge)
    ho, wo = (shape.h - 1) // stride + 1, (shape.w - 1) // stride + 1
    proj = cfg.residual and needs_projection(shape.c, cout, stride)

    def desc_for(b):
        return block_desc(b, shape.c, shape.h, shape.w, n, cfg, True)

    esz = torch.empty((), dtype=dtype).element_size()

    plan_full, plan = (ctypes.c_int64 * 14)(), (ctypes.c_int64 * 14)()
    lib.emu_bwd_plan(desc_for(shape.batch), plan_full, esz)
    old = {k: os.environ.get(k) for k in ("MSFUSED_CUDA_BWD_GROUP",
                                          "MSFUSED_CUDA_BWD_SCRATCH_KB")}
    os.environ["MSFUSED_CUDA_BWD_GROUP"] = str(plan_full[2] if group is None else group)
    if scratch_kb is not None:
        os.environ["MSFUSED_CUDA_BWD_SCRATCH_KB"] = str(scratch_kb)
    try:
        lib.emu_bwd_plan(desc_for(batch), plan, esz)
        x = torch.randn(batch, shape.c, shape.h, shape.w, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        gy = torch.randn(batch, cout, ho, wo, dtype=dtype).contiguous(
            memory_format=torch.channels_last)
        y, saved, _ = emulate(lib, x, params, cfg, gy, backward=False)
        desc = desc_for(batch)
        ptrs = (ctypes.c_void_p * 13)(ptr(x), *[ptr(t) for t in params])
        lib.emu_ws.restype = ctypes.c_size_t
        ws = torch.empty((lib.emu_ws(desc, x.element_size()) // 4 + 1,), dtype=torch.float32)
        gr = [torch.empty_like(x)] + [torch.empty(t.shape, dtype=dtype) if t is not None else
                                      None for t in params]
        for i, t in enumerate(params):
            if t is None and (i < 10 or (i == 11 and proj)):
                gr[i + 1] = torch.empty((shape.c if i < 6 else (n if i < 10 else cout),),
                                        dtype=dtype)
        gptrs = (ctypes.c_void_p * 13)(*[ptr(t) for t in gr])
        counts = [ctypes.c_uint64() for _ in range(3)]
        xb = x.numel() * x.element_size()
        lib.emu_bytes(ptr(x), ctypes.c_uint64(xb), *[ctypes.byref(c) for c in counts])  # reset
        tensors(lib, read=[x, *params, gy, saved], write=[*gr, ws])
        assert lib.emu_backward(DTYPE_CODE[dtype], desc, ptrs, ptr(gy), ptr(saved), gptrs,
                                ptr(ws)) == 0
        lib.emu_bytes(ptr(x), ctypes.c_uint64(xb), *[ctypes.byref(c) for c in counts])
        dram = {}
        # DRAM bytes per tensor too ("dram_by", warm): x, dy, the saved tensor, dx, the
        # workspace (scratch and partials), the weights, their gradients
        regions = {"x": [x], "dy": [gy], "saved": [saved] if saved is not None else [],
                   "dx": [gr[0]], "workspace": [ws],
                   "weights": [t for t in params if t is not None],
                   "grads": [t for t in gr[1:] if t is not None]}
        for key, cold in (("dram", 0), ("dram_cold", 1)) if l2 else ():
            lib.emu_l2_region(None, ctypes.c_uint64(0))
            owner = []
            for name, ts in regions.items():
                for t in ts:
                    lib.emu_l2_region(ptr(t), ctypes.c_uint64(t.numel() * t.element_size()))
                    owner.append(name)
            lib.emu_l2_reset(ctypes.c_uint64(l2_bytes(shape, batch)), cold)
            tensors(lib, read=[x, *params, gy, saved], write=[*gr, ws])
            assert lib.emu_backward(DTYPE_CODE[dtype], desc, ptrs, ptr(gy), ptr(saved), gptrs,
                                    ptr(ws)) == 0
            rd, wr = ctypes.c_uint64(), ctypes.c_uint64()
            lib.emu_l2_dram(ctypes.byref(rd), ctypes.byref(wr))
            dram[key] = rd.value + wr.value
            if not cold:
                by = dict.fromkeys(regions, 0)
                for i, name in enumerate(owner):
                    lib.emu_l2_region_dram(i, ctypes.byref(rd), ctypes.byref(wr))
                    by[name] += rd.value + wr.value
                dram["dram_by"] = by
            lib.emu_l2_reset(ctypes.c_uint64(0), 0)
            lib.emu_l2_region(None, ctypes.c_uint64(0))
        if dram:
            _bytes_moved(lib)  # the model's reruns counted again: reset
    finally:
        restore_environ(old)
    read_x, read_other, written = (c.value for c in counts)
    wbytes = sum(t.numel() * t.element_size() for t in params if t is not None)
    gbytes = sum(t.numel() * t.element_size() for t in gr[1:] if t is not None)
    sv = saved.numel() * esz if saved is not None else 0
    floor = xb + gy.numel() * esz + sv + xb + wbytes + gbytes
    return dict(name=shape.name, tp=plan[0], gt=plan_full[2], groups_full=plan_full[3],
                groups=plan[3], smem=plan[6], x=xb, read_x=read_x, read=read_x + read_other,
                written=written, floor=floor, total=read_x + read_other + written, **dram)


def main_backward_bytes(lib, batch):
    from msfused.benchmark import SHAPES
    dtype = "tf32" if "--tf32" in sys.argv else torch.bfloat16
    print(f"emulated {'float32 (TF32)' if dtype == 'tf32' else 'bfloat16'} channels_last "
          f"backward, batch {batch}, pixel groups as planned for the benchmark's batch: global "
          "bytes of all launches against the backward floor")
    l2 = "--l2" in sys.argv
    if l2:
        print("DRAM: the L2 model's estimate (tools/cuda_emu/emu_l2.h; EMU_L2_MB="
              f"{os.environ.get('EMU_L2_MB', '60')} scaled by batch / the benchmark's), warm "
              "across the launches, and emptied before each launch (ncu's default)")
    print(f"{'shape':9} {'P':>3} {'tiles/grp':>9} {'smem KB':>7} {'x read/x':>9} "
          f"{'read/floor':>10} {'written/floor':>13} {'total/floor':>11}"
          + (f" {'DRAM/floor':>10} {'cold/floor':>10}" if l2 else ""))
    for group in SHAPES.values():
        for shape in group:
            r = backward_bytes(lib, shape, batch, dtype, l2)
            print(f"{r['name']:9} {r['tp']:3d} {r['gt']:9d} {r['smem'] / 1024:7.1f} "
                  f"{r['read_x'] / r['x']:9.3f} {r['read'] / r['floor']:10.3f} "
                  f"{r['written'] / r['floor']:13.3f} {r['total'] / r['floor']:11.3f}"
                  + (f" {r['dram'] / r['floor']:10.3f} {r['dram_cold'] / r['floor']:10.3f}"
                     if l2 else ""), flush=True)
            if l2:
                print("          DRAM warm / floor by tensor: " + ", ".join(
                    f"{k} {v / r['floor']:.3f}" for k, v in r["dram_by"].items()), flush=True)
    return 0


def main():
    quick = "--quick" in sys.argv
    lib = build()
    if "--forward-low" in sys.argv:
        return main_forward_low(lib)
    if "--backward-low" in sys.argv:
        return main_backward_low(lib)
    if "--backward-bytes" in sys.argv:
        return main_backward_bytes(lib, int(os.environ.get("EMU_BATCH", "1")))
    if "--bytes" in sys.argv:
        return main_bytes(lib, int(os.environ.get("EMU_BATCH", "1")))
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
    cases = [(shape, merge, stride, residual, cl, next(acts), (torch.float64,))
             for shape, merge, stride, residual, cl in cases]
    # float16 / bfloat16: each activation, both layouts, partial tiles, C and N not multiples
    # of 16, two 64-channel blocks. The first is the H200 run's bf16 NHWC case (benchmarks/
    # NOTES.md: 4.3e-2 against float64): exactly the kernel's rounding, see the docstring.
    low = (torch.bfloat16, torch.float16)
    cases += [((20, 70, 11, 10, 2), "add", 2, True, True, "relu6", low),
              ((20, 70, 11, 10, 2), "add", 2, True, False, "relu6", low),
              ((20, 70, 13, 9, 2), "concat", 2, True, True, "silu", low),
              ((5, 3, 7, 9, 2), "concat", 1, True, True, "relu", low),
              ((8, 8, 9, 6, 2), "add", 1, True, True, "none", low)]
    if quick:
        cases = cases[:4] + cases[-5:-3]
    for (c, n, h, w, batch), merge, stride, residual, cl, act, dtypes in cases:
        for dtype in dtypes:
            bias = (c + h) % 2 == 0 or merge == "add"
            errs, exact, eager = run(lib, c, n, h, w, merge, stride, act, residual, bias, dtype,
                                     cl, batch)
            ok, text = judge(dtype, errs, exact, eager)
            fails += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {dtype_name(dtype):8} C{c} N{n} {h}x{w} B{batch} "
                  f"{merge} s{stride} {act} {'res' if residual else 'nores'} "
                  f"{'nhwc' if cl else 'nchw'} bias={bias}: {text}", flush=True)
    total = sum(len(c[-1]) for c in cases)
    print(f"{fails} failure(s) of {total}")
    return 1 if fails else 0


if __name__ == "__main__":
    sys.exit(main())
