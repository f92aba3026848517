// Host-side plan of the float16/bfloat16 forward (block_forward_mma.cu): the output tile, the
// K layout of the GEMM operand in shared memory, which 16-byte paths the pointers allow, and
// the shared-memory map. Plain C++ (no CUDA headers): the launcher, the emulator's driver
// and its tile table use the same function.
//
// The kernel's CTA owns a column of `run` TH x TW tiles of output pixels of one image, one
// below the other, and computes every output channel for each. Per tile, phase 1 streams x
// through shared memory in chunks of KC channels and writes the GEMM operand A = [a | b | xs]
// for every input channel, 16-bit, pixel-major; phase 2 runs the pointwise / projection GEMM
// out of it for each block of NB output channels, with the weights streamed in K-slices of
// KB. Going down its column the CTA keeps, for every chunk, the last S + 3 staged rows of x
// (those the next tile's halo shares with this one), so a run stages x from global memory
// once over its tiles plus one halo, not once per tile plus its halo.
//
// Optionally (cluster > 1: thread-block clusters on sm_90, MSFUSED_CUDA_FWD_CLUSTER=1, float16
// and bfloat16) a cluster of `cluster` CTAs shares each run: rank r stages x and computes A's
// columns for the chunks r, r + cluster, ... over all of a tile's pixels, and after a cluster
// barrier copies the other ranks' columns out of their shared memory, either for its share of
// the tile's 16-pixel rows (cluster_rows: it then multiplies those rows by every weight) or
// for every row (it then multiplies them by the GEMM blocks rank, rank + cluster, ...: a
// 1 / cluster share of the weights, which dominate the traffic of wide blocks). x is read
// once per cluster, so a tile `cluster` times the work of one CTA's costs no more x halo than
// that CTA's, and the SMs a single CTA per tile would leave idle get work.
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>

#include "block_desc.h"

namespace msfused {
namespace cuda {

constexpr int MMA_NT = 256;  // threads per CTA (8 warps)
constexpr int MMA_KC = 32;   // input channels per staged chunk
constexpr int MMA_NB = 64;   // output channels per GEMM block
constexpr int MMA_KB = 64;   // K per staged weight slice
// 16 bytes of row padding (8 16-bit or 4 float elements): the 8 rows an ldmatrix reads, and
// the 8 rows x 4 columns of a tf32 fragment's shared loads, land in distinct banks (2 double
// elements: float64's rows stay 16-byte aligned for its 128-bit operand pairs).
MSF_HD constexpr int mma_pad(int esz) { return 16 / esz; }
MSF_HD constexpr int mma_ldw(int esz) { return MMA_KB + mma_pad(esz); }  // weight slice row
constexpr int MMA_LDO = MMA_NB + 4;        // row of the output tile (accumulation type)
constexpr int MMA_MAX_P = 256;             // pixels per tile: 8 warps x 2 x 16 rows

struct MmaPlan {
  int esz;                    // element size: 2 (float16/bfloat16), 4 (float32), 8 (float64)
  int TH, TW, P;              // output tile: TH x TW pixels, P = TH * TW, a multiple of 16
  int tiles_w, tiles_h, tiles_hw;  // tiles per image row / column / image
  int run, runs_h;            // tiles per CTA down a column; CTAs per column of tiles
  int XR, XC;                 // staged x tile (tile plus the halo of both convs)
  int HR;                     // of its rows, those the next tile down shares (carried)
  int C16;                    // C rounded up to 16: each operand segment's width
  int seg_a, seg_b, seg_x;    // K offset of a, b and the strided x in A (-1: absent)
  int LDA;                    // row of A (elements): the segments plus mma_pad
  int nblk_a, nblk;           // GEMM blocks of branch A (concat) and in all
  int cluster;                // CTAs sharing each run (1: none; header)
  bool cluster_rows;          // the ranks split the tile's rows (else the GEMM blocks)
  bool vec_x, vec_w, vec_y;   // 16-byte paths: x (cp.async), weights (cp.async), y (stores)
  uint32_t off_a, off_x0, off_x1, off_b1, off_dw, off_w0, off_w1, off_o, off_h, smem;  // bytes
};

// What the plan needs of the GPU: shared memory per block (opt-in) and per SM, SM count.
struct MmaDevice {
  size_t smem_block, smem_sm;
  int sms;
  int force_th, force_tw, force_run;  // a tile (and run) to use where it fits (0: the cost
                                      // model's), for measuring
  double x_max;  // > 0: only plans that stage x at most this many times (the cheapest of
                 // them; the fewest x bytes if none does), for measuring
  int cluster_max;    // the largest cluster a plan may use (1: none; 2 or 4)
  int force_cluster;  // with force_th / force_tw: that cluster size (up to cluster_max; 0:
                      // the cost model's) and split (force_split 1: rows, 2: blocks, 0: any)
  int force_split;
};

inline int mma_stage_rows(int s, int th) { return s * (th + 1) + 3; }

// Staged rows the next tile down the column shares with this one (XR - S TH), carried.
MSF_HD constexpr int mma_carry_rows(int s) { return s + 3; }

inline uint32_t mma_align128(size_t v) { return uint32_t((v + 127) & ~size_t(127)); }

// K layout: add [a | b | xs], concat [a | xs | b], so every GEMM block reads one contiguous
// K range: add all of it, concat branch A [a | xs] and branch B [xs | b]. xs is there for a
// projection (a GEMM input) or, with identity_in_a, an identity residual (read by the
// epilogue only; without it the epilogue reads x from global memory).
inline void mma_plan_segments(const BlockDesc& d, MmaPlan& p, bool identity_in_a) {
  p.C16 = int((d.C + 15) / 16 * 16);
  const bool xs = d.residual && (d.projection || identity_in_a);
  int k = 0;
  p.seg_a = k; k += p.C16;
  if (d.merge == kConcat) {
    p.seg_x = xs ? k : -1; k += xs ? p.C16 : 0;
    p.seg_b = k; k += p.C16;
  } else {
    p.seg_b = k; k += p.C16;
    p.seg_x = xs ? k : -1; k += xs ? p.C16 : 0;
  }
  p.LDA = k + mma_pad(p.esz);
}

// K range [lo, hi) of GEMM block blk.
MSF_HD void mma_block_k_range(const BlockDesc& d, const MmaPlan& p, int blk, int& lo, int& hi) {
  const bool proj = d.projection;
  if (d.merge != kConcat) {
    lo = 0;
    hi = 2 * p.C16 + (proj ? p.C16 : 0);
  } else if (blk < p.nblk_a) {
    lo = p.seg_a;
    hi = p.seg_a + p.C16 + (proj ? p.C16 : 0);
  } else {
    lo = proj ? p.seg_x : p.seg_b;
    hi = p.seg_b + p.C16;
  }
}

// Cluster sizes are 1, 2 or 4: x / K and x % K as a shift and a mask (K >> 1 is log2 K), so
// that the kernel's share arithmetic has no integer division.
MSF_HD constexpr int mma_div_k(int x, int K) { return x >> (K >> 1); }
MSF_HD constexpr int mma_mod_k(int x, int K) { return x & (K - 1); }
// Chunks of MMA_KC channels over the C16 columns of a segment, and of them those rank r of
// a cluster of K owns (chunks r, r + K, ...).
MSF_HD constexpr int mma_chunks(int c16) { return (c16 + MMA_KC - 1) / MMA_KC; }
MSF_HD constexpr int mma_rank_chunks(int c16, int r, int K) {
  return mma_div_k(mma_chunks(c16) - r + K - 1, K);
}
// The first 16-pixel row of a P-pixel tile that rank r of a cluster of K multiplies (r = K:
// the tile's end) where the ranks split the rows; their shares differ by at most one row.
MSF_HD constexpr int mma_rank_row(int P, int r, int K) { return mma_div_k(P / 16 * r, K); }
// The GEMM blocks rank r of a cluster of K multiplies where the ranks split the blocks
// (blocks r, r + K, ...).
MSF_HD constexpr int mma_rank_blocks(int nblk, int r, int K) {
  return mma_div_k(nblk - r + K - 1, K);
}
static_assert(mma_rank_row(80, 1, 4) == 1 && mma_rank_row(80, 3, 4) == 3 &&
                  mma_rank_row(80, 4, 4) == 5 && mma_rank_chunks(80, 1, 2) == 1 &&
                  mma_rank_chunks(96, 0, 4) == 1 && mma_rank_blocks(3, 0, 2) == 2,
              "the shares of clusters of 2 and 4");

// The segments of A (bit 0: a, 1: b, 2: xs) that rank r of a cluster of K reads: those its
// GEMM blocks' K ranges cover (every block's where the ranks split the rows), and xs where the
// epilogue adds an identity residual from it. The columns it copies from the other ranks.
MSF_HD int mma_rank_segments(const BlockDesc& d, const MmaPlan& p, int r, int K) {
  const bool rows = K == 1 || p.cluster_rows;
  int mask = p.seg_x >= 0 && d.residual && !d.projection ? 4 : 0;
  for (int blk = rows ? 0 : r; blk < p.nblk; blk += rows ? 1 : K) {
    int lo, hi;
    mma_block_k_range(d, p, blk, lo, hi);
    if (p.seg_a < hi && p.seg_a + p.C16 > lo) mask |= 1;
    if (p.seg_b < hi && p.seg_b + p.C16 > lo) mask |= 2;
    if (p.seg_x >= 0 && p.seg_x < hi && p.seg_x + p.C16 > lo) mask |= 4;
  }
  return mask;
}

inline void mma_plan_smem(MmaPlan& p) {
  // elements; the accumulation type's (b1, the output tile, the depthwise weights): float,
  // double for float64
  const size_t H = size_t(p.esz), F = p.esz == 8 ? 8 : 4;
  size_t o = 0;
  p.off_a = 0; o = mma_align128(o + H * size_t(p.P) * p.LDA);
  // phase 1 (x stages, b1) and phase 2 (the output tile) share one region
  const size_t region = o;
  const size_t xst = H * size_t(p.XR) * p.XC * MMA_KC;
  p.off_x0 = uint32_t(o); o = mma_align128(o + xst);
  p.off_x1 = uint32_t(o); o = mma_align128(o + xst);
  p.off_b1 = uint32_t(o); o = mma_align128(o + F * size_t(p.TH + 2) * (p.TW + 2) * MMA_KC);
  p.off_o = uint32_t(region);
  const int K = p.cluster > 1 && p.cluster_rows ? p.cluster : 1;  // (row split: fewer rows)
  const size_t rows_out = size_t(16) * (mma_rank_row(p.P, 1, K) + (p.P / 16 % K != 0));
  const size_t out_end = mma_align128(region + F * rows_out * MMA_LDO);
  if (out_end > o) o = out_end;
  p.off_dw = uint32_t(o); o = mma_align128(o + F * 30 * MMA_KC);  // phase 2: the block's biases
  p.off_w0 = uint32_t(o); o = mma_align128(o + H * size_t(MMA_NB) * mma_ldw(p.esz));
  p.off_w1 = uint32_t(o); o = mma_align128(o + H * size_t(MMA_NB) * mma_ldw(p.esz));
  // the carried rows of every chunk this CTA stages (a run of one tile carries nothing)
  const size_t nchunks = size_t(mma_rank_chunks(p.C16, 0, p.cluster > 1 ? p.cluster : 1));
  p.off_h = uint32_t(o);
  if (p.run > 1) o = mma_align128(o + H * nchunks * p.HR * p.XC * MMA_KC);
  p.smem = uint32_t(o);
}

// Input rows (or columns) staged inside the image over one image's runs of `run` tiles each
// (a run stages the rows its tiles share once).
inline int64_t mma_staged_extent(int64_t n_out, int64_t n_in, int tile, int s, int run) {
  int64_t sum = 0;
  const int64_t span = int64_t(tile) * run, staged = s * (span + 1) + 3;
  for (int64_t t0 = 0; t0 < n_out; t0 += span) {
    int64_t lo = s * (t0 - 1) - 1, hi = lo + staged;
    if (lo < 0) lo = 0;
    if (hi > n_in) hi = n_in;
    sum += hi > lo ? hi - lo : 0;
  }
  return sum;
}

// x staged from global memory over x's size: each run's rows and each tile column's columns
// inside the image, halos included.
inline double mma_x_ratio(const BlockDesc& d, const MmaPlan& p) {
  return double(mma_staged_extent(d.Ho, d.H, p.TH, d.stride, p.run)) *
         double(mma_staged_extent(d.Wo, d.W, p.TW, d.stride, 1)) / (double(d.H) * d.W);
}

// Cost of one plan: the elements its CTAs move (x staged: the in-image rows and columns of
// every run's halo, each staged once down the run; y written, padded tiles included: the
// wasted compute; weights streamed once per tile) per CTA, times the waves of CTAs the GPU
// runs (CTAs per SM from shared memory, at most two by registers: 128 x 256 threads; one
// for float64, whose kernel takes up to 255), so that a grid too small to fill the GPU, or
// a run too long for the grid, pays for it. In a cluster a CTA stages its chunks' share of x,
// writes its rows' share of y and streams every weight (row split) or writes its blocks'
// share of y and streams their weights (block split), and copies the other ranks' columns of
// its rows (in the segments it reads) out of their shared memory (counted like global
// bytes). Rank 0's share: the most.
inline double mma_plan_cost(const BlockDesc& d, const MmaPlan& p, const MmaDevice& dev) {
  const int K = p.cluster > 1 ? p.cluster : 1, M = p.P / 16;
  const double tiles = double(d.B) * p.tiles_hw;
  const double runs = double(d.B) * p.tiles_w * p.runs_h, ctas = runs * K;
  const double x = double(d.B) * d.C * mma_staged_extent(d.Ho, d.H, p.TH, d.stride, p.run) *
                   mma_staged_extent(d.Wo, d.W, p.TW, d.stride, 1);
  const double y = tiles * p.P * d.Cout;
  const bool rows = K == 1 || p.cluster_rows;
  double w = 0;  // the weights rank 0 streams per tile
  for (int blk = 0; blk < p.nblk; blk += rows ? 1 : K) {
    int lo, hi;
    mma_block_k_range(d, p, blk, lo, hi);
    w += double(hi - lo) * MMA_NB;
  }
  const double x_share = double(mma_rank_chunks(p.C16, 0, K)) / mma_chunks(p.C16);
  const double row_share = rows ? double(mma_rank_row(p.P, 1, K) + (M % K != 0)) / M : 1.0;
  const double y_share =
      rows ? row_share : double(mma_rank_blocks(p.nblk, 0, K)) / p.nblk;
  const int segs = mma_rank_segments(d, p, 0, K);
  const double gathered = tiles * row_share * p.P * p.C16 *
                          double((segs & 1) + (segs >> 1 & 1) + (segs >> 2 & 1)) * (K - 1) / K;
  const size_t per_cta = p.smem + 1024;  // the driver reserves 1 KB per CTA
  int per_sm = int(dev.smem_sm / per_cta);
  const int by_regs = p.esz == 8 ? 1 : 2;
  if (per_sm > by_regs) per_sm = by_regs;
  if (per_sm < 1) per_sm = 1;
  const double slots = double(dev.sms > 0 ? dev.sms : 1) * per_sm;
  const double waves = std::ceil(ctas / slots);
  return (x * x_share + y * y_share + tiles * w + gathered) / runs * waves;
}

// The plan with the cheapest tile and run that fit the device, for elements of esz bytes;
// P == 0 if none fits. only_*: consider that tile (and run, at most the column's tiles) only.
// An identity residual's x is kept in A (the xs segment) where some tile fits with it, else
// left out of A (a third of A for add: wide float32 and float64 blocks, C of 1024 and more)
// and read again by the epilogue.
inline MmaPlan plan_mma_forward(const BlockDesc& d, const MmaDevice& dev, int esz,
                                bool x_aligned16, bool w_aligned16, bool y_aligned16,
                                int only_th = 0, int only_tw = 0, int only_run = 0,
                                bool identity_in_a = true, int only_cluster = 0,
                                int only_split = 0) {
  MmaPlan best{}, fewest_x{};
  double best_cost = 0, fewest_x_ratio = 0, fewest_x_cost = 0;
  if (dev.force_th > 0 && dev.force_tw > 0) {
    MmaDevice free_dev = dev;
    free_dev.force_th = free_dev.force_tw = free_dev.force_run = 0;
    free_dev.force_cluster = free_dev.force_split = 0;
    free_dev.x_max = 0;
    const MmaPlan p = plan_mma_forward(d, free_dev, esz, x_aligned16, w_aligned16,
                                       y_aligned16, dev.force_th, dev.force_tw, dev.force_run,
                                       identity_in_a, dev.force_cluster, dev.force_split);
    if (p.P != 0) return p;
  }
  const int64_t nb_branch = (d.N + MMA_NB - 1) / MMA_NB;
  for (int tw : {8, 16}) {
    if (only_tw != 0 ? tw != only_tw : (tw == 16 && d.Wo <= 8)) continue;
    for (int th = 1; th <= 32; ++th) {
      if (only_th != 0 && th != only_th) continue;
      if ((th * tw) % 16 != 0 || th * tw > MMA_MAX_P) continue;
      if (only_th == 0 && th >= d.Ho + 2) continue;  // two or more rows past the image
      const int64_t tiles_h = (d.Ho + th - 1) / th, tiles_w = (d.Wo + tw - 1) / tw;
      if (tiles_h * tiles_w > 0x7fffffffLL || d.B * tiles_h * tiles_w > 0x7fffffffLL) continue;
      int prev_runs_h = 0;
      const int64_t want_run = only_run < tiles_h ? only_run : tiles_h;  // (0: any)
      for (int64_t run = 1; run <= tiles_h; ++run) {
        if (only_run != 0 && run != want_run) continue;
        const int64_t runs_h = (tiles_h + run - 1) / run;
        if (runs_h == prev_runs_h) continue;  // the same CTAs, a longer last run: no better
        prev_runs_h = int(runs_h);
        // (clusters for 16-bit elements only: block_forward_mma.cu's CL kernels)
        const int kmax = esz == 2 && dev.cluster_max > 1 ? dev.cluster_max : 1;
        for (int ks = 0; ks < 1 + 2 * (kmax >= 2) + 2 * (kmax >= 4); ++ks) {
          // no cluster, then clusters of 2 and 4 splitting the GEMM blocks or the rows
          const int K = ks == 0 ? 1 : ks < 3 ? 2 : 4;
          const bool by_rows = ks > 0 && ks % 2 == 0;
          if (only_cluster > 0 && K != only_cluster) continue;
          if (K > 1 && only_split > 0 && by_rows != (only_split == 1)) continue;
          MmaPlan p{};
          p.esz = esz;
          p.cluster = K;
          p.cluster_rows = K > 1 && by_rows;
          p.TH = th; p.TW = tw; p.P = th * tw;
          p.tiles_w = int(tiles_w);
          p.tiles_h = int(tiles_h);
          p.tiles_hw = int(tiles_h * tiles_w);
          p.run = int(run);
          p.runs_h = int(runs_h);
          p.XR = mma_stage_rows(d.stride, th);
          p.XC = mma_stage_rows(d.stride, tw);
          p.HR = mma_carry_rows(d.stride);
          mma_plan_segments(d, p, identity_in_a);
          p.nblk_a = int(nb_branch);
          p.nblk = int(d.merge == kConcat ? 2 * nb_branch : nb_branch);
          // every rank has rows (or blocks) and chunks; the grid's CTAs fit its x dimension
          if (K > 1 && ((by_rows ? K > p.P / 16 : K > p.nblk) || K > mma_chunks(p.C16) ||
                        d.B * tiles_h * tiles_w * K > 0x7fffffffLL))
            continue;
          mma_plan_smem(p);
          if (p.smem > dev.smem_block) continue;
          const double cost = mma_plan_cost(d, p, dev);
          if (dev.x_max > 0) {
            const double xr = mma_x_ratio(d, p);
            if (fewest_x.P == 0 || xr < fewest_x_ratio ||
                (xr == fewest_x_ratio && cost < fewest_x_cost)) {
              fewest_x = p;
              fewest_x_ratio = xr;
              fewest_x_cost = cost;
            }
            if (xr > dev.x_max) continue;
          }
          if (best.P == 0 || cost < best_cost) {
            best = p;
            best_cost = cost;
          }
        }  // cluster sizes (1: none)
      }
    }
  }
  if (best.P == 0) best = fewest_x;  // x_max: no plan stages x that rarely
  if (best.P == 0 && identity_in_a && d.residual && !d.projection)
    return plan_mma_forward(d, dev, esz, x_aligned16, w_aligned16, y_aligned16, only_th,
                            only_tw, only_run, false, only_cluster, only_split);
  const int v = 16 / esz;  // elements per 16 bytes
  best.vec_x = d.channels_last && d.C % v == 0 && x_aligned16;
  best.vec_w = d.C % v == 0 && w_aligned16;
  best.vec_y = d.channels_last && d.Cout % v == 0 && d.N % v == 0 && y_aligned16;
  return best;
}

}  // namespace cuda
}  // namespace msfused
