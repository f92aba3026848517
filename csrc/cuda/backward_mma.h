// The tensor-core backward (float16/bfloat16, and float32 on TF32 where
// torch.backends.cudnn.allow_tf32 allows it; float32 without TF32 and float64 run the same
// steps with their GEMMs on FMAs) in three launches plus nothing else:
//   1. block_backward_mma.cu  per (channel block of 32, pixel split): gz = grad_y * act'(saved)
//      on the fly, a, b, xs recomputed from x (the forward's phase 1), the data gradients of
//      the pointwise convs and the projection on tensor cores (written as the pixel-major
//      scratch below) and their weight gradients on tensor cores, one partial per fixed
//      pixel group;
//   2. block_backward_dw.cu   per (input tile, channel block): the depthwise gradients from the
//      scratch, dx, and one partial of the depthwise weight/bias gradients per tile;
//   3. block_backward_mma.cu  the fixed-order reduction of both kinds of partials.
// No float atomics anywhere: the same bits run to run and whatever the split count.
// Plain C++ (no CUDA headers), shared by the launchers and the emulator's driver.
#pragma once
#ifndef MSFUSED_CUDA_EMU
#include <cuda_runtime.h>
#endif

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <type_traits>

#include "block_desc.h"

namespace msfused {
namespace cuda {

// Depthwise partials per channel, in this order: dwa[9] dba dwb[9] dbb dwc[9] dbc.
constexpr int BWD_NDW = 30;

// The partials' (and the on-chip sums') type for elements of type T: float, double for
// float64 (the kernels' AccT, without the CUDA headers).
template <typename T>
using bwd_acc_t = std::conditional_t<sizeof(T) == 8, double, float>;

// The scratch between launches 1 and 2, each pixel-major (B, Ho, Wo, C) in the dtype T:
//   da:  dL/da_pre  (the gradient of branch A's depthwise output before its activation)
//   db:  dL/db_pre  (the same for the second depthwise conv of branch B)
// The gradient reaching x[b, c, s*oh, s*ow] through the shortcut (projection: ws^T gz;
// identity: gz) needs no scratch: launch 1 writes it into dx there, in x's layout, and
// launch 2, which owns every dx element in one CTA, reads it back and adds the rest.

// Where x[b, c, h, w] (and so dx's element) lies in x's layout.
MSF_HD int64_t dx_index(const BlockDesc& d, int64_t b, int64_t h, int64_t w, int64_t c) {
  return d.channels_last ? ((b * d.H + h) * d.W + w) * d.C + c
                         : ((b * d.C + c) * d.H + h) * d.W + w;
}

// Launch 2's partials: dw_part[(part * C + c) * BWD_NDW + v], one part per input tile; every
// element for c < C is written (zero where the tile owns no output pixel).
int64_t backward_dw_parts(const BlockDesc& d);
// Launch 2's dynamic shared memory per CTA, in bytes, for elements of esz bytes.
size_t backward_dw_smem(const BlockDesc& d, int esz);

template <typename T>
const char* launch_backward_dw(const BlockDesc& d, const BlockTensors<T>& t, const T* da,
                               const T* db, T* dx, bwd_acc_t<T>* dw_part, cudaStream_t stream);

// ---- launch 1's plan -------------------------------------------------------------------
// A CTA owns a block of CB = nchunk x 32 input channels (chunks of depthwise_tile.cuh) and a
// split of the pixel groups; a group is GT consecutive TH x 8 output tiles (images in turn,
// each column by column, top to bottom: from one tile to the next down a column the CTA
// keeps the S + 3 rows of x the two share, like the forward), and its weight-gradient
// partial is written once: wpart[(group * rows + row) * C +
// c], rows = [dpa (N) | dpb (N) | dws (Cout, projection only)], bpart[group * rows + row] the
// bias sums. The groups depend on the shape only, so the split count (the grid) changes which
// CTA sums a group, never the bits of the result.
constexpr int BWD_KC = 32;    // channels per chunk: one chunk of depthwise_tile.cuh
constexpr int BWD_TW = 8;     // tile width
constexpr int BWD_PAD = 8;    // 16 bytes of row padding (16-bit elements): ldmatrix banks
// Weight-gradient accumulator slots (m16 tile x chunk: 16 per lane) per warp for elements of
// esz bytes: four, two for float64, whose accumulators take two registers each (the same 128
// registers), and the m16 tiles of weight-gradient rows one CTA holds.
constexpr int bwd_wmt(int esz) { return esz == 8 ? 2 : 4; }
constexpr int bwd_rows_mt(int esz) { return 8 * bwd_wmt(esz); }

struct BwdMmaPlan {
  int TH, P;                   // tile TH x 8, P = 8 TH pixels (16, 32 or 64)
  int tiles_w, tiles_h, tiles_hw;  // tiles per image row / column / image
  int64_t tiles;               // B * tiles_hw
  int GT;                      // tiles per group
  int64_t groups;              // ceil(tiles / GT)
  int split;                   // CTAs per channel block (grid y)
  int nchunk, CB, cblocks;     // chunks per CTA, CB = 32 nchunk channels, ceil(C / CB) blocks
  int XR, C16;                 // staged x rows (the columns: the kernel's S (8 + 1) + 3);
                               // C rounded up to 16
  int HR;                      // of the staged rows, those the next tile down shares (0:
                               // none carried, where shared memory is short)
  int N16, gzb, GW, LDG;       // branch width rounded to 16; gz columns: branch B's first
                               // (concat N16, add 0), the width (concat 2 N16, add N16),
                               // the row (GW + pad)
  int mt_a, MT;                // weight-gradient m16 tiles: dpa, dpb (mt_a each), dws (the rest)
  int rblocks;                 // row blocks: CTAs per channel block sharing the MT tiles, at
                               // most bwd_rows_mt(esz) each (1 unless MT exceeds that)
  int rows;                    // partial rows: 2 N + (projection ? Cout : 0)
  int slice_imgs;              // launches 1 and 2 run per slice of slice_imgs images (the
                               // last may hold fewer), the scratch holding one slice
  int LDA, LDD, LDWT;          // rows of A = [a | b | xs | a_lo | b_lo] (the lo: a - (T)a;
                               // none for float), of act' (float), of a weight slice
  uint32_t off_x0, off_x1, off_b1, off_dw, off_a, off_d, off_g, off_h, smem;
  bool dg_half;                 // data-gradient units are (weight, 16-channel half), not weights
  uint32_t off_w, w_slice[6];  // the data-gradient weight slices a row block owns, packed from
                               // off_w (bwd_wslice_offset); bytes per unit (0: none)
  // the groups' partials summed across a thread-block cluster of `red` CTAs along grid y
  // (groups red q .. red q + red - 1 into partial q, in group order) before they are written:
  // parts = ceil(groups / red) partials (red 1: one per group)
  int red;
  int64_t parts;
  // workspace (bytes, 256-aligned): scratch da, db; partials wpart, bpart, dwpart
  size_t ws_da, ws_db, ws_wpart, ws_bpart, ws_dwpart, ws_total;
};

// The staging through which a cluster sums its CTAs' weight-gradient accumulators: one
// accumulator slot of every warp (8 warps x 16 x 32 values), then the bias sums (2 NT).
MSF_HD size_t bwd_red_bytes(int esz) { return size_t(8 * 16 * 32) * (esz == 8 ? 8 : 4); }

inline size_t bwd_align(size_t v, size_t a) { return (v + a - 1) / a * a; }

// The data gradients come in units: a weight `which` (0: da_pre with pa, 1: db_pre with pb,
// 2: the projection's with ws), or, with dg_half, a (which, h) pair, unit 2 which + h, for
// the chunk's 16-channel half h (a slice of BWD_LDH-element rows instead of LDWT). Unit u
// belongs to row block u % rblocks, which alone computes it and holds its weight slice in
// shared memory: with several row blocks they share the data gradients instead of each
// holding every slice, so a wide block's CTA fits shared memory with no work or traffic
// added (each data-gradient element still has exactly one writer).
constexpr int BWD_LDH = 24;  // half-slice row: 16 + 8 (16-bit: 48 bytes, 4-byte: 24 words;
                             // both keep ldmatrix's and TF32's fragment loads conflict-free)
MSF_HD int bwd_dgrad_owner(int unit, int rblocks) { return unit % rblocks; }

// Where unit u's weight slice lies in its owner's shared memory: after the owner's
// lower-numbered units'.
MSF_HD uint32_t bwd_wslice_offset(const BwdMmaPlan& p, int u) {
  uint32_t o = p.off_w;
  for (int w = u % p.rblocks; w < u; w += p.rblocks) o += p.w_slice[w];
  return o;
}

// The plan for elements of esz bytes and a block's shared memory of smem_block bytes; P == 0
// when the shape does not fit (the caller runs the FMA backward then). force_split > 0 sets
// the split count (for testing that it does not change the result); force_gt > 0 the tiles
// per group (for measuring a large batch's traffic on a few images).
inline BwdMmaPlan plan_backward_mma(const BlockDesc& d, int esz, size_t smem_block,
                                    int force_split, int force_gt = 0,
                                    size_t scratch_budget = 0, bool keep_wave = false,
                                    int red = 1) {
  BwdMmaPlan p{};
  const int64_t N16 = (d.N + 15) / 16 * 16;
  const int64_t GW = d.merge == kConcat ? 2 * N16 : N16;
  const int64_t rows16 = 2 * N16 + (d.projection ? GW : 0);
  // Wider blocks than the 8 x bwd_wmt accumulator slots of one CTA hold (2 N + a projection's
  // C_out above 512 rows, 256 for float64) split the rows over row blocks of one chunk each:
  // every row block stages x and gz and recomputes the chunk's operands for its rows' weight
  // gradients, and the data gradients are shared out among them (bwd_dgrad_owner).
  const int rows_mt = bwd_rows_mt(esz);
  if (d.C > (int64_t(1) << 20) || rows16 > int64_t(64) * rows_mt * 16) return p;
  // float (TF32): 32-bit fragments come through scalar shared loads, not ldmatrix. gz is read
  // along rows (data gradients: lanes g, t at g LDG + t) and down columns (weight gradients:
  // t LDG + g), the weights and A down columns only; a row pitch of 4 (mod 32) words keeps
  // the first in 32 distinct banks (the second 2-way), 8 (mod 32) the others. float64 (FMAs,
  // gradcheck only) takes float's layout: even pitches, for its 16-byte operand pairs.
  const bool wide = esz >= 4;
  p.N16 = int(N16);
  p.gzb = d.merge == kConcat ? int(N16) : 0;
  p.GW = int(GW);
  p.LDG = p.GW + (wide ? 4 : BWD_PAD);
  p.mt_a = int(N16 / 16);
  p.MT = int(rows16 / 16);
  p.rblocks = (p.MT + rows_mt - 1) / rows_mt;
  p.rows = int(2 * d.N + (d.projection ? d.Cout : 0));
  p.C16 = int((d.C + 15) / 16 * 16);
  // [a | b | xs | a_lo | b_lo]; float has no lo (the tensor cores read a and b as tf32, as
  // eager's TF32 convolutions do), nor has float64
  p.LDA = (wide ? 3 : 5) * BWD_KC + BWD_PAD;
  p.LDD = 2 * BWD_KC + 4;
  // As many chunks per CTA as the 8 x bwd_wmt accumulator slots hold (each chunk needs MT):
  // gz, staged once per tile, then serves them all, and fewer channel blocks re-read dy.
  int nc0 = p.rblocks > 1 ? 1 : rows_mt / p.MT;
  const int chunks_c = int((d.C + BWD_KC - 1) / BWD_KC);
  if (nc0 > chunks_c) nc0 = chunks_c;
  if (nc0 < 1) nc0 = 1;
  const size_t H = size_t(esz), F = esz == 8 ? 8 : 4;  // elements; sums and partials
  // 8 rows unless the image is shorter; where shared memory is short, first no carried rows
  // (they save x's halo re-reads; a chunk less re-reads dy and y once more), then fewer
  // chunks, then fewer rows
  for (int th = d.Ho <= 2 ? 2 : (d.Ho <= 4 ? 4 : 8); th >= 2 && p.P == 0; th /= 2) {
    for (int step = 2 * nc0; step >= 1 && p.P == 0; --step) {
      const int nc = (step + 1) / 2;
      const bool carry = step % 2 == 0;
      p.nchunk = nc;
      p.CB = nc * BWD_KC;
      p.LDWT = p.CB + BWD_PAD;
      p.TH = th;
      p.P = th * BWD_TW;
      p.XR = d.stride * (th + 1) + 3;
      const int XC = d.stride * (BWD_TW + 1) + 3;
      size_t o = 0;
      auto take = [&](size_t bytes) {
        const uint32_t at = uint32_t(o);
        o = bwd_align(o + bytes, 128);
        return at;
      };
      const size_t xst = H * size_t(p.XR) * XC * BWD_KC;
      p.off_x0 = take(xst);
      p.off_x1 = take(xst);
      p.off_b1 = take(F * size_t(th + 2) * (BWD_TW + 2) * BWD_KC);
      p.off_dw = take(F * 30 * size_t(p.CB));
      p.off_a = take(H * size_t(p.P) * p.LDA);
      p.off_d = take(F * size_t(p.P) * p.LDD);
      p.off_g = take(H * size_t(p.P) * p.LDG);
      // the weight slices: the largest set one row block owns, by weight or (several row
      // blocks, one chunk each) by half where that is less
      size_t wmax = 0;
      for (int half = 0; half < (p.rblocks > 1 ? 2 : 1); ++half) {
        uint32_t sl[6] = {};
        const int units = half ? 6 : 3;
        for (int u = 0; u < units; ++u) {
          const int which = half ? u / 2 : u;
          const size_t rows = which < 2 ? size_t(N16) : (d.projection ? size_t(GW) : 0);
          sl[u] = uint32_t(bwd_align(H * rows * (half ? BWD_LDH : p.LDWT), 128));
        }
        size_t most = 0;
        for (int rb = 0; rb < p.rblocks && rb < units; ++rb) {
          size_t own = 0;
          for (int u = rb; u < units; u += p.rblocks) own += sl[u];
          if (own > most) most = own;
        }
        if (half == 0 || most < wmax) {
          wmax = most;
          p.dg_half = half != 0;
          for (int u = 0; u < 6; ++u) p.w_slice[u] = sl[u];
        }
      }
      p.off_w = take(wmax);
      p.HR = carry ? d.stride + 3 : 0;
      p.off_h = take(H * size_t(nc) * p.HR * XC * BWD_KC);  // the carried rows, per chunk
      p.smem = uint32_t(o);
      if (p.smem > smem_block) p.P = 0;
    }
  }
  if (p.P == 0) return p;
  p.cblocks = int((d.C + p.CB - 1) / p.CB);
  p.tiles_w = int((d.Wo + BWD_TW - 1) / BWD_TW);
  p.tiles_h = int((d.Ho + p.TH - 1) / p.TH);
  p.tiles_hw = p.tiles_h * p.tiles_w;
  p.tiles = d.B * p.tiles_hw;
  // Group size from the shape alone: a partial (rows x C floats, written and read back)
  // costs at most about 1/8 of the group's own traffic (x, dy, y in; da, db, dx out), but
  // the groups times the channel blocks fill at least one wave of a 132-SM GPU where the
  // shape allows.
  const double part = 2.0 * p.rows * d.C * 4;
  const double per_tile = double(p.P) * (4.0 * d.C + 2.0 * d.Cout) * esz;
  int64_t gt = int64_t(std::ceil(part / (per_tile / 8)));
  const int64_t wave = (p.tiles * p.cblocks * p.rblocks + 131) / 132;
  if (gt > wave) gt = wave;
  if (force_gt > 0) gt = force_gt;
  if (gt > p.tiles) gt = p.tiles;
  if (gt < 1) gt = 1;
  p.GT = int(gt);
  p.groups = (p.tiles + gt - 1) / gt;
  int64_t split = force_split > 0 ? force_split : p.groups;
  if (split > p.groups) split = p.groups;
  if (split > 65535) split = 65535;
  p.split = int(split);
  if (p.tiles > 0x7fffffff) { p.P = 0; return p; }
  // Batch slices: where the scratch of the whole batch (da, db) exceeds scratch_budget
  // bytes (0: no limit), launches 1 and 2 run slice by slice, so the scratch holds one
  // slice: the training step's peak memory falls by the rest, and launch 2 reads what
  // launch 1 just wrote while it is still in L2. A slice is a whole number of groups
  // (images x tiles_hw a multiple of GT), so every group, partial and sum is the unsliced
  // one's: the same bits whatever the budget. keep_wave: no slice smaller than a wave of
  // launch-1 CTAs (132, one per SM), so slicing never leaves SMs idle that one launch over
  // the batch would use (at the benchmark's batches that means one slice; at batch 128 and
  // 56x56, four).
  const int64_t img_tiles = p.tiles_hw, gq = gt / std::gcd(gt, img_tiles);  // images per
  const size_t scratch_img = H * size_t(d.Ho * d.Wo) * d.C * 2;  // whole groups
  int64_t si = d.B;
  if (scratch_budget > 0 && scratch_img * size_t(d.B) > scratch_budget) {
    si = int64_t(scratch_budget / scratch_img) / gq * gq;
    if (si < gq) si = gq;
    if (keep_wave) {
      const int64_t per_img = img_tiles * p.cblocks * p.rblocks;  // CTA-groups x GT
      const int64_t wave_imgs = (132 * gt + per_img - 1) / per_img;
      const int64_t min_si = (wave_imgs + gq - 1) / gq * gq;
      if (si < min_si) si = min_si;
    }
    if (si > d.B) si = d.B;
  }
  p.slice_imgs = int(si);
  // Partials summed across clusters of `red` CTAs along y (asked for by the caller): only
  // for one channel and row block (grid x of 1; wider grids share gz across x instead), one
  // batch slice, and where the operand tiles A, act' and gz (free at a group's end) hold the
  // staging. The split becomes a multiple of red, so that the CTAs of a cluster always hold
  // red consecutive groups starting at a multiple of red: the sums do not depend on it.
  p.red = 1;
  if (red > 1 && p.cblocks * p.rblocks == 1 && si == d.B && p.groups > 1 &&
      p.off_w - p.off_a >= bwd_red_bytes(esz)) {
    p.red = red;
    const int64_t most = (p.groups + red - 1) / red * red;
    int64_t sp = (int64_t(p.split) + red - 1) / red * red;
    if (sp > most) sp = most;
    if (sp > 65535) sp = 65535 / red * red;
    p.split = int(sp);
  }
  p.parts = (p.groups + p.red - 1) / p.red;
  // workspace
  const int64_t pix = si * d.Ho * d.Wo;
  size_t w = 0;
  auto wtake = [&](size_t bytes) {
    const size_t at = w;
    w = bwd_align(w + bytes, 256);
    return at;
  };
  p.ws_da = wtake(H * size_t(pix) * d.C);
  p.ws_db = wtake(H * size_t(pix) * d.C);
  p.ws_wpart = wtake(F * size_t(p.parts) * p.rows * d.C);
  p.ws_bpart = wtake(F * size_t(p.parts) * p.rows);
  p.ws_dwpart = wtake(F * size_t(backward_dw_parts(d)) * d.C * BWD_NDW);
  p.ws_total = w;
  return p;
}

// Launch 1 (and, chained, 2 and 3) for float16/bfloat16, float and double: the backward of the
// block with its GEMMs on tensor cores (float: on TF32 where tf32 allows, else exact FMAs;
// double: FMAs), with the
// workspace of plan_backward_mma; *launched false (nothing run) when the shape does not fit
// the plan.
template <typename T>
const char* launch_block_backward_mma(const BlockDesc& d, const BlockTensors<T>& t,
                                      const T* grad_y, const T* saved, const BlockGrads<T>& g,
                                      void* workspace, bool tf32, cudaStream_t stream,
                                      bool* launched);

// The plan for the current device (and MSFUSED_CUDA_BWD_SPLIT, a forced split count).
BwdMmaPlan backward_mma_plan(const BlockDesc& d, int esz);

}  // namespace cuda
}  // namespace msfused
