"""The Triton forward kernel of the block: one launch (design: msfused/ops/triton_kernels.py)."""
from __future__ import annotations

import triton
import triton.language as tl

from .triton_jit import (_act, _cat_k, _cat_rows, _mm, _mm2, _strip_branches,
                         _strip_program, configs, prune_channel_tiles)


def _prune_forward_configs(configs, named_args, **kwargs):
    """The channel tiles the input needs (prune_channel_tiles), and BLOCK_C = 16 only where the
    accumulators are at the host's cap (4*BW x BLOCK_N x accumulators = 8192 fp32): there
    BLOCK_C = 32 spills in Triton 3.6's SASS (mnet-14) and sits at 244-255 registers in 3.8
    (tools/triton_sass.py)."""
    configs = prune_channel_tiles(configs, named_args, **kwargs)
    n_acc = 2 if kwargs["MERGE"] == 0 else 1
    if 4 * kwargs["BW"] * kwargs["BLOCK_N"] * n_acc >= 8192:
        configs = [c for c in configs if c.kwargs["BLOCK_C"] == 16] or configs[:1]
    return configs


@triton.jit
def _epilogue(acc, q_ptr, bs_ptr, x_img, y_ptr, pre_ptr, yoff_px, ho, wo, pm, n, nm, ocol,
              sxc, sxh, sxw, syc, RES: tl.constexpr, HAS_BIAS: tl.constexpr,
              SAVE_PRE: tl.constexpr, ACT: tl.constexpr, ADD_QB: tl.constexpr, qb_ptr):
    """Biases, residual, activation and the store of one [pixels, BLOCK_N] output tile whose
    columns are the output channels ocol."""
    if HAS_BIAS:
        acc += tl.load(q_ptr + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        if ADD_QB:
            acc += tl.load(qb_ptr + n, mask=nm, other=0.0).to(tl.float32)[None, :]
        if RES == 2:
            acc += tl.load(bs_ptr + ocol, mask=nm, other=0.0).to(tl.float32)[None, :]
    omask = pm[:, None] & nm[None, :]
    if RES == 1:  # identity: stride 1 and C_out == C
        acc += tl.load(x_img + ho[:, None] * sxh + wo[:, None] * sxw + ocol[None, :] * sxc,
                       mask=omask, other=0.0).to(tl.float32)
    y_off = yoff_px[:, None] + ocol[None, :] * syc
    if SAVE_PRE:
        tl.store(pre_ptr + y_off, acc.to(pre_ptr.dtype.element_ty), mask=omask)
    tl.store(y_ptr + y_off, _act(acc, ACT).to(y_ptr.dtype.element_ty), mask=omask)


@triton.autotune(
    # 8 warps: at 4 warps the strip and two accumulators spill at some benchmark shapes
    # (tools/triton_sass.py)
    configs=configs([
        ({"BLOCK_C": 16}, 8, 1),
        ({"BLOCK_C": 32}, 8, 1),
    ]),
    prune_configs_by={"early_config_prune": _prune_forward_configs},
    key=["C", "H", "W", "N", "STRIDE", "MERGE", "ACT", "RES", "HAS_BIAS", "SAVE_PRE", "IEEE",
         "DTYPE_ID", "BLOCK_N", "BW"],
)
@triton.jit
def _fwd_kernel(x_ptr, wa_ptr, ba_ptr, wb_ptr, bb_ptr, wc_ptr, bc_ptr, pa_ptr, qa_ptr,
                pb_ptr, qb_ptr, ws_ptr, bs_ptr, y_ptr, pre_ptr,
                C, H, W, Ho, Wo, N, N_COLBLOCKS, N_TILES_PER_IMAGE,
                sxb, sxc, sxh, sxw, syb, syc, syh, syw,
                STRIDE: tl.constexpr, MERGE: tl.constexpr, ACT: tl.constexpr,
                RES: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr,
                IEEE: tl.constexpr, LOWP: tl.constexpr, DTYPE_ID: tl.constexpr,
                BLOCK_N: tl.constexpr, BW: tl.constexpr, BLOCK_C: tl.constexpr):
    # axis 0: (image, strip of 4 output rows, block of BW output columns); axis 1: N tile
    pid0 = tl.program_id(0)
    bi, r0, wo_row, ho, wo, pm = _strip_program(pid0, N_COLBLOCKS, N_TILES_PER_IMAGE,
                                                Ho, Wo, BW)
    x_img = x_ptr + bi * sxb

    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nm = n < N
    # concat: acc_a is the pa half, acc_b the pb half; add: acc_a holds pa + pb
    acc_a = tl.zeros([4 * BW, BLOCK_N], dtype=tl.float32)
    acc_b = tl.zeros([4 * BW, BLOCK_N], dtype=tl.float32)
    for c0c in range(0, C, BLOCK_C):
        cc = c0c + tl.arange(0, BLOCK_C)
        cm = cc < C
        a_pre, b_pre, xs = _strip_branches(x_img, wa_ptr, ba_ptr, wb_ptr, bb_ptr, wc_ptr,
                                           bc_ptr, cc, cm, r0, wo_row, H, W, Ho, Wo,
                                           sxc, sxh, sxw, STRIDE, ACT, HAS_BIAS, BW, BLOCK_C)
        av = _act(a_pre, ACT)
        bv = _act(b_pre, ACT)
        wmask = cm[:, None] & nm[None, :]
        wpa = tl.load(pa_ptr + n[None, :] * C + cc[:, None], mask=wmask, other=0.0)
        wpb = tl.load(pb_ptr + n[None, :] * C + cc[:, None], mask=wmask, other=0.0)
        if LOWP:
            av = av.to(pa_ptr.dtype.element_ty)
            bv = bv.to(pa_ptr.dtype.element_ty)
            xs = xs.to(pa_ptr.dtype.element_ty)  # exact: xs was loaded in this dtype
        else:
            wpa = wpa.to(tl.float32)
            wpb = wpb.to(tl.float32)
        if MERGE == 0:  # concat: [a | xs] and [b | xs] against [Pa ; Ws_a] and [Pb ; Ws_b]
            if RES == 2:
                wsa = tl.load(ws_ptr + n[None, :] * C + cc[:, None], mask=wmask, other=0.0)
                wsb = tl.load(ws_ptr + (N + n)[None, :] * C + cc[:, None], mask=wmask,
                              other=0.0)
                if not LOWP:
                    wsa = wsa.to(tl.float32)
                    wsb = wsb.to(tl.float32)
                acc_a = _mm2(av, xs, wpa, wsa, acc_a, IEEE)
                acc_b = _mm2(bv, xs, wpb, wsb, acc_b, IEEE)
            else:
                acc_a = _mm(av, wpa, acc_a, IEEE)
                acc_b = _mm(bv, wpb, acc_b, IEEE)
        else:  # add: [a | b] against [Pa ; Pb], one K = 2*BLOCK_C dot
            if RES == 2:  # [a | b | xs | 0] against [Pa ; Pb ; Ws ; 0]: K = 4*BLOCK_C
                wsa = tl.load(ws_ptr + n[None, :] * C + cc[:, None], mask=wmask, other=0.0)
                if not LOWP:
                    wsa = wsa.to(tl.float32)
                acc_a = _mm2(_cat_k(av, bv), _cat_k(xs, tl.zeros_like(xs)),
                             _cat_rows(wpa, wpb), _cat_rows(wsa, tl.zeros_like(wsa)),
                             acc_a, IEEE)
            else:
                acc_a = _mm2(av, bv, wpa, wpb, acc_a, IEEE)

    yoff_px = bi * syb + ho * syh + wo * syw
    _epilogue(acc_a, qa_ptr, bs_ptr, x_img, y_ptr, pre_ptr, yoff_px, ho, wo, pm, n, nm, n,
              sxc, sxh, sxw, syc, RES, HAS_BIAS, SAVE_PRE, ACT, MERGE != 0, qb_ptr)
    if MERGE == 0:
        _epilogue(acc_b, qb_ptr, bs_ptr, x_img, y_ptr, pre_ptr, yoff_px, ho, wo, pm, n, nm,
                  N + n, sxc, sxh, sxw, syc, RES, HAS_BIAS, SAVE_PRE, ACT, False, qb_ptr)
