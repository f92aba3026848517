"""Triton jit building blocks shared by the forward and backward kernels: the activation and
its gradient, the dot wrapper, the depthwise stencils and the row-strip recompute of the
two branches (see msfused/ops/triton_kernels.py for the design and the load counts)."""
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

# Output rows per program of the strip kernels: the b1 rows of a strip are computed once and
# reused by the three output rows that read them, so a strip of ROWS rows computes ROWS + 2
# b1 rows. Fixed (not tuned) because the strip is written out row by row below.
STRIP_ROWS = 4


def configs(specs):
    """triton.Config list from (kwargs, num_warps, num_stages); only the first under the
    interpreter, where tuning is meaningless."""
    cfgs = [triton.Config(kw, num_warps=nw, num_stages=ns) for kw, nw, ns in specs]
    return cfgs[:1] if INTERPRET else cfgs


def prune_channel_tiles(configs, named_args, **kwargs):
    """Autotune pruning: no channel tile wider than the channels need (C = 3 gets 16, not
    32 or 64: the wider tiles only add masked lanes, registers and, at C = 3, spills)."""
    c = named_args["C"]
    need = 16
    while need < c:
        need *= 2
    kept = [cfg for cfg in configs if cfg.kwargs.get("BLOCK_C", 16) <= need]
    return kept or configs[:1]


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
    """acc += a @ b on tensor cores (16-bit operands; tf32 for float32 unless IEEE)."""
    if _INTERP_DOT_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    elif IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _cat_k(p, q):
    """[p | q]: two [M, K] tiles side by side, [M, 2K]."""
    m: tl.constexpr = p.shape[0]
    k: tl.constexpr = p.shape[1]
    return tl.reshape(tl.permute(tl.join(p, q), (0, 2, 1)), (m, 2 * k))


@triton.jit
def _cat_rows(p, q):
    """[p ; q]: two [K, N] tiles stacked, [2K, N]."""
    k: tl.constexpr = p.shape[0]
    n: tl.constexpr = p.shape[1]
    return tl.reshape(tl.permute(tl.join(p, q), (2, 0, 1)), (2 * k, n))


@triton.jit
def _mm2(p, q, wp, wq, acc, IEEE: tl.constexpr):
    """acc += [p | q] @ [wp ; wq]: two products as one dot over twice their K, so that an
    accumulator has one dot (hence one MMA layout) per loop iteration; two dots into one
    accumulator made the compiler convert it between two MMA layouts every iteration."""
    return _mm(_cat_k(p, q), _cat_rows(wp, wq), acc, IEEE)


@triton.jit
def _wtap(w_ptr, cc, cm, k):
    """Tap k of a depthwise weight for channels cc, as a [1, BLOCK_C] fp32 row: loaded in the
    2-D layout of the tiles it scales (a 1-D load would need a layout conversion each use)."""
    return tl.load(w_ptr + cc[None, :] * 9 + k, mask=cm[None, :], other=0.0).to(tl.float32)


@triton.jit
def _dw_x(x_img, w_ptr, cc, cm, oh, ow, om, H, W, sxc, sxh, sxw,
          STRIDE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Depthwise 3x3 (zero padding 1, stride STRIDE, no bias) of x at output positions
    (oh, ow) [BLOCK_P] where om, channels cc [BLOCK_C] where cm; fp32 [BLOCK_P, BLOCK_C]."""
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for k in range(9):  # a loop, not unrolled, so that one tap's loads are live at a time
        hi = oh * STRIDE + (k // 3 - 1)
        wi = ow * STRIDE + (k % 3 - 1)
        m = om & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        xv = tl.load(x_img + hi[:, None] * sxh + wi[:, None] * sxw + cc[None, :] * sxc,
                     mask=m[:, None] & cm[None, :], other=0.0).to(tl.float32)
        acc += xv * _wtap(w_ptr, cc, cm, k)
    return acc


# ---------------------------------------------------------------------------------------
# the row strip: output rows r0 .. r0+3, columns wo [BW], channels cc [BLOCK_C]
# ---------------------------------------------------------------------------------------

@triton.jit
def _taps3(w_ptr, cc, cm, ROW: tl.constexpr):
    """Kernel row ROW of a depthwise weight for channels cc: three [1, BLOCK_C] fp32 taps,
    loaded once per channel chunk, in the 2-D layout of the tiles they scale."""
    p = w_ptr + cc[None, :] * 9 + ROW * 3
    m = cm[None, :]
    return (tl.load(p, mask=m, other=0.0).to(tl.float32),
            tl.load(p + 1, mask=m, other=0.0).to(tl.float32),
            tl.load(p + 2, mask=m, other=0.0).to(tl.float32))


@triton.jit
def _row_taps_ky(row_ptr, xoff, wcol, W, sxw, mrow, a0, a1, a2, b0, b1, b2,
                 ta, tw, tc, te, xs, CENTRE: tl.constexpr, STRIDE: tl.constexpr):
    """One kernel row's part of _row_taps: the x row at row_ptr (mrow: the row's validity and
    the channel mask, [1, BLOCK_C]) at columns wo*S + off, off = -(S+1) .. S+1, each tile
    loaded once and fed to every sum that reads it; a0..a2 / b0..b2 are this kernel row's
    taps of Wa / Wb. CENTRE: the stride grid's row (its off = 0 tile is the projection's
    input)."""
    for j in tl.static_range(2 * STRIDE + 3):
        # this tile: x columns wo*S + off, off = j - S - 1 (constexpr arithmetic inline: the
        # compiler refuses a constexpr name reassigned in a static loop)
        m = ((wcol >= STRIDE + 1 - j) & (wcol < W - (j - STRIDE - 1)))[:, None] & mrow
        xv = tl.load(row_ptr + (j - STRIDE - 1) * sxw + xoff, mask=m, other=0.0).to(tl.float32)
        if CENTRE and j == STRIDE + 1:
            xs = xv
        # centre column (a and b1 at wo): kx = off + 1 = j - S
        if j == STRIDE:
            ta += xv * a0
            tc += xv * b0
        elif j == STRIDE + 1:
            ta += xv * a1
            tc += xv * b1
        elif j == STRIDE + 2:
            ta += xv * a2
            tc += xv * b2
        # column wo - 1: x column (wo - 1)*S + kx - 1, so kx = off + S + 1 = j
        if j == 0:
            tw += xv * b0
        elif j == 1:
            tw += xv * b1
        elif j == 2:
            tw += xv * b2
        # column wo + 1: kx = off - S + 1 = j - 2S
        if j == 2 * STRIDE:
            te += xv * b0
        elif j == 2 * STRIDE + 1:
            te += xv * b1
        elif j == 2 * STRIDE + 2:
            te += xv * b2
    return ta, tw, tc, te, xs


@triton.jit
def _row_taps(x_img, xoff, wcol, cm2, q, H, W, sxh, sxw,
              a0, a1, a2, a3, a4, a5, a6, a7, a8, b0, b1, b2, b3, b4, b5, b6, b7, b8,
              STRIDE: tl.constexpr, BW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Depthwise sums (no bias) for output row q (a scalar, may lie outside the image) at
    the strip's columns wo: a at (q, wo); b1 at (q, wo - 1), (q, wo), (q, wo + 1); and x at
    the stride grid point (q*S, wo*S), fp32 [BW, BLOCK_C] each. xoff = the tile's offsets of
    x at (row 0, column wo*S), wcol = wo*S, cm2 = the channel mask [1, BLOCK_C]; a0..a8 and
    b0..b8 the taps of Wa and Wb.

    The three b1 columns and a read x at columns wo*S + off for off in -(S+1) .. S+1: each of
    those 2S+3 tiles per x row is loaded once and feeds every sum that uses it, so one call
    is 3 * (2S + 3) tile loads (15 at stride 1, 21 at stride 2)."""
    ta = tl.zeros([BW, BLOCK_C], dtype=tl.float32)
    tw = tl.zeros([BW, BLOCK_C], dtype=tl.float32)
    tc = tl.zeros([BW, BLOCK_C], dtype=tl.float32)
    te = tl.zeros([BW, BLOCK_C], dtype=tl.float32)
    xs = tl.zeros([BW, BLOCK_C], dtype=tl.float32)
    h0 = q * STRIDE - 1
    ta, tw, tc, te, xs = _row_taps_ky(x_img + h0 * sxh, xoff, wcol, W, sxw,
                                      cm2 & (h0 >= 0) & (h0 < H), a0, a1, a2, b0, b1, b2,
                                      ta, tw, tc, te, xs, False, STRIDE)
    ta, tw, tc, te, xs = _row_taps_ky(x_img + (h0 + 1) * sxh, xoff, wcol, W, sxw,
                                      cm2 & (h0 + 1 >= 0) & (h0 + 1 < H), a3, a4, a5, b3, b4,
                                      b5, ta, tw, tc, te, xs, True, STRIDE)
    ta, tw, tc, te, xs = _row_taps_ky(x_img + (h0 + 2) * sxh, xoff, wcol, W, sxw,
                                      cm2 & (h0 + 2 >= 0) & (h0 + 2 < H), a6, a7, a8, b6, b7,
                                      b8, ta, tw, tc, te, xs, False, STRIDE)
    return ta, tw, tc, te, xs


@triton.jit
def _b1_act(sl, sc, sr, bbv, q, wo, Ho, Wo, ACT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """b1 = act(sum + bb) at (q, wo - 1), (q, wo), (q, wo + 1); zero outside the Ho x Wo
    image (that is what zero padding of the second depthwise conv's input means)."""
    qok = (q >= 0) & (q < Ho)
    if HAS_BIAS:
        sl += bbv[None, :]
        sc += bbv[None, :]
        sr += bbv[None, :]
    ml = qok & (wo >= 1) & (wo - 1 < Wo)
    mc = qok & (wo < Wo)
    mr = qok & (wo + 1 < Wo)
    return (tl.where(ml[:, None], _act(sl, ACT), 0.0), tl.where(mc[:, None], _act(sc, ACT), 0.0),
            tl.where(mr[:, None], _act(sr, ACT), 0.0))


@triton.jit
def _b_row(u0, u1, u2, v0, v1, v2, w0, w1, w2, c0, c1, c2, c3, c4, c5, c6, c7, c8):
    """Second depthwise conv (no bias) of one output row from the b1 rows above (u), at (v)
    and below (w) it, each at columns wo - 1, wo, wo + 1; c0..c8 the taps of Wc."""
    return (u0 * c0 + u1 * c1 + u2 * c2 + v0 * c3 + v1 * c4 + v2 * c5
            + w0 * c6 + w1 * c7 + w2 * c8)


@triton.jit
def _strip_branches(x_img, wa_ptr, ba_ptr, wb_ptr, bb_ptr, wc_ptr, bc_ptr, cc, cm, r0, wo,
                    H, W, Ho, Wo, sxc, sxh, sxw, STRIDE: tl.constexpr, ACT: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BW: tl.constexpr, BLOCK_C: tl.constexpr):
    """Pre-activations of a and b, and x at the stride grid (the projection's input), for
    output rows r0 .. r0+3 at columns wo [BW] and channels cc: three [4*BW, BLOCK_C] tiles,
    row-major over the strip (rows past Ho or columns past Wo hold don't-care values).

    Rolls down the strip: each of the six b1 rows r0-1 .. r0+4 is computed once (at the three
    column shifts the second conv needs) and read by the up-to-three output rows around it;
    a and xs come from the same x loads as the b1 row of their own row. The roll is a real
    loop (not unrolled) so that only one row's loads are live at a time: unrolled, the
    compiler hoists all 90 tile loads and their 64-bit addresses and the kernel spills."""
    if HAS_BIAS:
        bbv = tl.load(bb_ptr + cc, mask=cm, other=0.0).to(tl.float32)
    else:
        bbv = tl.zeros([BLOCK_C], dtype=tl.float32)
    # loop invariants of the roll: the taps, the tile's x offsets and column indices
    a0, a1, a2 = _taps3(wa_ptr, cc, cm, 0)
    a3, a4, a5 = _taps3(wa_ptr, cc, cm, 1)
    a6, a7, a8 = _taps3(wa_ptr, cc, cm, 2)
    b0, b1, b2 = _taps3(wb_ptr, cc, cm, 0)
    b3, b4, b5 = _taps3(wb_ptr, cc, cm, 1)
    b6, b7, b8 = _taps3(wb_ptr, cc, cm, 2)
    c0, c1, c2 = _taps3(wc_ptr, cc, cm, 0)
    c3, c4, c5 = _taps3(wc_ptr, cc, cm, 1)
    c6, c7, c8 = _taps3(wc_ptr, cc, cm, 2)
    wcol = wo * STRIDE
    xoff = wcol[:, None] * sxw + cc[None, :] * sxc
    cm2 = cm[None, :]
    _, s0, s1, s2, _ = _row_taps(x_img, xoff, wcol, cm2, r0 - 1, H, W, sxh, sxw,
                                 a0, a1, a2, a3, a4, a5, a6, a7, a8,
                                 b0, b1, b2, b3, b4, b5, b6, b7, b8, STRIDE, BW, BLOCK_C)
    u0, u1, u2 = _b1_act(s0, s1, s2, bbv, r0 - 1, wo, Ho, Wo, ACT, HAS_BIAS)
    a_p, s0, s1, s2, x_p = _row_taps(x_img, xoff, wcol, cm2, r0, H, W, sxh, sxw,
                                     a0, a1, a2, a3, a4, a5, a6, a7, a8,
                                     b0, b1, b2, b3, b4, b5, b6, b7, b8, STRIDE, BW, BLOCK_C)
    v0, v1, v2 = _b1_act(s0, s1, s2, bbv, r0, wo, Ho, Wo, ACT, HAS_BIAS)
    rsel = tl.arange(0, 4)[:, None, None]
    a_st = tl.zeros([4, BW, BLOCK_C], dtype=tl.float32)
    b_st = tl.zeros([4, BW, BLOCK_C], dtype=tl.float32)
    x_st = tl.zeros([4, BW, BLOCK_C], dtype=tl.float32)
    for t in range(4):
        q = r0 + t + 1
        a_n, s0, s1, s2, x_n = _row_taps(x_img, xoff, wcol, cm2, q, H, W, sxh, sxw,
                                         a0, a1, a2, a3, a4, a5, a6, a7, a8,
                                         b0, b1, b2, b3, b4, b5, b6, b7, b8, STRIDE, BW, BLOCK_C)
        w0, w1, w2 = _b1_act(s0, s1, s2, bbv, q, wo, Ho, Wo, ACT, HAS_BIAS)
        b_t = _b_row(u0, u1, u2, v0, v1, v2, w0, w1, w2, c0, c1, c2, c3, c4, c5, c6, c7, c8)
        a_st = tl.where(rsel == t, a_p[None, :, :], a_st)
        b_st = tl.where(rsel == t, b_t[None, :, :], b_st)
        x_st = tl.where(rsel == t, x_p[None, :, :], x_st)
        u0, u1, u2 = v0, v1, v2
        v0, v1, v2 = w0, w1, w2
        a_p = a_n
        x_p = x_n
    a_pre = tl.reshape(a_st, (4 * BW, BLOCK_C))
    b_pre = tl.reshape(b_st, (4 * BW, BLOCK_C))
    xs = tl.reshape(x_st, (4 * BW, BLOCK_C))
    if HAS_BIAS:
        a_pre += tl.load(ba_ptr + cc, mask=cm, other=0.0).to(tl.float32)[None, :]
        b_pre += tl.load(bc_ptr + cc, mask=cm, other=0.0).to(tl.float32)[None, :]
    return a_pre, b_pre, xs


@triton.jit
def _strip_program(pid0, N_COLBLOCKS, N_TILES_PER_IMAGE, Ho, Wo, BW: tl.constexpr):
    """What program pid0 of a strip kernel owns (grid axis 0 = image x strip of 4 output rows
    x block of BW columns): the image (int64), the strip's first row r0, its columns [BW],
    and the row, column and validity of its 4*BW pixels, row-major over the strip."""
    bi = (pid0 // N_TILES_PER_IMAGE).to(tl.int64)
    t = pid0 % N_TILES_PER_IMAGE
    r0 = (t // N_COLBLOCKS) * 4
    c0 = (t % N_COLBLOCKS) * BW
    m = tl.arange(0, 4 * BW)
    ho = r0 + m // BW
    wo = c0 + m % BW
    return bi, r0, c0 + tl.arange(0, BW), ho, wo, (ho < Ho) & (wo < Wo)
