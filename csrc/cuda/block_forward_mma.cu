// The float16/bfloat16 forward in one launch, on tensor cores (mma.sync m16n8k16, ldmatrix,
// cp.async: csrc/cuda/ptx_wrappers.cuh); float32's on TF32 tensor cores or on FMAs, float64's
// on FMAs (gemm_slice_tf32, gemm_slice_fma). The plan (tile, K layout, shared-memory map) is
// csrc/cuda/forward_mma_plan.h.
//
// A CTA owns a column of `run` TH x TW tiles of output pixels of one image and computes every
// output channel of each, tile after tile down the column:
//   phase 1, per chunk of MMA_KC input channels (double-buffered: the next chunk's x is in
//     flight while this one is computed): x over the tile plus its halo lands in shared
//     memory (16-byte cp.async in channels_last with C % 8 == 0, element loads otherwise),
//     then a, b1 on the tile plus a ring (float), b and the strided x are computed on the
//     FP32 cores and written, rounded to the dtype as eager's conv outputs are, into the GEMM
//     operand A[pixel][k] (segments a, b, xs; forward_mma_plan.h). x is read once per tile
//     and a, b1, b are computed once, whatever C_out is; the rows of x a tile shares with the
//     next one down (S + 3) stay in shared memory for it instead of being read again.
//   phase 2, per block of MMA_NB output channels: the block's weights stream through two
//     shared-memory slices (cp.async) while the warps multiply out of A; each warp owns 32 of
//     the 64 channels and up to four 16-pixel rows of the tile (fragments through ldmatrix,
//     float accumulators in registers). The epilogue adds the biases and the identity
//     residual (the xs segment: x at the output pixel; x itself, from global memory, where
//     the plan left xs out of A for room), applies the activation and writes y (and the
//     pre-activation) with 16-byte stores where channels_last allows.
// Layout, merge, projection and activation are warp-uniform run-time branches outside the
// MMA loop; the stride and the tile width are template parameters (they fix the shared
// tiles' row lengths, so the index math divides by constants).
// With thread-block clusters (16-bit, MSFUSED_CUDA_FWD_CLUSTER=1; the CL kernels) 2 or 4 CTAs
// share a run: each does phase 1 for its share of the chunks, copies the others' columns of
// A out of their shared memory between two cluster barriers (gather_columns), and does phase
// 2 for its share of the rows or of the GEMM blocks (rank_share; forward_mma_plan.h).
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#include "block_cuda.h"
#include "common.cuh"
#include "forward_mma_plan.h"
#include "global_io.cuh"
#include "ptx_wrappers.cuh"
#include "depthwise_tile.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "msfused: the float16/bfloat16 forward needs bfloat16 tensor cores (sm_80 or newer); set TORCH_CUDA_ARCH_LIST to 8.0 or above"
#endif

namespace msfused {
namespace cuda {
namespace {

constexpr int NT = MMA_NT, KC = MMA_KC, NB = MMA_NB, KB = MMA_KB, LDO = MMA_LDO;
static_assert(NT == DWT_NT && KC == DWT_KC, "depthwise_tile.cuh's chunk is the plan's");

// The weight slice's row.
template <typename T> constexpr int LDW = mma_ldw(int(sizeof(T)));

// What one GEMM block computes: output channels co0 .. co0 + NB of a branch of nb channels,
// written at ch_off + co, from A's K range [k_lo, k_hi).
struct GemmBlock {
  int co0, nb, ch_off, k_lo, k_hi;
  bool branch_b;
};

__device__ __forceinline__ GemmBlock gemm_block(const BlockDesc& d, const MmaPlan& pl, int blk) {
  GemmBlock g;
  g.branch_b = d.merge == kConcat && blk >= pl.nblk_a;
  g.co0 = (g.branch_b ? blk - pl.nblk_a : blk) * NB;
  g.nb = int(d.N);
  g.ch_off = g.branch_b ? int(d.N) : 0;
  mma_block_k_range(d, pl, blk, g.k_lo, g.k_hi);
  return g;
}

// The weight of A-column k (a segment and a channel c of it) for branch channel co, or null
// where it is zero (c >= C: the segment's padding).
template <typename T>
__device__ __forceinline__ const T* weight_at(const BlockDesc& d, const MmaPlan& pl,
                                              const BlockTensors<T>& t, const GemmBlock& g,
                                              int k, int co) {
  const int C = int(d.C);
  if (k >= pl.seg_a && k < pl.seg_a + pl.C16) {
    const int c = k - pl.seg_a;
    return c < C ? t.pa + int64_t(co) * C + c : nullptr;
  }
  if (k >= pl.seg_b && k < pl.seg_b + pl.C16) {
    const int c = k - pl.seg_b;
    return c < C ? t.pb + int64_t(co) * C + c : nullptr;
  }
  const int c = k - pl.seg_x;  // the projection's segment
  return c < C ? t.ws + int64_t(g.ch_off + co) * C + c : nullptr;
}

// Weight slice [NB rows co][KB columns k] of block g at K offset kb into w (row LDW).
template <typename T>
__device__ __forceinline__ void stage_weights(const BlockDesc& d, const MmaPlan& pl,
                                              const BlockTensors<T>& t, const GemmBlock& g,
                                              int kb, T* __restrict__ w, int tid) {
  constexpr int V = VE<T>, L = LDW<T>;
  if (pl.vec_w) {
    for (int i = tid; i < NB * (KB / V); i += NT) {
      const int n = i / (KB / V), v = i % (KB / V);
      const int k = kb + V * v, co = g.co0 + n;
      const T* src = (k < g.k_hi && co < g.nb) ? weight_at(d, pl, t, g, k, co) : nullptr;
      ptx::cp_async_16(w + n * L + V * v, src != nullptr ? src : t.x, src != nullptr);
    }
  } else {
    const T zero = from_acc<T>(typename AccT<T>::type(0));
    for (int i = tid; i < NB * KB; i += NT) {
      const int n = i / KB, kk = i % KB;
      const int k = kb + kk, co = g.co0 + n;
      const T* src = (k < g.k_hi && co < g.nb) ? weight_at(d, pl, t, g, k, co) : nullptr;
      w[n * L + kk] = src != nullptr ? ldg(src) : zero;
    }
  }
}

template <typename T>
__device__ __forceinline__ typename AccT<T>::type bias_of(const BlockDesc& d,
                                                          const BlockTensors<T>& t,
                                                          const GemmBlock& g, int co) {
  typename AccT<T>::type v = 0;
  if (co >= g.nb) return v;
  const bool a = d.merge != kConcat || !g.branch_b, b = d.merge != kConcat || g.branch_b;
  if (a && t.qa != nullptr) v += to_acc(ldg(t.qa + co));
  if (b && t.qb != nullptr) v += to_acc(ldg(t.qb + co));
  if (d.projection && t.bs != nullptr) v += to_acc(ldg(t.bs + g.ch_off + co));
  return v;
}

// How the 8 warps split a GEMM block (P pixels x 64 channels): ng channel groups of 64 / ng
// (nt8 = 8 / ng n8 tiles) times 8 / ng rows of 16 pixels at a time. Tiles of at least 64
// pixels take ng = 2 (32 channels, four 16-pixel rows per warp at most); smaller ones split
// the channels finer so that every warp has work (P = 32: ng = 4; P = 16: ng = 8).
struct WarpSplit {
  int nbase, nt8, mrow, mstep, mtiles;
};

__device__ __forceinline__ WarpSplit warp_split(int P, int warp) {
  WarpSplit s;
  s.mtiles = P / 16;
  const int ng = s.mtiles >= 4 ? 2 : (s.mtiles >= 2 ? 4 : 8);
  s.nt8 = 8 / ng;
  s.nbase = (warp % ng) * (64 / ng);
  s.mrow = warp / ng;
  s.mstep = 8 / ng;
  return s;
}

// A cluster's tile (forward_mma_plan.h): copies, for this rank's rows [row_lo, row_hi) of A,
// the columns of every chunk the other ranks computed (chunks q, q + K, ... of rank q) in the
// segments it reads (mma_rank_segments) out of their shared memory, 16 bytes at a time
// (segments, chunks and rows are 16-byte multiples). The ranks' columns are final: a cluster
// barrier precedes this.
template <typename T>
__device__ __forceinline__ void gather_columns(const BlockDesc& d, const MmaPlan& pl, T* sA,
                                               unsigned rank, int K, int row_lo, int row_hi,
                                               int tid) {
  constexpr int V = VE<T>, VC = KC / V;  // elements per 16 bytes; 16-byte vectors per chunk
  const int mask = mma_rank_segments(d, pl, int(rank), K);
  const int nseg = (mask & 1) + (mask >> 1 & 1) + (mask >> 2 & 1);
  // the segments read, in order: seg0, seg1, seg2 (the first nseg of them)
  const int seg0 = mask & 1 ? pl.seg_a : mask & 2 ? pl.seg_b : pl.seg_x;
  const int seg1 = (mask & 3) == 3 ? pl.seg_b : pl.seg_x;
  const int seg2 = pl.seg_x;
  for (int q = 1; q < K; ++q) {
    const unsigned src = (rank + unsigned(q)) % unsigned(K);
    const T* peer = ptx::map_shared_rank(sA, src);
    const int per_row = mma_rank_chunks(pl.C16, int(src), K) * nseg * VC;
    for (int i = tid; i < (row_hi - row_lo) * per_row; i += NT) {
      const int p = row_lo + i / per_row, r = i % per_row;
      const int c = (int(src) + r / (nseg * VC) * K) * KC + r % VC * V;  // column in a segment
      if (c >= pl.C16) continue;  // the last chunk's columns past the segment
      const int seg = r / VC % nseg;
      const int k = (seg == 0 ? seg0 : seg == 1 ? seg1 : seg2) + c;
      *reinterpret_cast<Vec16*>(sA + p * pl.LDA + k) =
          *reinterpret_cast<const Vec16*>(peer + p * pl.LDA + k);
    }
  }
}

// This CTA's part of its cluster's tile (forward_mma_plan.h): its rank of K, the chunks it
// stages (rank, rank + K, ...), and the rows and GEMM blocks it multiplies (a share of the rows
// and every block, or every row and the blocks rank, rank + K, ...). The kernel asks for it
// where it needs it rather than keeping it in registers across the GEMM (the rank is read
// again each time: a special register, not a value the compiler may hoist).
// CL false (the kernels without clusters): one CTA per run, all of it.
struct RankShare {
  unsigned rank;
  int K, nchunks, row_lo, rows, blk0, blk_step;
};

template <bool CL>
__device__ __forceinline__ RankShare rank_share(const MmaPlan& pl) {
  RankShare r;
  r.K = CL && pl.cluster > 1 ? pl.cluster : 1;
  r.rank = r.K > 1 ? ptx::cluster_ctarank() : 0u;
  r.nchunks = mma_rank_chunks(pl.C16, int(r.rank), r.K);
  const int row_parts = CL && pl.cluster_rows ? r.K : 1;
  const int rr = mma_mod_k(int(r.rank), row_parts);
  r.row_lo = 16 * mma_rank_row(pl.P, rr, row_parts);
  r.rows = 16 * mma_rank_row(pl.P, rr + 1, row_parts) - r.row_lo;
  r.blk_step = CL && pl.cluster_rows ? 1 : r.K;
  r.blk0 = mma_mod_k(int(r.rank), r.blk_step);
  return r;
}

// One weight slice of the GEMM, 16-bit: for each 16-deep k step, the B fragments of the
// warp's channels (ldmatrix on [co][k] rows: lanes 8j .. 8j+7 address channels 8 (j / 2) ..
// +7 at k offset 8 (j % 2); with one n8 tile an x2 load, lanes 16-31 repeating 0-15) and,
// per 16-pixel row of the warp, the A fragment (ldmatrix, lane l at row l % 16, k offset
// 8 (l / 16)) and one mma.m16n8k16 per n8 tile. a points at A's column of the slice's
// first k. The nt8 branches are warp-uniform; acc's indices stay compile-time.
template <typename T>
__device__ __forceinline__ void gemm_slice_16bit(float (&acc)[4][4][4], const T* a, int LDA,
                                                 const T* w, int kend, const WarpSplit& ws,
                                                 int lane) {
  constexpr int L = LDW<T>;
  const int j8 = lane / 8, i8 = lane % 8;
  for (int kk = 0; kk < kend; kk += 16) {
    uint32_t bf[4][2] = {};
    if (ws.nt8 >= 2) {
      const T* row = w + (ws.nbase + (j8 / 2) * 8 + i8) * L + kk + (j8 % 2) * 8;
      uint32_t r[4];
      ptx::ldmatrix_x4(r, row);
      bf[0][0] = r[0]; bf[0][1] = r[1]; bf[1][0] = r[2]; bf[1][1] = r[3];
      if (ws.nt8 == 4) {
        ptx::ldmatrix_x4(r, row + 16 * L);
        bf[2][0] = r[0]; bf[2][1] = r[1]; bf[3][0] = r[2]; bf[3][1] = r[3];
      }
    } else {
      uint32_t r[2];
      ptx::ldmatrix_x2(r, w + (ws.nbase + i8) * L + kk + (j8 % 2) * 8);
      bf[0][0] = r[0]; bf[0][1] = r[1];
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int mt = ws.mrow + ws.mstep * j;
      if (mt < ws.mtiles) {  // warp-uniform
        uint32_t af[4];
        ptx::ldmatrix_x4(af, a + (mt * 16 + lane % 16) * LDA + kk + 8 * (lane / 16));
#pragma unroll
        for (int n = 0; n < 4; ++n)
          if (n < ws.nt8) ptx::mma_m16n8k16<T>(acc[j][n], af, bf[n]);
      }
    }
  }
}

// The same on TF32 tensor cores (float32 where torch.backends.cudnn.allow_tf32 allows it),
// 8-deep k steps: fragments by 32-bit shared loads (g = lane / 4, t = lane % 4; A rows g and
// g + 8 at columns t and t + 4, B channel g at k t and t + 4); the 16-byte row padding keeps
// the 32 lanes in distinct banks. The mma reads the float bits as tf32 (their top 19 bits).
__device__ __forceinline__ void gemm_slice_tf32(float (&acc)[4][4][4], const float* a, int LDA,
                                                const float* w, int kend, const WarpSplit& ws,
                                                int lane) {
  constexpr int L = LDW<float>;
  const int g = lane / 4, t = lane % 4;
  for (int kk = 0; kk < kend; kk += 8) {
    uint32_t bf[4][2] = {};
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      if (n < ws.nt8) tf32_frag_b(bf[n], w + (ws.nbase + n * 8 + g) * L + kk + t, 1);
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int mt = ws.mrow + ws.mstep * j;
      if (mt < ws.mtiles) {  // warp-uniform
        uint32_t af[4];
        tf32_frag_a(af, a + (mt * 16 + g) * LDA + kk + t, LDA, 1);
#pragma unroll
        for (int n = 0; n < 4; ++n)
          if (n < ws.nt8) ptx::mma_m16n8k8_tf32(acc[j][n], af, bf[n]);
      }
    }
  }
}

// The same in exact float32 on the FP32 cores (float32 where TF32 is not allowed), or in
// float64: each lane computes the elements of the m16n8 fragments it would hold after the mma
// (rows g and g + 8, columns 2t and 2t + 1) from the operands in shared memory, two k at a
// time (64-bit loads along k, 128-bit for float64; kend, the rows LDA and LDW and every slice
// offset are even), so the accumulators, the output-tile write and the epilogue are those of
// the tensor-core slices. Per k pair a lane loads 2 A pairs per 16-pixel row and 2 weight
// pairs per n8 tile for up to 128 FMAs; float32's 16-byte row padding keeps the loads
// conflict-free as for TF32 (A: 8 distinct rows, weights: 8 distinct rows, the other lanes
// broadcast).
template <typename A>
__device__ __forceinline__ void gemm_slice_fma(A (&acc)[4][4][4], const A* a, int LDA,
                                               const A* w, int kend, const WarpSplit& ws,
                                               int lane) {
  constexpr int L = LDW<A>;
  static_assert(L % 2 == 0, "pair loads along k");
  using Pair = decltype(lds2(a));
  const int g = lane / 4, t = lane % 4;
  const A* wl = w + (ws.nbase + 2 * t) * L;
  for (int k = 0; k < kend; k += 2) {
    Pair w0[4] = {}, w1[4] = {};  // channels 2t and 2t + 1 of each n8 tile, at k and k + 1
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      if (n < ws.nt8) {
        w0[n] = lds2(wl + n * 8 * L + k);
        w1[n] = lds2(wl + (n * 8 + 1) * L + k);
      }
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int mt = ws.mrow + ws.mstep * j;
      if (mt < ws.mtiles) {  // warp-uniform
        const Pair a0 = lds2(a + (mt * 16 + g) * LDA + k);
        const Pair a1 = lds2(a + (mt * 16 + g + 8) * LDA + k);
#pragma unroll
        for (int n = 0; n < 4; ++n) {
          if (n < ws.nt8) {
            A (&c)[4] = acc[j][n];
            c[0] = fma_acc(a0.y, w0[n].y, fma_acc(a0.x, w0[n].x, c[0]));
            c[1] = fma_acc(a0.y, w1[n].y, fma_acc(a0.x, w1[n].x, c[1]));
            c[2] = fma_acc(a1.y, w0[n].y, fma_acc(a1.x, w0[n].x, c[2]));
            c[3] = fma_acc(a1.y, w1[n].y, fma_acc(a1.x, w1[n].x, c[3]));
          }
        }
      }
    }
  }
}

// TC: the pointwise GEMM on tensor cores (16-bit, or float on TF32); false (float, double):
// FMAs. b1, the depthwise weights and the output tile are in the accumulation type A. CL: the
// kernel may run as clusters sharing each run (16-bit only: a kernel of its own, since the
// cluster's bookkeeping takes registers the others need; the plan's cluster decides).
template <typename T, int S, int TW, bool TC, bool CL>
__global__ void __launch_bounds__(NT, sizeof(T) == 8 ? 1 : 2)  // two CTAs per SM: at most
    // 128 registers (float64, a gradcheck dtype: one, 255, for its double accumulators)
    block_forward_mma_kernel(BlockDesc d, BlockTensors<T> t, T* y, T* pre, MmaPlan pl) {
  using A = typename AccT<T>::type;
  static_assert(!TC || sizeof(T) != 8, "float64 runs on FMAs only");
  static_assert(TC || sizeof(T) >= 4, "16-bit runs on tensor cores only");
  constexpr int XC = S * (TW + 1) + 3;
  MSF_EXTERN_SMEM(sm);
  T* sA = reinterpret_cast<T*>(sm + pl.off_a);
  T* xs0 = reinterpret_cast<T*>(sm + pl.off_x0);
  T* xs1 = reinterpret_cast<T*>(sm + pl.off_x1);
  A* b1 = reinterpret_cast<A*>(sm + pl.off_b1);
  A* dw = reinterpret_cast<A*>(sm + pl.off_dw);
  A* sO = reinterpret_cast<A*>(sm + pl.off_o);
  T* w0 = reinterpret_cast<T*>(sm + pl.off_w0);
  T* w1 = reinterpret_cast<T*>(sm + pl.off_w1);

  // may start before the kernel before it completes (MSF_LAUNCH_PDL): nothing global
  // before the wait; the next kernel may be launched once every CTA of this one is resident
  ptx::grid_dependency_wait();
  ptx::launch_dependents();
  // a cluster of K CTAs (consecutive blockIdx.x) shares each run (rank_share)
  const unsigned ctas_hw = unsigned(pl.tiles_w) * unsigned(pl.runs_h);
  const unsigned run_id =
      unsigned(mma_div_k(int(blockIdx.x), CL && pl.cluster > 1 ? pl.cluster : 1));
  const int u = int(run_id % ctas_hw);
  const int64_t bimg = run_id / ctas_hw;
  const int tr_begin = (u / pl.tiles_w) * pl.run, tr_end = min_i(tr_begin + pl.run, pl.tiles_h);
  const int TH = pl.TH, LDA = pl.LDA, C16 = pl.C16;
  const int Ho = int(d.Ho), Wo = int(d.Wo), act = d.act;
  const int q0 = (u % pl.tiles_w) * TW;
  const T* x_img = t.x + bimg * d.C * d.H * d.W;
  // the rows each chunk's staging shares with the tile below (plan: off_h, HR = S + 3)
  const SharedRows<T, S, XC> carry{reinterpret_cast<T*>(sm + pl.off_h)};

  for (int tr = tr_begin; tr < tr_end; ++tr) {
    // The thread index, opaque to the compiler: the per-thread addresses and indices derived
    // from it are computed again per tile instead of being hoisted out of this loop, where
    // they would stay live across the GEMM (128 registers leave no room for them) and spill.
    int tid = int(threadIdx.x);
    ptx::opaque(tid);
    const int lane = tid % 32, warp = tid / 32;
    const int r0 = tr * TH;
    const bool carry_in = tr > tr_begin, carry_out = tr + 1 < tr_end;
    const int row0 = carry_in ? carry.HR : 0;  // the first row staged from global memory

    // ---- phase 1: x once per run; a, b1, b, xs into A -----------------------------------
    // (in a cluster this rank's chunks rank, rank + K, ...; j counts them and indexes the
    // carried rows; the rank is read where it is used, so nothing of the cluster's stays
    // live across the depthwise work)
    const int K = CL && pl.cluster > 1 ? pl.cluster : 1;
    const int ih0 = S * (r0 - 1) - 1, iw0 = S * (q0 - 1) - 1;
    if (carry_in) carry.put(xs0, 0, tid);
    stage_x<T, XC>(d, pl.vec_x, pl.XR, x_img, t.x, int(rank_share<CL>(pl).rank) * KC, ih0, iw0,
                   xs0, row0, tid);
    ptx::cp_async_commit();
    for (int j = 0; j < rank_share<CL>(pl).nchunks; ++j) {
      const int c0 = (int(rank_share<CL>(pl).rank) + j * K) * KC;
      T* xs = (j & 1) ? xs1 : xs0;
      if (j + 1 < rank_share<CL>(pl).nchunks) {
        T* next = (j & 1) ? xs0 : xs1;
        if (carry_in) carry.put(next, j + 1, tid);
        stage_x<T, XC>(d, pl.vec_x, pl.XR, x_img, t.x, c0 + K * KC, ih0, iw0, next, row0, tid);
      }
      ptx::cp_async_commit();  // possibly empty: the wait below then always means "chunk j"
      stage_dw<T>(d, t, c0, dw, tid);
      ptx::cp_async_wait<1>();
      __syncthreads();
      // this chunk's rows shared with the next tile down; their slot was last read by this
      // tile's copy into the stage, before the barrier above
      if (carry_out) carry.keep(xs, pl.XR, j, tid);
      // B2 (arrived at after the previous tile's copies): no other rank still copies that
      // tile's columns out of this CTA's A
      if (K > 1 && carry_in && j == 0) ptx::cluster_wait();
      const ChunkOut<T> o{sA + pl.seg_a + c0, sA + pl.seg_b + c0,
                          pl.seg_x >= 0 ? sA + pl.seg_x + c0 : nullptr, LDA, nullptr, 0};
      chunk_operands<T, S, TW>(d, TH, r0, q0, c0, C16, xs, b1, dw, o, tid);  // ends: barrier
    }
    ptx::cp_async_wait<0>();  // (the last group is empty)
    if (K > 1) {
      ptx::cluster_arrive();  // B1: this rank's columns of the tile are in its A
      ptx::cluster_wait();
      const RankShare rs = rank_share<CL>(pl);
      gather_columns<T>(d, pl, sA, rs.rank, K, rs.row_lo, rs.row_lo + rs.rows, tid);
      // B2: waited for before this CTA writes A again, or returns (the GEMM's first
      // __syncthreads publishes the copied rows to this CTA's warps)
      ptx::cluster_arrive();
    }

    // ---- phase 2: the GEMM per block of NB output channels -------------------------------
    const RankShare r2 = rank_share<CL>(pl);  // (its rows and blocks; the same values)
    const int row_lo = r2.row_lo, Pr = r2.rows;
    const WarpSplit ws = warp_split(Pr, warp);
    const T* sAr = sA + row_lo * LDA;  // this rank's rows of A
    const bool cl = d.channels_last, identity = d.residual && !d.projection;
    const int64_t Cout = d.Cout;
    for (int blk = r2.blk0; blk < pl.nblk; blk += r2.blk_step) {
      const GemmBlock g = gemm_block(d, pl, blk);
      A acc[4][4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int n = 0; n < 4; ++n)
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[j][n][e] = A(0);
      if (tid < NB) dw[tid] = bias_of<T>(d, t, g, g.co0 + tid);

      const int nst = (g.k_hi - g.k_lo + KB - 1) / KB;
      stage_weights<T>(d, pl, t, g, g.k_lo, w0, tid);
      ptx::cp_async_commit();
      for (int st = 0; st < nst; ++st) {
        const int kb = g.k_lo + st * KB;
        const T* w = (st & 1) ? w1 : w0;
        if (st + 1 < nst) stage_weights<T>(d, pl, t, g, kb + KB, (st & 1) ? w0 : w1, tid);
        ptx::cp_async_commit();
        ptx::cp_async_wait<1>();
        __syncthreads();
        const int kend = min_i(KB, g.k_hi - kb);
        if constexpr (sizeof(T) == 2)
          gemm_slice_16bit<T>(acc, sAr + kb, LDA, w, kend, ws, lane);
        else if constexpr (TC)
          gemm_slice_tf32(acc, sAr + kb, LDA, w, kend, ws, lane);
        else
          gemm_slice_fma(acc, sAr + kb, LDA, w, kend, ws, lane);
        __syncthreads();  // this slice is free for the copy after the next
      }

      // accumulators -> the output tile: d[0..1] at (row g, cols 2t, 2t+1), d[2..3] at g+8
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int mt = ws.mrow + ws.mstep * j;
        if (mt < ws.mtiles) {
          const int row = mt * 16 + lane / 4;
#pragma unroll
          for (int n = 0; n < 4; ++n) {
            if (n >= ws.nt8) continue;
            const int col = ws.nbase + n * 8 + 2 * (lane % 4);
            sO[row * LDO + col] = acc[j][n][0];
            sO[row * LDO + col + 1] = acc[j][n][1];
            sO[(row + 8) * LDO + col] = acc[j][n][2];
            sO[(row + 8) * LDO + col + 1] = acc[j][n][3];
          }
        }
      }
      __syncthreads();

      // epilogue: bias, identity residual, activation, stores
      if (cl) {
        for (int i = tid; i < Pr * (NB / 8); i += NT) {
          const int g8 = i % (NB / 8), p = i / (NB / 8), pt = row_lo + p;  // (pt: in the tile)
          const int oh = r0 + pt / TW, ow = q0 + pt % TW, co = g.co0 + 8 * g8;
          if (oh >= Ho || ow >= Wo || co >= g.nb) continue;
          const int ch = g.ch_off + co;
          const int64_t o = ((bimg * Ho + oh) * Wo + ow) * Cout + ch;
          A v[8];
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            v[e] = sO[p * LDO + 8 * g8 + e] + dw[8 * g8 + e];
            if (identity && co + e < g.nb)  // (identity: stride 1, C == Cout)
              v[e] += to_acc(pl.seg_x >= 0 ? sAr[p * LDA + pl.seg_x + ch + e]
                                           : ldg(x_img + (int64_t(oh) * Wo + ow) * Cout + ch + e));
          }
          if (pl.vec_y && co + 8 <= g.nb) {  // 8 channels: 1 (16-bit), 2 (float), 4 stores
            constexpr int V = VE<T>;
#pragma unroll
            for (int h = 0; h < 8 / V; ++h) {
              Vec16 vp, vy;
              T* hp = reinterpret_cast<T*>(&vp);
              T* hy = reinterpret_cast<T*>(&vy);
#pragma unroll
              for (int e = 0; e < V; ++e) {
                hp[e] = from_acc<T>(v[h * V + e]);
                hy[e] = from_acc<T>(act_apply(act, v[h * V + e]));
              }
              if (pre != nullptr) stg16(pre + o + h * V, vp);
              stg16(y + o + h * V, vy);
            }
          } else {
            for (int e = 0; e < 8 && co + e < g.nb; ++e) {
              if (pre != nullptr) stg(pre + o + e, from_acc<T>(v[e]));
              stg(y + o + e, from_acc<T>(act_apply(act, v[e])));
            }
          }
        }
      } else {
        for (int i = tid; i < Pr * NB; i += NT) {
          const int p = i % Pr, n = i / Pr, pt = row_lo + p;
          const int oh = r0 + pt / TW, ow = q0 + pt % TW, co = g.co0 + n;
          if (oh >= Ho || ow >= Wo || co >= g.nb) continue;
          const int ch = g.ch_off + co;
          A v = sO[p * LDO + n] + dw[n];
          if (identity)
            v += to_acc(pl.seg_x >= 0 ? sAr[p * LDA + pl.seg_x + ch]
                                      : ldg(x_img + (int64_t(ch) * Ho + oh) * Wo + ow));
          const int64_t o = ((bimg * Cout + ch) * Ho + oh) * Wo + ow;
          if (pre != nullptr) stg(pre + o, from_acc<T>(v));
          stg(y + o, from_acc<T>(act_apply(act, v)));
        }
      }
      __syncthreads();  // the output tile, the biases and A are free for the next block / tile
    }
  }  // tiles of the run
  // B2 of the last tile: no other rank still reads this CTA's A when it returns
  if (CL && pl.cluster > 1) ptx::cluster_wait();
}

// launch_typed's answer when the plan's cluster does not fit the device (the caller plans
// again without clusters)
const char kClusterDoesNotFit[] = "msfused: the forward's thread-block cluster does not fit";

template <typename T, int S, int TW, bool TC, bool CL>
const char* launch_typed(const BlockDesc& d, const BlockTensors<T>& t, T* y, T* pre,
                         const MmaPlan& pl, cudaStream_t stream) {
  auto kernel = block_forward_mma_kernel<T, S, TW, TC, CL>;
  static std::atomic<int> raised[64] = {};
  if (const char* err = allow_dynamic_smem(kernel, pl.smem, raised)) return err;
  const unsigned K = pl.cluster > 1 ? unsigned(pl.cluster) : 1u;
  if (!cluster_fits(kernel, dim3(K), NT, pl.smem)) return kClusterDoesNotFit;
  const unsigned grid = unsigned(d.B * pl.tiles_w * pl.runs_h) * K;
  const cudaError_t e = MSF_LAUNCH_CLUSTER(pdl_enabled(), dim3(K), kernel, grid, NT, pl.smem,
                                           stream, d, t, y, pre, pl);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace

namespace {
size_t env_bytes(const char* name) {
  const char* e = std::getenv(name);
  return e != nullptr ? size_t(std::strtoull(e, nullptr, 10)) : size_t(0);
}
struct EnvTile {
  int th, tw, run, cluster, split;
};
// "THxTW", "THxTWxRUN", or "THxTWxRUNxK" with K the cluster size, followed by r (the ranks
// split the rows) or b (the GEMM blocks) for a cluster of 2 or 4
EnvTile env_tile(const char* name) {
  const char* e = std::getenv(name);
  EnvTile t{0, 0, 0, 0, 0};
  char split = 0;
  const int n =
      e != nullptr ? std::sscanf(e, "%dx%dx%dx%d%c", &t.th, &t.tw, &t.run, &t.cluster, &split)
                   : 0;
  if (n < 2) t = EnvTile{0, 0, 0, 0, 0};
  if (n == 2) t.run = 0;
  if (n <= 3) t.cluster = 0;
  t.split = n == 5 && split == 'r' ? 1 : n == 5 && split == 'b' ? 2 : 0;
  return t;
}
double env_ratio(const char* name) {  // 0 when unset or not a positive number
  const char* e = std::getenv(name);
  const double r = e != nullptr ? std::strtod(e, nullptr) : 0.0;
  return r > 0 ? r : 0.0;
}
}  // namespace

MmaDevice mma_device() {
  int dev = 0, block = 0, sm = 0, sms = 0;
  cudaGetDevice(&dev);
  if (cudaDeviceGetAttribute(&block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    block = 48 * 1024;
  if (cudaDeviceGetAttribute(&sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess)
    sm = block;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess) sms = 1;
  // MSFUSED_CUDA_FWD_SMEM (bytes) caps the block's share, to trade tile size for CTAs per SM
  // when measuring; MSFUSED_CUDA_FWD_TILE=THxTW (TW 8 or 16) forces a tile where it fits,
  // THxTWxRUN also the tiles per CTA down a column, THxTWxRUNxK[r|b] also the cluster and
  // what its ranks split (where clusters are enabled); MSFUSED_CUDA_FWD_XMAX=R keeps the plans
  // that stage x at most R times (what the cost model's choice costs against one that meets
  // a bound on x's traffic). Read once per process (by the emulator, whose tests change them,
  // at every call).
#ifdef MSFUSED_CUDA_EMU
  const size_t cap = env_bytes("MSFUSED_CUDA_FWD_SMEM");
  const EnvTile tile = env_tile("MSFUSED_CUDA_FWD_TILE");
  const double x_max = env_ratio("MSFUSED_CUDA_FWD_XMAX");
#else
  static const size_t cap = env_bytes("MSFUSED_CUDA_FWD_SMEM");
  static const EnvTile tile = env_tile("MSFUSED_CUDA_FWD_TILE");
  static const double x_max = env_ratio("MSFUSED_CUDA_FWD_XMAX");
#endif
  // MSFUSED_CUDA_FWD_CLUSTER=1: clusters of up to 4 CTAs may share a run (sm_90)
  MmaDevice m{size_t(block), size_t(sm), sms, tile.th, tile.tw, tile.run, x_max,
              fwd_clusters_enabled() ? 4 : 1, tile.cluster, tile.split};
  if (cap != 0 && cap < m.smem_block) m.smem_block = cap;
  return m;
}

namespace {
// The plan of the last few call shapes of this thread: planning tries ~50 tiles, a few
// microseconds of host time that every call of a network's block would otherwise pay.
struct PlanKey {
  int64_t v[13];
  bool operator==(const PlanKey& o) const { return std::memcmp(v, o.v, sizeof(v)) == 0; }
};
struct PlanEntry {
  PlanKey key;
  MmaPlan plan;
};
constexpr int kPlanCache = 16;
thread_local PlanEntry plan_cache[kPlanCache];
thread_local int plan_cache_n = 0, plan_cache_next = 0;
}  // namespace

template <typename T>
MmaPlan plan_forward_mma(const BlockDesc& d, const BlockTensors<T>& t, const T* y,
                         const MmaDevice& dev) {
  const bool w16 = aligned16(t.pa) && aligned16(t.pb) && (t.ws == nullptr || aligned16(t.ws));
  const bool x16 = aligned16(t.x), y16 = aligned16(y);
  PlanKey key{{d.B, d.C, d.H, d.W, d.N, d.stride,
               d.merge | (d.residual << 2) | (d.projection << 3) | (d.channels_last << 4) |
                   (x16 << 5) | (w16 << 6) | (y16 << 7),
               int64_t(dev.smem_block), int64_t(dev.smem_sm), dev.sms,
               dev.force_th | (dev.force_tw << 8) | (int64_t(dev.force_run) << 16) |
                   (int64_t(dev.x_max * 1024) << 32),
               dev.cluster_max | (dev.force_cluster << 8) | (dev.force_split << 16),
               int64_t(sizeof(T))}};
  for (int i = 0; i < plan_cache_n; ++i)
    if (plan_cache[i].key == key) return plan_cache[i].plan;
  const MmaPlan plan = plan_mma_forward(d, dev, int(sizeof(T)), x16, w16, y16);
  plan_cache[plan_cache_next] = PlanEntry{key, plan};
  plan_cache_next = (plan_cache_next + 1) % kPlanCache;
  if (plan_cache_n < kPlanCache) ++plan_cache_n;
  return plan;
}

template <typename T, bool TC, bool CL>
const char* launch_strided(const BlockDesc& d, const BlockTensors<T>& t, T* y, T* pre,
                           const MmaPlan& pl, cudaStream_t stream) {
  if (d.stride == 1)
    return pl.TW == 8 ? launch_typed<T, 1, 8, TC, CL>(d, t, y, pre, pl, stream)
                      : launch_typed<T, 1, 16, TC, CL>(d, t, y, pre, pl, stream);
  return pl.TW == 8 ? launch_typed<T, 2, 8, TC, CL>(d, t, y, pre, pl, stream)
                    : launch_typed<T, 2, 16, TC, CL>(d, t, y, pre, pl, stream);
}

template <typename T, bool TC>
const char* launch_planned(const BlockDesc& d, const BlockTensors<T>& t, T* y, T* pre,
                           const MmaPlan& pl, cudaStream_t stream) {
  if constexpr (sizeof(T) == 2) {  // (the plan gives clusters to 16-bit elements only)
    if (pl.cluster > 1) return launch_strided<T, TC, true>(d, t, y, pre, pl, stream);
  }
  return launch_strided<T, TC, false>(d, t, y, pre, pl, stream);
}

template <typename T>
const char* launch_block_forward_mma(const BlockDesc& d, const BlockTensors<T>& t, T* y, T* pre,
                                     bool tf32, cudaStream_t stream, bool* launched) {
  MmaDevice dev = mma_device();
  for (;;) {
    MmaPlan pl = plan_forward_mma(d, t, static_cast<const T*>(y), dev);
    if (pre != nullptr && !aligned16(pre)) pl.vec_y = false;
    *launched = pl.P != 0;
    if (pl.P == 0) return nullptr;  // no tile fits this GPU's shared memory: the caller's FMA
                                    // kernel
    const char* e;
    if constexpr (std::is_same_v<T, float>) {
      e = tf32 ? launch_planned<T, true>(d, t, y, pre, pl, stream)
               : launch_planned<T, false>(d, t, y, pre, pl, stream);
    } else if constexpr (std::is_same_v<T, double>) {
      e = launch_planned<T, false>(d, t, y, pre, pl, stream);
    } else {
      e = launch_planned<T, true>(d, t, y, pre, pl, stream);
    }
    if (e != kClusterDoesNotFit) return e;
    dev.cluster_max = 1;  // (then the launch has no cluster, which always fits)
  }
}

template MmaPlan plan_forward_mma<float>(const BlockDesc&, const BlockTensors<float>&,
                                         const float*, const MmaDevice&);
template const char* launch_block_forward_mma<float>(const BlockDesc&,
                                                     const BlockTensors<float>&, float*, float*,
                                                     bool, cudaStream_t, bool*);
template MmaPlan plan_forward_mma<__half>(const BlockDesc&, const BlockTensors<__half>&,
                                          const __half*, const MmaDevice&);
template MmaPlan plan_forward_mma<__nv_bfloat16>(const BlockDesc&,
                                                 const BlockTensors<__nv_bfloat16>&,
                                                 const __nv_bfloat16*, const MmaDevice&);
template MmaPlan plan_forward_mma<double>(const BlockDesc&, const BlockTensors<double>&,
                                          const double*, const MmaDevice&);
template const char* launch_block_forward_mma<double>(const BlockDesc&,
                                                      const BlockTensors<double>&, double*,
                                                      double*, bool, cudaStream_t, bool*);
template const char* launch_block_forward_mma<__half>(const BlockDesc&,
                                                      const BlockTensors<__half>&, __half*,
                                                      __half*, bool, cudaStream_t, bool*);
template const char* launch_block_forward_mma<__nv_bfloat16>(
    const BlockDesc&, const BlockTensors<__nv_bfloat16>&, __nv_bfloat16*, __nv_bfloat16*, bool,
    cudaStream_t, bool*);

}  // namespace cuda
}  // namespace msfused
