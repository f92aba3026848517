"""The Triton kernels as PyTorch custom operators, `msfused::triton_block_forward` and
`msfused::triton_block_backward`, with the schemas of the C++ operators. On a GPU they are
torch.library.triton_op and launch through torch.library.wrap_triton, so
torch.compile(fullgraph=True) traces into the kernels (no graph break) and the fake kernels
come for free (the op body runs under FakeTensorMode, where wrap_triton launches nothing).
Autograd and autocast are registered in Python through msfused.ops.registration; the
backward op recomputes a, b1, b from x (see msfused.ops.triton_kernels).

Defined at `import msfused` whenever Triton imports (so a fresh process can
torch.export.load a program that calls them). Arguments are checked once, at the op's
entry (msfused.validation, the rules of csrc/block_args.cpp). The kernels run on CUDA
tensors, and on CPU tensors only under TRITON_INTERPRET=1; any other tensor is refused
with a ValueError, never handed to another implementation.

Per-call overhead (op wrapper vs. direct kernel launch): see `measure_overhead()` and
TRITON_NOTES.md for the numbers measured here (CPU, interpreter: Python-side cost only).
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .. import activations
from ..config import MERGE_CONCAT, BlockConfig, needs_projection, out_channels, out_size
from ..layout import memory_format_of
from ..params import BlockParams
from ..validation import check_backward_inputs, check_op_call
from . import triton_kernels as K
from .registration import register_block_ops

triton_op = torch.library.triton_op
wrap_triton = torch.library.wrap_triton

_DTYPE_ID = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
_INT32_MAX = 2 ** 31 - 1
BWD_BLOCK_P_B1 = 64  # pixel tile of the b1 kernel (its per-program partials are sized by it)
_ACC_ELEMS = 8192  # fp32 accumulator elements per program of the forward (see triton_kernels)


_INTERPRET_AT_IMPORT = os.environ.get("TRITON_INTERPRET") == "1"


def _launcher():
    """How the op body launches a kernel k: `_launcher()(k)[grid](...)`. On a GPU through
    torch.library.wrap_triton (torch.compile traces into the kernel; fake tensors launch
    nothing). Under TRITON_INTERPRET=1 the kernel itself: wrap_triton cannot trace an
    interpreted kernel, and there the op is a plain custom op whose fake kernel is
    msfused.ops.registration's (the body never sees a fake tensor)."""
    return (lambda k: k) if _INTERPRET_AT_IMPORT else wrap_triton


def _define_op(name: str):
    """torch.library.triton_op on a GPU (decomposed by AOTDispatcher so Inductor sees the
    kernels). Under the interpreter a plain custom_op: torch.compile keeps it as one opaque
    node (still no graph break)."""
    if not _INTERPRET_AT_IMPORT:
        return triton_op(name, mutates_args=())
    return torch.library.custom_op(name, mutates_args=())


_VERBOSE = os.environ.get("MSFUSED_TRITON_VERBOSE") == "1"
_reported = set()


def _launch(wrap, kernel, grid, *args, **kwargs):
    """wrap(kernel)[grid](*args, **kwargs); with MSFUSED_TRITON_VERBOSE=1, prints (stderr)
    the autotuner's choice once per kernel and tuning key."""
    wrap(kernel)[grid](*args, **kwargs)
    if _VERBOSE:
        _report_choice(kernel)


def _report_choice(kernel) -> None:
    import sys

    name = kernel.base_fn.__name__
    # the autotuner fills its cache only when it has several configs to choose from
    chosen = list(kernel.cache.items())
    if not chosen:
        best = getattr(kernel, "best_config", None)  # unset while tracing: nothing ran
        chosen = [("(single config)", best)] if best is not None else []
    for key, cfg in chosen:
        if (name, key) not in _reported:
            _reported.add((name, key))
            print(f"msfused triton: {name} key={key} -> {cfg}", file=sys.stderr)


def _check_device(x: Tensor) -> None:
    if x.device.type == "cuda" or (x.device.type == "cpu" and _INTERPRET_AT_IMPORT):
        return
    where = "CUDA tensors (CPU tensors under TRITON_INTERPRET=1)"
    raise ValueError(f"x: the triton kernels run on {where}, got a tensor on {x.device}")


def _np2(v: int, lo: int = 16, hi: int = 64) -> int:
    p = lo
    while p < v and p < hi:
        p *= 2
    return p


def _cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def _check(x: Tensor, c_out: int, ho: int, wo: int) -> None:
    if x.dtype not in _DTYPE_ID:
        raise TypeError(f"x: the triton kernels support float32, float16, bfloat16, got {x.dtype}")
    c, h, w = x.shape[1:]
    if c * h * w > _INT32_MAX or c_out * ho * wo > _INT32_MAX or max(c, c_out) * ho * wo * 4 > _INT32_MAX:
        raise ValueError(f"x: one image of shape {tuple(x.shape[1:])} (or its output) has 2^31 "
                         "elements or more; the triton kernels index within an image in 32 bits")


def _strip_tiles(ho: int, wo: int):
    """Column block BW of the strip kernels and their tile counts per image: (BW, column
    blocks, strips x column blocks)."""
    bw = 8 if wo <= 8 else 16
    n_cb = _cdiv(wo, bw)
    return bw, n_cb, _cdiv(ho, K.STRIP_ROWS) * n_cb


def _flags(x: Tensor):
    # float32 dots in tf32 only where eager's 1x1 convolutions would use it
    ieee = x.dtype == torch.float32 and not torch.backends.cudnn.allow_tf32
    lowp = x.dtype in (torch.float16, torch.bfloat16)
    return ieee, lowp, _DTYPE_ID[x.dtype]


def _res_code(c: int, c_out: int, stride: int, residual: bool) -> int:
    if not residual:
        return 0
    return 2 if needs_projection(c, c_out, stride) else 1


def _biases(x, ba, bb, bc, qa, qb, bs, c, n, c_out, res):
    """All biases, or none: a missing one among present ones becomes zeros."""
    bl = [ba, bb, bc, qa, qb] + ([bs] if res == 2 else [])
    if all(b is None for b in bl):
        return False, [x] * 6
    sizes = [c, c, c, n, n, c_out]
    out = [(b.contiguous() if b is not None else x.new_zeros((sz,)))
           for b, sz in zip(bl + [None] * (6 - len(bl)), sizes)]
    return True, out


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------

@_define_op("msfused::triton_block_forward")
def triton_block_forward(x: Tensor, wa: Tensor, ba: Optional[Tensor], wb: Tensor,
                         bb: Optional[Tensor], wc: Tensor, bc: Optional[Tensor], pa: Tensor,
                         qa: Optional[Tensor], pb: Tensor, qb: Optional[Tensor],
                         ws: Optional[Tensor], bs: Optional[Tensor], stride: int, merge: int,
                         act: int, residual: bool, save_preact: bool) -> Tuple[Tensor, Tensor]:
    check_op_call(x, BlockParams(wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs), stride, merge,
                  act, residual)
    _check_device(x)
    return _forward_impl(x, wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs, stride, merge,
                         act, residual, save_preact, _launcher())


def _sizes(x: Tensor, pa: Tensor, stride: int, merge: int):
    """x contiguous in its own memory format, and the call's sizes (checked for the
    kernels' 32-bit indexing): x, (B, C, H, W, N, C_out, Ho, Wo), the memory format."""
    bsz, c, h, w = x.shape
    n = pa.shape[0]
    c_out = out_channels(n, merge)
    ho, wo = out_size(h, stride), out_size(w, stride)
    fmt = memory_format_of(x)
    x = x.contiguous(memory_format=fmt)
    _check(x, c_out, ho, wo)
    return x, (bsz, c, h, w, n, c_out, ho, wo), fmt


def _forward_impl(x, wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs, stride, merge, act,
                  residual, save_preact, wrap):
    x, (bsz, c, h, w, n, c_out, ho, wo), fmt = _sizes(x, pa, stride, merge)
    res = _res_code(c, c_out, stride, residual)
    has_bias, (ba_, bb_, bc_, qa_, qb_, bs_) = _biases(x, ba, bb, bc, qa, qb, bs, c, n, c_out, res)
    ws_ = ws.contiguous() if res == 2 else x
    y = torch.empty((bsz, c_out, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
    pre = (torch.empty((bsz, c_out, ho, wo), dtype=x.dtype, device=x.device, memory_format=fmt)
           if save_preact else x.new_empty((0,)))
    ieee, lowp, dtid = _flags(x)
    bw, n_cb, tiles = _strip_tiles(ho, wo)
    n_acc = 2 if merge == MERGE_CONCAT else 1
    block_n = _np2(n, hi=max(16, min(128, _ACC_ELEMS // (K.STRIP_ROWS * bw * n_acc))))
    grid = (bsz * tiles, _cdiv(n, block_n))

    _launch(wrap, K._fwd_kernel, grid,
        x, wa.contiguous(), ba_, wb.contiguous(), bb_, wc.contiguous(), bc_, pa.contiguous(),
        qa_, pb.contiguous(), qb_, ws_, bs_, y, pre if save_preact else y,
        c, h, w, ho, wo, n, n_cb, tiles,
        x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        y.stride(0), y.stride(1), y.stride(2), y.stride(3),
        STRIDE=stride, MERGE=merge, ACT=act, RES=res, HAS_BIAS=has_bias,
        SAVE_PRE=bool(save_preact), IEEE=ieee, LOWP=lowp, DTYPE_ID=dtid, BLOCK_N=block_n,
        BW=bw)
    return y, pre


# ---------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------

@_define_op("msfused::triton_block_backward")
def triton_block_backward(grad_y: Tensor, x: Tensor, saved: Tensor, wa: Tensor,
                          ba: Optional[Tensor], wb: Tensor, bb: Optional[Tensor], wc: Tensor,
                          bc: Optional[Tensor], pa: Tensor, qa: Optional[Tensor], pb: Tensor,
                          qb: Optional[Tensor], ws: Optional[Tensor], bs: Optional[Tensor],
                          stride: int, merge: int, act: int, residual: bool) -> List[Tensor]:
    p = BlockParams(wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs)
    check_op_call(x, p, stride, merge, act, residual)
    _check_device(x)
    return _backward_impl(grad_y, x, saved, p, stride, merge, act, residual, _launcher())


def _backward_impl(grad_y, x, saved, p: BlockParams, stride, merge, act, residual, wrap):
    wa, ba, wb, bb, wc, bc, pa, qa, pb, qb, ws, bs = p
    x, (bsz, c, h, w, n, c_out, ho, wo), fmt = _sizes(x, pa, stride, merge)
    grad_y, saved = check_backward_inputs(grad_y, x, saved, p, stride, merge, act, residual)
    res = _res_code(c, c_out, stride, residual)
    has_bias, (ba_, bb_, bc_, _, _, _) = _biases(x, ba, bb, bc, qa, qb, bs, c, n, c_out, res)
    ieee, lowp, dtid = _flags(x)
    wa_, wb_, wc_ = wa.contiguous(), wb.contiguous(), wc.contiguous()
    pa_, pb_ = pa.contiguous(), pb.contiguous()
    ws_ = ws.contiguous() if res == 2 else x
    P = ho * wo
    f32 = dict(dtype=torch.float32, device=x.device)
    sx = (x.stride(0), x.stride(1), x.stride(2), x.stride(3))

    # 1. gz = grad_y * act'(saved), fp32 [B, P, C_out]
    gz = torch.empty((bsz, P, c_out), **f32)
    sv = saved if activations.saves(act) != "nothing" else grad_y
    _launch(wrap, K._gz_kernel, lambda m: (bsz * _cdiv(P, m["BLOCK_P"]), _cdiv(c_out, m["BLOCK_O"])),
        grad_y, sv, gz, P, wo, c_out,
        grad_y.stride(0), grad_y.stride(1), grad_y.stride(2), grad_y.stride(3),
        sv.stride(0), sv.stride(1), sv.stride(2), sv.stride(3) if sv.dim() == 4 else 0,
        ACT=act, DTYPE_ID=dtid)

    # 2. recompute a, b; da_pre, db_pre; partials of dWa, dba
    # a and b only feed the pointwise weight-gradient dots, which round them to x's dtype
    # anyway: stored in it (half the bytes for 16-bit inputs, the same results)
    a_s = torch.empty((bsz, P, c), dtype=x.dtype, device=x.device)
    b_s = torch.empty((bsz, P, c), dtype=x.dtype, device=x.device)
    dap = torch.empty((bsz, P, c), **f32)
    dbp = torch.empty((bsz, P, c), **f32)
    bw, n_cb, tiles = _strip_tiles(ho, wo)
    part1 = torch.empty((bsz * tiles, 10, c), **f32)
    _launch(wrap, K._bwd_branch_kernel, lambda m: (bsz * tiles, _cdiv(c, m["BLOCK_C"])),
        x, wa_, ba_, wb_, bb_, wc_, bc_, pa_, pb_, gz, a_s, b_s, dap, dbp, part1, 10 * c,
        c, h, w, ho, wo, n, c_out, n_cb, tiles, *sx,
        STRIDE=stride, MERGE=merge, ACT=act, HAS_BIAS=has_bias, IEEE=ieee, LOWP=lowp,
        DTYPE_ID=dtid, BLOCK_N=_np2(n, hi=32), BW=bw)

    # 3. db1_pre; partials of dWc, dbc, dWb, dbb
    db1p = torch.empty((bsz, P, c), **f32)
    t2 = _cdiv(P, BWD_BLOCK_P_B1)
    part2 = torch.empty((bsz * t2, 20, c), **f32)
    _launch(wrap, K._bwd_b1_kernel, lambda m: (bsz * t2, _cdiv(c, m["BLOCK_C"])),
        x, wb_, bb_, wc_, dbp, db1p, part2, 20 * c, c, h, w, ho, wo, *sx,
        STRIDE=stride, ACT=act, HAS_BIAS=has_bias, DTYPE_ID=dtid, BLOCK_P=BWD_BLOCK_P_B1)

    # 4. dx
    dx = torch.empty_like(x, memory_format=memory_format_of(x))
    _launch(wrap, K._bwd_dx_kernel, lambda m: (bsz * _cdiv(h * w, m["BLOCK_P"]), _cdiv(c, m["BLOCK_C"])),
        wa_, wb_, ws_, dap, db1p, gz, dx, c, h, w, ho, wo, c_out,
        dx.stride(0), dx.stride(1), dx.stride(2), dx.stride(3),
        STRIDE=stride, RES=res, IEEE=ieee, LOWP=lowp, DTYPE_ID=dtid, BLOCK_O=_np2(c_out, hi=32))

    # 5. pointwise weight grads: gz^T @ (a | b | xs) over all B*P pixels
    R = bsz * P
    split = max(1, min(32, _cdiv(R, 1024)))
    rows = _cdiv(R, split)

    def pw_grad(col0, nn, a_t, sa):
        out = torch.empty((split, nn, c), **f32)
        _launch(wrap, K._pw_grad_kernel, lambda m: (_cdiv(nn, m["BLOCK_NN"]), _cdiv(c, m["BLOCK_C"]), split),
            gz, col0, c_out, a_t, sa[0], sa[1], sa[2], sa[3], x, out, R, P, wo, nn, c, rows,
            IEEE=ieee, LOWP=lowp, DTYPE_ID=dtid)
        return out.sum(0).view(nn, c, 1, 1).to(x.dtype, copy=True)

    s_scr = (P * c, 1, wo * c, c)
    dpa = pw_grad(0, n, a_s, s_scr)
    dpb = pw_grad(n if merge == MERGE_CONCAT else 0, n, b_s, s_scr)
    dws = (pw_grad(0, c_out, x, (sx[0], sx[1], sx[2] * stride, sx[3] * stride))
           if res == 2 else x.new_empty((0,)))

    # reductions of the partials, in a fixed order
    s1 = part1.sum(0)
    s2 = part2.sum(0)
    gsum = gz.sum((0, 1))
    dt = x.dtype

    def own(t):  # a fresh, contiguous tensor (outputs of a custom op must not alias)
        return t.to(dtype=dt, memory_format=torch.contiguous_format, copy=True)

    dwa = own(s1[:9].t().reshape(c, 1, 3, 3))
    dwc = own(s2[:9].t().reshape(c, 1, 3, 3))
    dwb = own(s2[10:19].t().reshape(c, 1, 3, 3))
    dba, dbc, dbb = own(s1[9]), own(s2[9]), own(s2[19])
    dqa = own(gsum[:n])
    dqb = own(gsum[n:] if merge == MERGE_CONCAT else gsum)
    dbs = own(gsum) if res == 2 else x.new_empty((0,))
    return [dx, dwa, dba, dwb, dbb, dwc, dbc, dpa, dqa, dpb, dqb, dws, dbs]


OPS = register_block_ops("msfused::triton_block_forward", "msfused::triton_block_backward",
                         fake=_INTERPRET_AT_IMPORT, autograd=True, autocast=True)


# ---------------------------------------------------------------------------------------
# overhead measurement
# ---------------------------------------------------------------------------------------

def direct_forward(x: Tensor, p: BlockParams, cfg: BlockConfig) -> Tensor:
    """The forward kernel launched directly (no custom op, no dispatcher, no autograd):
    for measuring the op wrapper's overhead."""
    return _forward_impl(x, *p, cfg.stride, cfg.merge, cfg.act, cfg.residual, False,
                         lambda k: k)[0]


def measure_overhead(x: Tensor, p: BlockParams, cfg: BlockConfig, iters: int = 200) -> dict:
    """Mean wall time per call (microseconds) of the op (torch.ops.msfused, no grad) and of
    the direct launch, on the same inputs. On a GPU this is dominated by the host-side cost
    when the kernel is small; on CPU under the interpreter it includes the kernel."""
    import time

    def timeit(fn):
        fn()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        if x.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / iters * 1e6

    with torch.no_grad():
        op = timeit(lambda: OPS.run(x, p, cfg))
        direct = timeit(lambda: direct_forward(x, p, cfg))
    return {"op_us": op, "direct_us": direct, "overhead_us": op - direct}
