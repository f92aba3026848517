"""Triton kernels of the block (SPEC section 1): one forward launch, five backward launches.

Importing this module imports triton; msfused imports it (through msfused.ops.triton_ops)
at `import msfused` when Triton is installed, and not at all otherwise.

Layout and tiles
----------------
Every kernel takes x (and y, dx) through four strides (batch, channel, row, column), so
NCHW and NHWC (channels_last) run the same code; NHWC is the fast path because a tile's
channel vector is contiguous there. Weights are made contiguous by the wrapper:
depthwise (C,1,3,3) is read as w[c*9 + k], pointwise (N,C,1,1) as w[n*C + c].

Grid axis 0 is (image, pixel tile): a program owns BLOCK_P consecutive output pixels
(row-major over Ho x Wo) of one image; axis 1 is a tile of output channels (forward) or of
input channels (backward). Axis 0 carries the batch so B has no 65535 limit.

Forward (`_fwd_kernel`, ONE launch). Axis 1 enumerates BLOCK_N-wide tiles of output
channels. For merge="concat" the pa half and the pb half get separate tiles, so a concat
program computes only branch A or only branch B (the depthwise work is not duplicated and a
NaN/inf in one branch cannot leak into the other half through a zero weight); for
merge="add" a tile computes both. The program loops over the input channels in chunks of
BLOCK_C: for the chunk it computes the depthwise results a, b (and the strided x for a
projection) for its BLOCK_P pixels in fp32 registers, and feeds them to `tl.dot` against a
[BLOCK_C, BLOCK_N] tile of the pointwise (projection) weight, accumulating the output tile
[BLOCK_P, BLOCK_N] in fp32. The epilogue adds pointwise/projection biases, the identity
residual, applies the activation, and writes y (and, for silu training, the
pre-activation) once, in x's memory format.

Where b1 comes from (the second depthwise of branch B needs b1 at the 8 neighbours of each
output pixel, and Triton cannot shift a register tile or address shared memory):
we RECOMPUTE b1 at the 9 shifted positions from x (9 x 9 = 81 masked x loads and FMAs per
pixel and channel instead of 9), rather than staging b1 for the tile plus halo through a
scratch buffer. Why:
  * staging inside ONE launch needs a CTA-wide barrier between writing the halo tile to
    global scratch and reading it back shifted; Triton only offers `tl.debug_barrier`, whose
    global-memory ordering is not part of Triton's contract, and the scratch would be
    per-program global memory (grid-sized allocation, L2 traffic) anyway;
  * the recomputation is pure FMAs on L1-resident data (the 5x5 (stride 1) or 7x7 (stride 2)
    x neighbourhood of the tile is reused by the 81 loads), it is exact (b1 is zeroed
    outside the image, which is what zero padding of b1 means), and the pointwise GEMM
    (2N MACs per pixel and channel on tensor cores) plus the HBM traffic of x and y bound
    the kernel at the widths the block is used at;
  * no scratch means nothing but y (and pre) is written: training memory is x + y.
The cost is visible at small N (few MACs per channel): there the depthwise recompute
dominates. The backward, which has more launches anyway, stages through scratch instead.

Backward (five launches plus torch reductions of per-program partials, all deterministic:
no atomics, fixed reduction order for a given shape):
  1. `_gz_kernel`: gz = grad_y * act'(saved) -> fp32 scratch [B, Ho*Wo, C_out].
  2. `_bwd_branch_kernel` (pixel tile x channel tile): recomputes a, b (b via the 81-load
     recompute above), da = gpa @ Pa and db = gpb @ Pb with tl.dot over N chunks,
     da_pre/db_pre = d * act'(pre); writes a, b, da_pre, db_pre to fp32 scratch and
     per-program partials of dWa, dba.
  3. `_bwd_b1_kernel`: recomputes b1 at its own pixels, reads db_pre of the 9 neighbours
     from scratch: db1 (transposed stride-1 depthwise), partials of dWc, dbc; db1_pre; its
     partials of dWb, dbb; writes db1_pre.
  4. `_bwd_dx_kernel` (input-pixel tile): transposed stride-s depthwise of da_pre and
     db1_pre, plus the identity residual (gz) or the projection (gz @ Ws with tl.dot).
  5. `_pw_grad_kernel` (launched once per pointwise weight: pa, pb, and ws when present):
     dW = gz^T @ a / b / xs over all pixels, split into a fixed number of row ranges whose
     partials are summed in order.
Bias grads of the pointwise layers are torch sums over the gz scratch.

Precision: depthwise math and every accumulator are fp32. float32 inputs use
`tl.dot(..., input_precision="ieee")` unless torch.backends.cuda.matmul.allow_tf32 is on
(then tf32, Triton's default); float16/bfloat16 feed tl.dot operands rounded to the input
dtype (tensor cores), as eager PyTorch rounds its intermediates. tl.dot needs every
dimension >= 16: BLOCK_P, BLOCK_C, BLOCK_N, BLOCK_R are all >= 16 and masked loads pad
with zeros.

Indexing: per-image offsets are int32, the image offset int64; the wrapper refuses an image
(C*H*W or C_out*Ho*Wo) of 2^31 elements or more with a clear error.

Interpreter (TRITON_INTERPRET=1) limits, where they bite:
  * it runs programs one after another in numpy: the tests use small shapes only;
  * autotuning is pointless there, so every autotune list collapses to its first config;
  * float16/bfloat16 are emulated through numpy, slower still; tl.dot of float32 is
    numpy's matmul (exact ieee, so the float32 suite tolerance of 2e-5 holds);
  * tl.dot on bfloat16 operands is wrong in the interpreter (it multiplies the raw bits),
    so under the interpreter every dot upcasts its (already rounded) operands to fp32
    (`_INTERP_DOT_FP32`); the tensor-core path for fp16/bf16 is therefore NOT exercised
    without a GPU;
  * performance, register pressure, tf32 and num_warps/num_stages mean nothing there;
    none of that is exercised without a GPU.
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

from ..activations import ACTIVATIONS

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# The interpreter's tl.dot multiplies the raw bits of bfloat16 operands (Triton 3.8: garbage
# results). Under the interpreter, dots therefore run on fp32 copies of their operands, which
# is exact for products of fp16/bf16 values; compiled kernels are unaffected.
_INTERP_DOT_FP32 = tl.constexpr(INTERPRET)


def _configs(specs):
    """triton.Config list from (kwargs, num_warps) pairs; only the first under the
    interpreter."""
    cfgs = [triton.Config(kw, num_warps=nw, num_stages=ns) for kw, nw, ns in specs]
    return cfgs[:1] if INTERPRET else cfgs


# ---------------------------------------------------------------------------------------
# jit helpers
# ---------------------------------------------------------------------------------------

# The activation codes of msfused/activations.py (its table is the one source of them).
_ACT_RELU = tl.constexpr(ACTIVATIONS.index("relu"))
_ACT_RELU6 = tl.constexpr(ACTIVATIONS.index("relu6"))
_ACT_SILU = tl.constexpr(ACTIVATIONS.index("silu"))
_ACT_NONE = tl.constexpr(ACTIVATIONS.index("none"))


@triton.jit
def _act(v, ACT: tl.constexpr):
    """The block's activation, as torch.nn.functional computes it (NaN propagates)."""
    if ACT == _ACT_RELU:
        v = tl.where(v < 0, 0.0, v)
    elif ACT == _ACT_RELU6:
        v = tl.where(v < 0, 0.0, tl.where(v > 6, 6.0, v))
    elif ACT == _ACT_SILU:
        v = v * tl.sigmoid(v)
    return v


@triton.jit
def _act_grad(g, pre, ACT: tl.constexpr):
    """g * act'(pre), PyTorch's select forms for relu/relu6 (threshold_backward,
    hardtanh_backward: 0 where the unit is off, kinks included; g elsewhere, also at NaN).
    For relu/relu6, `pre` may also be the activation's output (the same tests)."""
    if ACT == _ACT_RELU:
        g = tl.where(pre <= 0, 0.0, g)
    elif ACT == _ACT_RELU6:
        g = tl.where((pre <= 0) | (pre >= 6), 0.0, g)
    elif ACT == _ACT_SILU:
        s = tl.sigmoid(pre)
        g = g * (s * (1.0 + pre * (1.0 - s)))
    return g


@triton.jit
def _mm(a, b, acc, IEEE: tl.constexpr):
    if _INTERP_DOT_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dw_x(x_img, w_ptr, cc, cm, oh, ow, om, H, W, sxc, sxh, sxw,
          STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Depthwise 3x3 (zero padding 1, stride STRIDE, no bias) of x at output positions
    (oh, ow) [BLOCK_P] where om, channels cc [BLOCK_C] where cm; fp32 [BLOCK_P, BLOCK_C]."""
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for ky in tl.static_range(3):
        hi = oh * STRIDE + (ky - 1)
        hm = om & (hi >= 0) & (hi < H)
        for kx in tl.static_range(3):
            wi = ow * STRIDE + (kx - 1)
            m = hm & (wi >= 0) & (wi < W)
            xv = tl.load(x_img + hi[:, None] * sxh + wi[:, None] * sxw + cc[None, :] * sxc,
                         mask=m[:, None] & cm[None, :], other=0.0).to(tl.float32)
            wv = tl.load(w_ptr + cc * 9 + (ky * 3 + kx), mask=cm, other=0.0).to(tl.float32)
            acc += xv * wv[None, :]
    return acc


@triton.jit
def _branch_b_pre(x_img, wb_ptr, bb_ptr, wc_ptr, bc_ptr, cc, cm, ho, wo, pm, H, W, Ho, Wo,
                  sxc, sxh, sxw, STRIDE: tl.constexpr, ACT: tl.constexpr,
                  HAS_BIAS: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pre-activation of b = dw3x3(b1, Wc, bc) at (ho, wo), recomputing b1 at the 9
    neighbours (b1 is zero outside the Ho x Wo image: zero padding of b1)."""
    if HAS_BIAS:
        bbv = tl.load(bb_ptr + cc, mask=cm, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for dy in tl.static_range(3):
        qh = ho + (dy - 1)
        hm = pm & (qh >= 0) & (qh < Ho)
        for dx in tl.static_range(3):
            qw = wo + (dx - 1)
            qm = hm & (qw >= 0) & (qw < Wo)
            b1 = _dw_x(x_img, wb_ptr, cc, cm, qh, qw, qm, H, W, sxc, sxh, sxw,
                       STRIDE, BLOCK_P, BLOCK_C)
            if HAS_BIAS:
                b1 += bbv[None, :]
            b1 = tl.where(qm[:, None], _act(b1, ACT), 0.0)
            wcv = tl.load(wc_ptr + cc * 9 + (dy * 3 + dx), mask=cm, other=0.0).to(tl.float32)
            acc += b1 * wcv[None, :]
    if HAS_BIAS:
        acc += tl.load(bc_ptr + cc, mask=cm, other=0.0).to(tl.float32)[None, :]
    return acc


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------

@triton.autotune(
    configs=_configs([
        ({"BLOCK_P": 64, "BLOCK_C": 32}, 4, 2),
        ({"BLOCK_P": 128, "BLOCK_C": 32}, 8, 2),
        ({"BLOCK_P": 64, "BLOCK_C": 16}, 4, 2),
        ({"BLOCK_P": 32, "BLOCK_C": 32}, 4, 2),
    ]),
    key=["C", "H", "W", "N", "C_OUT", "STRIDE", "MERGE", "ACT", "RES", "BLOCK_N", "IEEE",
         "DTYPE_ID"],
)
@triton.jit
def _fwd_kernel(x_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, wc_ptr, bc_ptr, pa_ptr, qa_ptr,
                pb_ptr, qb_ptr, ws_ptr, bs_ptr, y_ptr, pre_ptr,
                C, H, W, Ho, Wo, N, C_OUT, N_TILES,
                sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                STRIDE: tl.constexpr, MERGE: tl.constexpr, ACT: tl.constexpr,
                RES: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr,
                IEEE: tl.constexpr, LOWP: tl.constexpr, DTYPE_ID: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    P = Ho * Wo
    n_ptiles = tl.cdiv(P, BLOCK_P)
    pid0 = tl.program_id(0)
    pid_n = tl.program_id(1)
    bi = (pid0 // n_ptiles).to(tl.int64)
    pt = pid0 % n_ptiles
    p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    ho = p // Wo
    wo = p % Wo
    x_img = x_ptr + bi * sxb

    part = pid_n // N_TILES  # concat: 0 = pa half, 1 = pb half; add: always 0
    nt = pid_n % N_TILES
    n = nt * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    if MERGE == 0:
        do_a = part == 0
        do_b = part == 1
        ocol = part * N + n
    else:
        do_a = pid_n >= 0
        do_b = pid_n >= 0
        ocol = n

    acc = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cc = c0 + tl.arange(0, BLOCK_C)
        cm = cc < C
        wmask = cm[:, None] & nm[None, :]
        if do_a:
            av = _dw_x(x_img, wa_ptr, cc, cm, ho, wo, pm, H, W, sxc, sxh, sxw,
                       STRIDE, BLOCK_P, BLOCK_C)
            if HAS_BIAS:
                av += tl.load(ba_ptr + cc, mask=cm, other=0.0).to(tl.float32)[None, :]
            av = _act(av, ACT)
            wt = tl.load(pa_ptr + n[None, :] * C + cc[:, None], mask=wmask, other=0.0)
            if LOWP:
                av = av.to(pa_ptr.dtype.element_ty)
            acc = _mm(av, wt, acc, IEEE)
        if do_b:
            bv = _branch_b_pre(x_img, wb_ptr, bb_ptr, wc_ptr, bc_ptr, cc, cm, ho, wo, pm,
                               H, W, Ho, Wo, sxc, sxh, sxw, STRIDE, ACT, HAS_BIAS,
                               BLOCK_P, BLOCK_C)
            bv = _act(bv, ACT)
            wt = tl.load(pb_ptr + n[None, :] * C + cc[:, None], mask=wmask, other=0.0)
            if LOWP:
                bv = bv.to(pb_ptr.dtype.element_ty)
            acc = _mm(bv, wt, acc, IEEE)
        if RES == 2:
            xs = tl.load(x_img + (ho * STRIDE)[:, None] * sxh + (wo * STRIDE)[:, None] * sxw
                         + cc[None, :] * sxc, mask=pm[:, None] & cm[None, :], other=0.0)
            if not LOWP:
                xs = xs.to(tl.float32)
            wt = tl.load(ws_ptr + ocol[None, :] * C + cc[:, None], mask=wmask, other=0.0)
            acc = _mm(xs, wt, acc, IEEE)

    if HAS_BIAS:
        if do_a:
            acc += tl.load(qa_ptr + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        if do_b:
            acc += tl.load(qb_ptr + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        if RES == 2:
            acc += tl.load(bs_ptr + ocol, mask=nm, other=0.0).to(tl.float32)[None, :]
    omask = pm[:, None] & nm[None, :]
    if RES == 1:  # identity: STRIDE == 1 and C_OUT == C
        acc += tl.load(x_img + ho[:, None] * sxh + wo[:, None] * sxw + ocol[None, :] * sxc,
                       mask=omask, other=0.0).to(tl.float32)
    y_off = bi * syb + ocol[None, :] * syc + ho[:, None] * syh + wo[:, None] * syw
    if SAVE_PRE:
        tl.store(pre_ptr + y_off, acc.to(pre_ptr.dtype.element_ty), mask=omask)
    tl.store(y_ptr + y_off, _act(acc, ACT).to(y_ptr.dtype.element_ty), mask=omask)


# ---------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------

@triton.autotune(configs=_configs([({"BLOCK_P": 64, "BLOCK_O": 32}, 4, 1)]),
                 key=["C_OUT", "P", "ACT", "DTYPE_ID"])
@triton.jit
def _gz_kernel(gy_ptr, s_ptr, gz_ptr, P, Wo, C_OUT,
               sgb, sgc, sgh, sgw, ssb, ssc, ssh, ssw,
               ACT: tl.constexpr, DTYPE_ID: tl.constexpr,
               BLOCK_P: tl.constexpr, BLOCK_O: tl.constexpr):
    n_ptiles = tl.cdiv(P, BLOCK_P)
    pid0 = tl.program_id(0)
    bi = (pid0 // n_ptiles).to(tl.int64)
    p = (pid0 % n_ptiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    o = tl.program_id(1) * BLOCK_O + tl.arange(0, BLOCK_O)
    m = (p < P)[:, None] & (o < C_OUT)[None, :]
    ho = p // Wo
    wo = p % Wo
    g = tl.load(gy_ptr + bi * sgb + o[None, :] * sgc + ho[:, None] * sgh + wo[:, None] * sgw,
                mask=m, other=0.0).to(tl.float32)
    if ACT != _ACT_NONE:
        s = tl.load(s_ptr + bi * ssb + o[None, :] * ssc + ho[:, None] * ssh
                    + wo[:, None] * ssw, mask=m, other=0.0).to(tl.float32)
        g = _act_grad(g, s, ACT)
    tl.store(gz_ptr + bi * P * C_OUT + p[:, None] * C_OUT + o[None, :], g, mask=m)


# BLOCK_P of the two kernels that write per-program partials is fixed by the host (the
# partial buffers are sized by it); only the channel tile and warps are tuned.
@triton.autotune(configs=_configs([({"BLOCK_C": 32}, 4, 1), ({"BLOCK_C": 16}, 4, 1)]),
                 key=["C", "H", "W", "N", "STRIDE", "MERGE", "ACT", "IEEE", "DTYPE_ID"])
@triton.jit
def _bwd_branch_kernel(x_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, wc_ptr, bc_ptr, pa_ptr,
                       pb_ptr, gz_ptr, a_s, b_s, dap_s, dbp_s, part_ptr, n_parts_row,
                       C, H, W, Ho, Wo, N, C_OUT, sxb, sxc, sxh, sxw,
                       STRIDE: tl.constexpr, MERGE: tl.constexpr, ACT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, LOWP: tl.constexpr,
                       DTYPE_ID: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    P = Ho * Wo
    n_ptiles = tl.cdiv(P, BLOCK_P)
    pid0 = tl.program_id(0)
    bi = (pid0 // n_ptiles).to(tl.int64)
    pt = pid0 % n_ptiles
    p = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    pm = p < P
    ho = p // Wo
    wo = p % Wo
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cc < C
    x_img = x_ptr + bi * sxb

    a_pre = _dw_x(x_img, wa_ptr, cc, cm, ho, wo, pm, H, W, sxc, sxh, sxw,
                  STRIDE, BLOCK_P, BLOCK_C)
    if HAS_BIAS:
        a_pre += tl.load(ba_ptr + cc, mask=cm, other=0.0).to(tl.float32)[None, :]
    b_pre = _branch_b_pre(x_img, wb_ptr, bb_ptr, wc_ptr, bc_ptr, cc, cm, ho, wo, pm,
                          H, W, Ho, Wo, sxc, sxh, sxw, STRIDE, ACT, HAS_BIAS,
                          BLOCK_P, BLOCK_C)

    da = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    db = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    gz_img = gz_ptr + bi * P * C_OUT
    for n0 in range(0, N, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < N
        gm = pm[:, None] & nm[None, :]
        wmask = nm[:, None] & cm[None, :]
        ga = tl.load(gz_img + p[:, None] * C_OUT + n[None, :], mask=gm, other=0.0)
        if MERGE == 0:
            gb = tl.load(gz_img + p[:, None] * C_OUT + (N + n)[None, :], mask=gm, other=0.0)
        else:
            gb = ga
        wpa = tl.load(pa_ptr + n[:, None] * C + cc[None, :], mask=wmask, other=0.0)
        wpb = tl.load(pb_ptr + n[:, None] * C + cc[None, :], mask=wmask, other=0.0)
        if LOWP:
            ga = ga.to(pa_ptr.dtype.element_ty)
            gb = gb.to(pa_ptr.dtype.element_ty)
        else:
            wpa = wpa.to(tl.float32)
            wpb = wpb.to(tl.float32)
        da = _mm(ga, wpa, da, IEEE)
        db = _mm(gb, wpb, db, IEEE)
    da_pre = _act_grad(da, a_pre, ACT)
    db_pre = _act_grad(db, b_pre, ACT)

    sm = pm[:, None] & cm[None, :]
    s_off = bi * P * C + p[:, None] * C + cc[None, :]
    tl.store(a_s + s_off, _act(a_pre, ACT), mask=sm)
    tl.store(b_s + s_off, _act(b_pre, ACT), mask=sm)
    tl.store(dap_s + s_off, da_pre, mask=sm)
    tl.store(dbp_s + s_off, db_pre, mask=sm)

    # partials of dWa (rows 0..8) and dba (row 9) over this program's pixels
    row = part_ptr + pid0.to(tl.int64) * n_parts_row
    for ky in tl.static_range(3):
        hi = ho * STRIDE + (ky - 1)
        hm = pm & (hi >= 0) & (hi < H)
        for kx in tl.static_range(3):
            wi = wo * STRIDE + (kx - 1)
            m = hm & (wi >= 0) & (wi < W)
            xv = tl.load(x_img + hi[:, None] * sxh + wi[:, None] * sxw + cc[None, :] * sxc,
                         mask=m[:, None] & cm[None, :], other=0.0).to(tl.float32)
            tl.store(row + (ky * 3 + kx) * C + cc, tl.sum(da_pre * xv, axis=0), mask=cm)
    tl.store(row + 9 * C + cc, tl.sum(da_pre, axis=0), mask=cm)


@triton.autotune(configs=_configs([({"BLOCK_C": 32}, 4, 1), ({"BLOCK_C": 64}, 4, 1)]),
                 key=["C", "H", "W", "STRIDE", "ACT", "DTYPE_ID"])
@triton.jit
def _bwd_b1_kernel(x_ptr, wb_ptr, bb_ptr, wc_ptr, dbp_s, db1p_s, part_ptr, n_parts_row,
                   C, H, W, Ho, Wo, sxb, sxc, sxh, sxw,
                   STRIDE: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr,
                   DTYPE_ID: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    P = Ho * Wo
    n_ptiles = tl.cdiv(P, BLOCK_P)
    pid0 = tl.program_id(0)
    bi = (pid0 // n_ptiles).to(tl.int64)
    pt = pid0 % n_ptiles
    q = pt * BLOCK_P + tl.arange(0, BLOCK_P)
    qm = q < P
    qh = q // Wo
    qw = q % Wo
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cc < C
    x_img = x_ptr + bi * sxb
    row = part_ptr + pid0.to(tl.int64) * n_parts_row

    b1_pre = _dw_x(x_img, wb_ptr, cc, cm, qh, qw, qm, H, W, sxc, sxh, sxw,
                   STRIDE, BLOCK_P, BLOCK_C)
    if HAS_BIAS:
        b1_pre += tl.load(bb_ptr + cc, mask=cm, other=0.0).to(tl.float32)[None, :]
    b1 = tl.where(qm[:, None], _act(b1_pre, ACT), 0.0)

    # db1[q] = sum_k db_pre[q - shift_k] * wc[k];  dWc[k] += sum_q b1[q] * db_pre[q - shift_k]
    db1 = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    dimg = dbp_s + bi * P * C
    for dy in tl.static_range(3):
        ph = qh - (dy - 1)
        hm = qm & (ph >= 0) & (ph < Ho)
        for dx in tl.static_range(3):
            pw = qw - (dx - 1)
            m = hm & (pw >= 0) & (pw < Wo)
            g = tl.load(dimg + (ph * Wo + pw)[:, None] * C + cc[None, :],
                        mask=m[:, None] & cm[None, :], other=0.0)
            wcv = tl.load(wc_ptr + cc * 9 + (dy * 3 + dx), mask=cm, other=0.0).to(tl.float32)
            db1 += g * wcv[None, :]
            tl.store(row + (dy * 3 + dx) * C + cc, tl.sum(b1 * g, axis=0), mask=cm)
            if dy == 1 and dx == 1:
                tl.store(row + 9 * C + cc, tl.sum(g, axis=0), mask=cm)  # dbc
    db1_pre = tl.where(qm[:, None], _act_grad(db1, b1_pre, ACT), 0.0)
    tl.store(db1p_s + bi * P * C + q[:, None] * C + cc[None, :], db1_pre,
             mask=qm[:, None] & cm[None, :])

    for ky in tl.static_range(3):
        hi = qh * STRIDE + (ky - 1)
        hm = qm & (hi >= 0) & (hi < H)
        for kx in tl.static_range(3):
            wi = qw * STRIDE + (kx - 1)
            m = hm & (wi >= 0) & (wi < W)
            xv = tl.load(x_img + hi[:, None] * sxh + wi[:, None] * sxw + cc[None, :] * sxc,
                         mask=m[:, None] & cm[None, :], other=0.0).to(tl.float32)
            tl.store(row + (10 + ky * 3 + kx) * C + cc, tl.sum(db1_pre * xv, axis=0), mask=cm)
    tl.store(row + 19 * C + cc, tl.sum(db1_pre, axis=0), mask=cm)


@triton.autotune(configs=_configs([({"BLOCK_P": 64, "BLOCK_C": 32}, 4, 1)]),
                 key=["C", "H", "W", "C_OUT", "STRIDE", "RES", "IEEE", "DTYPE_ID"])
@triton.jit
def _bwd_dx_kernel(wa_ptr, wb_ptr, ws_ptr, dap_s, db1p_s, gz_ptr, dx_ptr,
                   C, H, W, Ho, Wo, C_OUT, sdb, sdc, sdh, sdw,
                   STRIDE: tl.constexpr, RES: tl.constexpr, IEEE: tl.constexpr,
                   LOWP: tl.constexpr, DTYPE_ID: tl.constexpr, BLOCK_O: tl.constexpr,
                   BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    HW = H * W
    P = Ho * Wo
    n_itiles = tl.cdiv(HW, BLOCK_P)
    pid0 = tl.program_id(0)
    bi = (pid0 // n_itiles).to(tl.int64)
    i = (pid0 % n_itiles) * BLOCK_P + tl.arange(0, BLOCK_P)
    im = i < HW
    ih = i // W
    iw = i % W
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cc < C
    s_img = bi * P * C
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    # transposed depthwise: i = STRIDE * q + k - 1  ->  q = (i + 1 - k) / STRIDE
    for ky in tl.static_range(3):
        th = ih + (1 - ky)
        if STRIDE == 1:
            qh = th
            vh = im & (th >= 0) & (th < Ho)
        else:
            qh = th // STRIDE
            vh = im & (th >= 0) & ((th % STRIDE) == 0) & (qh < Ho)
        for kx in tl.static_range(3):
            tw = iw + (1 - kx)
            if STRIDE == 1:
                qw = tw
                vw = (tw >= 0) & (tw < Wo)
            else:
                qw = tw // STRIDE
                vw = (tw >= 0) & ((tw % STRIDE) == 0) & (qw < Wo)
            m = (vh & vw)[:, None] & cm[None, :]
            off = s_img + (qh * Wo + qw)[:, None] * C + cc[None, :]
            g1 = tl.load(dap_s + off, mask=m, other=0.0)
            g2 = tl.load(db1p_s + off, mask=m, other=0.0)
            wav = tl.load(wa_ptr + cc * 9 + (ky * 3 + kx), mask=cm, other=0.0).to(tl.float32)
            wbv = tl.load(wb_ptr + cc * 9 + (ky * 3 + kx), mask=cm, other=0.0).to(tl.float32)
            acc += g1 * wav[None, :] + g2 * wbv[None, :]
    gz_img = gz_ptr + bi * P * C_OUT
    if RES == 1:  # identity: STRIDE == 1, C_OUT == C, P == HW
        acc += tl.load(gz_img + i[:, None] * C_OUT + cc[None, :],
                       mask=im[:, None] & cm[None, :], other=0.0)
    if RES == 2:  # projection: only pixels on the stride grid
        vq = im & ((ih % STRIDE) == 0) & ((iw % STRIDE) == 0)
        qq = (ih // STRIDE) * Wo + (iw // STRIDE)
        for o0 in range(0, C_OUT, BLOCK_O):
            o = o0 + tl.arange(0, BLOCK_O)
            om = o < C_OUT
            g = tl.load(gz_img + qq[:, None] * C_OUT + o[None, :],
                        mask=vq[:, None] & om[None, :], other=0.0)
            wt = tl.load(ws_ptr + o[:, None] * C + cc[None, :],
                         mask=om[:, None] & cm[None, :], other=0.0)
            if LOWP:
                g = g.to(ws_ptr.dtype.element_ty)
            else:
                wt = wt.to(tl.float32)
            acc = _mm(g, wt, acc, IEEE)
    tl.store(dx_ptr + bi * sdb + cc[None, :] * sdc + ih[:, None] * sdh + iw[:, None] * sdw,
             acc.to(dx_ptr.dtype.element_ty), mask=im[:, None] & cm[None, :])


@triton.autotune(configs=_configs([({"BLOCK_NN": 32, "BLOCK_C": 32, "BLOCK_R": 64}, 4, 2),
                                   ({"BLOCK_NN": 64, "BLOCK_C": 64, "BLOCK_R": 32}, 4, 2)]),
                 key=["NN", "C", "R", "ROWS_PER_SPLIT", "IEEE", "DTYPE_ID"])
@triton.jit
def _pw_grad_kernel(g_ptr, g_col0, G_LD, a_ptr, sab, sac, sah, saw, lp_ptr, out_ptr,
                    R, P, Wo, NN, C, ROWS_PER_SPLIT,
                    IEEE: tl.constexpr, LOWP: tl.constexpr, DTYPE_ID: tl.constexpr,
                    BLOCK_NN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[split, n, c] = sum over rows r of this split of G[r, g_col0 + n] * A[r, c], where
    a row r is a pixel (image r // P, pixel r % P of Ho x Wo) and A is addressed by strides."""
    n = tl.program_id(0) * BLOCK_NN + tl.arange(0, BLOCK_NN)
    nm = n < NN
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cc < C
    sp = tl.program_id(2)
    r_lo = sp * ROWS_PER_SPLIT
    r_hi = tl.minimum(r_lo + ROWS_PER_SPLIT, R)
    acc = tl.zeros([BLOCK_NN, BLOCK_C], dtype=tl.float32)
    for r0 in range(r_lo, r_hi, BLOCK_R):
        r = (r0 + tl.arange(0, BLOCK_R)).to(tl.int64)
        rm = r < r_hi
        img = r // P
        pp = r % P
        gt = tl.load(g_ptr + r[None, :] * G_LD + g_col0 + n[:, None],
                     mask=nm[:, None] & rm[None, :], other=0.0)
        av = tl.load(a_ptr + img[:, None] * sab + (pp // Wo)[:, None] * sah
                     + (pp % Wo)[:, None] * saw + cc[None, :] * sac,
                     mask=rm[:, None] & cm[None, :], other=0.0)
        if LOWP:
            gt = gt.to(lp_ptr.dtype.element_ty)
            av = av.to(lp_ptr.dtype.element_ty)
        else:
            av = av.to(tl.float32)
        acc = _mm(gt, av, acc, IEEE)
    tl.store(out_ptr + sp.to(tl.int64) * NN * C + n[:, None] * C + cc[None, :], acc,
             mask=nm[:, None] & cm[None, :])
