"""The Triton backward kernels of the block: five launches plus fixed-order reductions of
per-program partials (design: msfused/ops/triton_kernels.py)."""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_jit import (_ACT_NONE, _act, _act_grad, _dw_x, _mm, _strip_branches,
                         _strip_program, _wtap, configs, prune_channel_tiles)


@triton.autotune(configs=configs([({"BLOCK_P": 64, "BLOCK_O": 32}, 4, 1)]),
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


@triton.jit
def _tap_partials(row, row0, x_img, d, ho, wo, pm, cc, cm, C, H, W, sxc, sxh, sxw,
                  STRIDE: tl.constexpr):
    """Partials of a depthwise weight gradient over a program's pixels: row[(row0 + k)*C + c]
    = sum over pixels of d * x at tap k. A loop, not unrolled: unrolled, the compiler issues
    all nine [pixels, channels] loads up front and their values spill."""
    for k in range(9):
        hi = ho * STRIDE + (k // 3 - 1)
        wi = wo * STRIDE + (k % 3 - 1)
        m = pm & (hi >= 0) & (hi < H) & (wi >= 0) & (wi < W)
        xv = tl.load(x_img + hi[:, None] * sxh + wi[:, None] * sxw + cc[None, :] * sxc,
                     mask=m[:, None] & cm[None, :], other=0.0).to(tl.float32)
        tl.store(row + (row0 + k) * C + cc, tl.sum(d * xv, axis=0), mask=cm)


# The tile of the kernels that write per-program partials is fixed by the host (the partial
# buffers are sized by it); only the channel tile and warps are tuned.
# (BLOCK_C = 32 at 4 warps spills at the benchmark shapes: tools/triton_sass.py)
@triton.autotune(configs=configs([({"BLOCK_C": 16}, 4, 1), ({"BLOCK_C": 32}, 8, 1),
                                  ({"BLOCK_C": 16}, 8, 1)]),
                 prune_configs_by={"early_config_prune": prune_channel_tiles},
                 key=["C", "H", "W", "N", "STRIDE", "MERGE", "ACT", "HAS_BIAS", "IEEE",
                      "DTYPE_ID", "BW"])
@triton.jit
def _bwd_branch_kernel(x_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, wc_ptr, bc_ptr, pa_ptr,
                       pb_ptr, gz_ptr, a_s, b_s, dap_s, dbp_s, part_ptr, n_parts_row,
                       C, H, W, Ho, Wo, N, C_OUT, N_COLBLOCKS, N_TILES_PER_IMAGE,
                       sxb, sxc, sxh, sxw,
                       STRIDE: tl.constexpr, MERGE: tl.constexpr, ACT: tl.constexpr,
                       HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, LOWP: tl.constexpr,
                       DTYPE_ID: tl.constexpr, BLOCK_N: tl.constexpr, BW: tl.constexpr,
                       BLOCK_C: tl.constexpr):
    """Per (image, strip of 4 output rows x BW columns, channel tile): recompute a and b on
    the strip (the forward's roll), da = gz_a @ Pa and db = gz_b @ Pb on tensor cores,
    times act'; write a, b (in x's dtype), da_pre, db_pre (fp32) to the scratch and this
    program's partials of dWa (rows 0..8) and dba (row 9)."""
    pid0 = tl.program_id(0)
    bi, r0, wo_row, ho, wo, pm = _strip_program(pid0, N_COLBLOCKS, N_TILES_PER_IMAGE,
                                                Ho, Wo, BW)
    p = ho * Wo + wo
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cc < C
    x_img = x_ptr + bi * sxb
    P = Ho * Wo

    a_pre, b_pre, _ = _strip_branches(x_img, wa_ptr, ba_ptr, wb_ptr, bb_ptr, wc_ptr, bc_ptr,
                                      cc, cm, r0, wo_row, H, W, Ho, Wo, sxc, sxh, sxw,
                                      STRIDE, ACT, HAS_BIAS, BW, BLOCK_C)

    da = tl.zeros([4 * BW, BLOCK_C], dtype=tl.float32)
    db = tl.zeros([4 * BW, BLOCK_C], dtype=tl.float32)
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
    # pixels outside the image get exact zeros (their gz rows were masked to zero, but a
    # don't-care pre-activation could be NaN there and NaN * 0 would reach the partials)
    sm = pm[:, None] & cm[None, :]
    da_pre = tl.where(sm, _act_grad(da, a_pre, ACT), 0.0)
    db_pre = tl.where(sm, _act_grad(db, b_pre, ACT), 0.0)

    s_off = bi * P * C + p[:, None] * C + cc[None, :]
    tl.store(a_s + s_off, _act(a_pre, ACT).to(a_s.dtype.element_ty), mask=sm)
    tl.store(b_s + s_off, _act(b_pre, ACT).to(b_s.dtype.element_ty), mask=sm)
    tl.store(dap_s + s_off, da_pre, mask=sm)
    tl.store(dbp_s + s_off, db_pre, mask=sm)

    # partials of dWa (rows 0..8) and dba (row 9) over this program's pixels
    row = part_ptr + pid0.to(tl.int64) * n_parts_row
    _tap_partials(row, 0, x_img, da_pre, ho, wo, pm, cc, cm, C, H, W, sxc, sxh, sxw, STRIDE)
    tl.store(row + 9 * C + cc, tl.sum(da_pre, axis=0), mask=cm)


@triton.autotune(configs=configs([({"BLOCK_C": 32}, 4, 1), ({"BLOCK_C": 64}, 4, 1)]),
                 prune_configs_by={"early_config_prune": prune_channel_tiles},
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
    for k in range(9):  # a loop, not unrolled: see _tap_partials
        dy = k // 3
        dx = k % 3
        ph = qh - (dy - 1)
        pw = qw - (dx - 1)
        m = qm & (ph >= 0) & (ph < Ho) & (pw >= 0) & (pw < Wo)
        g = tl.load(dimg + (ph * Wo + pw)[:, None] * C + cc[None, :],
                    mask=m[:, None] & cm[None, :], other=0.0)
        db1 += g * _wtap(wc_ptr, cc, cm, k)
        tl.store(row + k * C + cc, tl.sum(b1 * g, axis=0), mask=cm)
        tl.store(row + 9 * C + cc, tl.sum(g, axis=0), mask=cm & (k == 4))  # dbc: centre tap
    db1_pre = tl.where(qm[:, None], _act_grad(db1, b1_pre, ACT), 0.0)
    tl.store(db1p_s + bi * P * C + q[:, None] * C + cc[None, :], db1_pre,
             mask=qm[:, None] & cm[None, :])

    _tap_partials(row, 10, x_img, db1_pre, qh, qw, qm, cc, cm, C, H, W, sxc, sxh, sxw, STRIDE)
    tl.store(row + 19 * C + cc, tl.sum(db1_pre, axis=0), mask=cm)


@triton.autotune(configs=configs([({"BLOCK_P": 64, "BLOCK_C": 32}, 4, 1)]),
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
    for k in range(9):  # a loop, not unrolled: see _tap_partials
        ky = k // 3
        kx = k % 3
        th = ih + (1 - ky)
        tw = iw + (1 - kx)
        if STRIDE == 1:
            qh = th
            qw = tw
            v = im & (th >= 0) & (th < Ho) & (tw >= 0) & (tw < Wo)
        else:
            qh = th // STRIDE
            qw = tw // STRIDE
            v = (im & (th >= 0) & ((th % STRIDE) == 0) & (qh < Ho)
                 & (tw >= 0) & ((tw % STRIDE) == 0) & (qw < Wo))
        m = v[:, None] & cm[None, :]
        off = s_img + (qh * Wo + qw)[:, None] * C + cc[None, :]
        g1 = tl.load(dap_s + off, mask=m, other=0.0)
        g2 = tl.load(db1p_s + off, mask=m, other=0.0)
        acc += g1 * _wtap(wa_ptr, cc, cm, k) + g2 * _wtap(wb_ptr, cc, cm, k)
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


@triton.autotune(configs=configs([({"BLOCK_NN": 32, "BLOCK_C": 32, "BLOCK_R": 64}, 4, 2),
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
