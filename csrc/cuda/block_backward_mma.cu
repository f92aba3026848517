// The float16/bfloat16 backward on tensor cores (and float32's, on TF32 tensor cores where
// torch.backends.cudnn.allow_tf32 allows it, else on FMAs; float64's on FMAs): launch 1 (the
// pointwise convs' and the projection's data and weight gradients) and launch 3 (the fixed-order
// reduction); launch 2 (depthwise) is block_backward_dw.cu. The plan and the scratch are
// csrc/cuda/backward_mma.h.
//
// Launch 1: a CTA owns CB = nchunk x 32 input channels and walks its pixel groups tile by tile
// (TH x 8 output pixels), each tile chunk by chunk of 32 channels. Per tile and chunk:
//   - a, b, the strided x (activated, rounded to the dtype) and act'(a_pre), act'(b_pre)
//     (float) for its channels, from x staged with the forward's code (depthwise_tile.cuh);
//     the next tile's x is in flight (cp.async) meanwhile;
//   - (first chunk) gz = grad_y * act'(saved) for every output channel (rounded to the dtype:
//     the GEMMs' operand; never written to global memory), branch B's columns from a 16-
//     aligned offset so every fragment row is 16-byte aligned;
//   - data gradients, mma.m16n8k16 with the CTA's slices of pa, pb, ws resident in shared
//     memory (with several row blocks, each holds and uses only the ones it owns):
//     da_pre = (gza pa) * act'(a_pre), db_pre = (gzb pb) * act'(b_pre) stored to
//     the pixel-major scratch, and the shortcut's gz ws (identity: gz) into dx at its input
//     pixel, where launch 2 adds the rest;
//   - weight gradients, mma.m16n8k16 with K = the tile's pixels: dpa += gza^T a (a as its
//     16-bit value plus its 16-bit rounding residual, b alike),
//     dpb += gzb^T b, dws += gz^T xs, in registers (each warp owns up to four (m16 row tile
//     of [dpa | dpb | dws], chunk) slots of 16 x 32), plus the bias sums (channel block 0).
// Blocks with more weight-gradient rows than the 8 x bwd_wmt slots hold run rblocks CTAs per
// channel block (one chunk each), row block rb owning m16 row tiles 32 rb .. 32 rb + 31 (16
// for float64) and bias rows 512 rb ..; all stage x and gz, and the data gradients (da_pre,
// db_pre, the projection's) go to row blocks 0, 1, 2 in turn (bwd_dgrad_owner), so that each
// holds one or two of the weight slices.
// With MSFUSED_CUDA_BWD_CLUSTER=1 (sm_90; gz_cluster below) the channel and row blocks of the
// same pixels, 2 to 8 CTAs that walk the same tiles in step, run as one thread-block cluster:
// each stages gz for its share of a tile's pixels and copies the other shares out of the
// other CTAs' shared memory (distributed shared memory), so dy and the saved output are read
// once per tile rather than once per CTA; the arithmetic and the bits are the same. Where
// one CTA covers the pixels (grid x of 1), 4 CTAs along y (4 consecutive groups) are a
// cluster instead and sum their groups' partials over distributed shared memory before
// writing one (reduce_partials_in_cluster; plan field red).
// After a group's last tile the accumulators go out as that group's partial. Groups are
// fixed by the shape, the order of the sums inside a group by the tile order, and launch 3
// adds the groups in index order: the result does not depend on the split (the grid).
// float runs the same steps with m16n8k8 TF32 MMAs on 32-bit fragments loaded one element
// per register (ldmatrix is 16-bit only) and without the lo residuals, or, where TF32 is not
// allowed, with FMAs in exact float32 computing the same fragments; float64 (gradcheck) like
// the latter in double throughout, with half the weight-gradient slots per warp (bwd_wmt).
#include <cstdlib>
#include <type_traits>

#include "backward_mma.h"
#include "block_cuda.h"
#include "common.cuh"
#include "depthwise_tile.cuh"
#include "global_io.cuh"
#include "ptx_wrappers.cuh"

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "msfused: the float16/bfloat16 backward needs bfloat16 tensor cores (sm_80 or newer); set TORCH_CUDA_ARCH_LIST to 8.0 or above"
#endif

namespace msfused {
namespace cuda {
namespace {

constexpr int NT = DWT_NT, KC = BWD_KC, TW = BWD_TW;
static_assert(KC == DWT_KC, "one depthwise_tile.cuh chunk per CTA");

// gz's shared-memory column of output channel co: branch A (and add) at co, concat's branch B
// at gzb + co - N.
__device__ __forceinline__ int gz_col(int N, int gzb, int co) { return co < N ? co : gzb + co - N; }

// The partial's row of weight-gradient row m ([dpa | dpb | dws] padded to 16 each: m16 tile
// mt covers rows 16 mt ..), or -1 for padding.
__device__ __forceinline__ int partial_row(const BlockDesc& d, const BwdMmaPlan& pl, int m) {
  const int N = int(d.N), N16 = pl.N16;
  if (m < N16) return m < N ? m : -1;
  if (m < 2 * N16) return m - N16 < N ? N + m - N16 : -1;
  const int j = m - 2 * N16;  // gz column
  int co;
  if (j < N16) co = j < N ? j : -1;
  else co = j - N16 < N ? N + j - N16 : -1;
  return co >= 0 ? 2 * N + co : -1;
}

// gz column of bias-sum row r (dqa: n, dqb: n of branch B, dbs: co).
__device__ __forceinline__ int bias_col(const BlockDesc& d, const BwdMmaPlan& pl, int r) {
  const int N = int(d.N);
  if (r < N) return r;
  if (r < 2 * N) return pl.gzb + r - N;
  return gz_col(N, pl.gzb, r - 2 * N);
}

// The weight slices of the data-gradient units row block rb owns (bwd_dgrad_owner) into shared
// memory: pa, pb (rows n) and ws (rows in gz-column order), columns c0 .. c0 + CB, or with
// dg_half the unit's 16 of them; zero where there is no weight.
template <typename T>
__device__ __forceinline__ void stage_weight_slices(const BlockDesc& d, const BwdMmaPlan& pl,
                                                    const BlockTensors<T>& t, int c0, int rb,
                                                    unsigned char* sm) {
  const int C = int(d.C), N = int(d.N);
  const T zero = from_acc<T>(typename AccT<T>::type(0));
  const int units = (d.projection ? 3 : 2) * (pl.dg_half ? 2 : 1);
  for (int u = rb; u < units; u += pl.rblocks) {
    const int which = pl.dg_half ? u / 2 : u;
    const int cw = pl.dg_half ? 16 : pl.CB, L = pl.dg_half ? BWD_LDH : pl.LDWT;
    const int cu = c0 + (pl.dg_half ? 16 * (u % 2) : 0);  // the slice's first channel
    T* sW = reinterpret_cast<T*>(sm + bwd_wslice_offset(pl, u));
    const T* src = which == 0 ? t.pa : (which == 1 ? t.pb : t.ws);
    const int rows = which < 2 ? pl.N16 : pl.GW;
    for (int i = threadIdx.x; i < rows * cw; i += NT) {
      const int j = i / cw, k = i % cw, c = cu + k;
      int co;  // the weight's row: n for pa, pb; for ws the output channel of gz column j
      if (which < 2 || j < pl.N16) co = j < N ? j : -1;
      else co = j - pl.N16 < N ? N + j - pl.N16 : -1;  // concat only (add: GW = N16)
      sW[j * L + k] = co >= 0 && c < C ? ldg(src + int64_t(co) * C + c) : zero;
    }
  }
}

// gz = grad_y * act'(saved) over the tile's pixels p0 .. p1 - 1, every output channel, into
// sG (zero for pixels outside the image). vec: channels_last, Cout and N multiples of 8,
// 16-byte aligned tensors.
template <typename T>
__device__ __forceinline__ void stage_gz(const BlockDesc& d, const BwdMmaPlan& pl, bool vec,
                                         const T* gy, const T* saved, int64_t bimg, int r0,
                                         int q0, T* sG, int p0, int p1) {
  const int P = p1 - p0, Cout = int(d.Cout), N = int(d.N), Ho = int(d.Ho), Wo = int(d.Wo);
  const int act = d.act, LDG = pl.LDG;
  const T zero = from_acc<T>(typename AccT<T>::type(0));
  if (vec) {
    constexpr int V = VE<T>;
    const int nv = Cout / V;
    for (int i = threadIdx.x; i < P * nv; i += NT) {
      const int v = i % nv, p = p0 + i / nv, oh = r0 + p / TW, ow = q0 + p % TW, co = V * v;
      Vec16 out{};
      if (oh < Ho && ow < Wo) {
        const int64_t o = ((bimg * Ho + oh) * Wo + ow) * Cout + co;
        Vec16 g = ldg16(gy + o);
        if (saved != nullptr) {
          const Vec16 s = ldg16(saved + o);
          T* gp = reinterpret_cast<T*>(&g);
          const T* sp = reinterpret_cast<const T*>(&s);
#pragma unroll
          for (int e = 0; e < V; ++e) gp[e] = from_acc<T>(act_grad(act, to_acc(gp[e]), to_acc(sp[e])));
        }
        out = g;
      }
      *reinterpret_cast<Vec16*>(sG + p * LDG + gz_col(N, pl.gzb, co)) = out;
    }
    return;
  }
  const bool cl = d.channels_last;
  for (int i = threadIdx.x; i < P * Cout; i += NT) {
    int p, co;
    if (cl) { co = i % Cout; p = p0 + i / Cout; }  // channels fastest: coalesced
    else { p = p0 + i % P; co = i / P; }           // pixels fastest
    const int oh = r0 + p / TW, ow = q0 + p % TW;
    T v = zero;
    if (oh < Ho && ow < Wo) {
      const int64_t o = cl ? ((bimg * Ho + oh) * Wo + ow) * Cout + co
                           : ((bimg * Cout + co) * Ho + oh) * Wo + ow;
      auto g = to_acc(ldg(gy + o));
      if (saved != nullptr) g = act_grad(act, g, to_acc(ldg(saved + o)));
      v = from_acc<T>(g);
    }
    sG[p * LDG + gz_col(N, pl.gzb, co)] = v;
  }
}

// The pixels of a tile that rank r of a cluster of K stages gz for (gz shared, below).
__device__ __forceinline__ int gz_share_begin(int P, int r, int K) { return P * r / K; }

// gz shared across the cluster: the rows other CTAs of the cluster staged (their pixels)
// copied out of their shared memory into this CTA's sG, 16 bytes at a time (sG's rows are
// 16-byte multiples; only gz's GW columns, the padding columns being zero everywhere).
template <typename T>
__device__ __forceinline__ void gather_gz(const BwdMmaPlan& pl, T* sG, unsigned rank,
                                          unsigned K) {
  const int vrow = pl.GW * int(sizeof(T)) / 16;
  for (unsigned q = 1; q < K; ++q) {
    const unsigned src = (rank + q) % K;
    const int p0 = gz_share_begin(pl.P, int(src), int(K));
    const int p1 = gz_share_begin(pl.P, int(src) + 1, int(K));
    const T* peer = ptx::map_shared_rank(sG, src);
    for (int i = threadIdx.x; i < (p1 - p0) * vrow; i += NT) {
      const int p = p0 + i / vrow, v = i % vrow;
      reinterpret_cast<Vec16*>(sG + p * pl.LDG)[v] =
          reinterpret_cast<const Vec16*>(peer + p * pl.LDG)[v];
    }
  }
}

// float on TF32: one data-gradient unit, acc[n8] += gz (16 pixels x K: rows of sG from Ab,
// this m16 tile's first row) times a weight slice (K x 16 channels: rows of Bw), K a multiple
// of 16, with m16n8k8 on fragments loaded one 32-bit element per register (ldmatrix is
// 16-bit only); the tensor cores read the float bits as tf32.
__device__ __forceinline__ void data_grad_tf32(float (&acc)[2][4], const float* Ab, int LDG,
                                               const float* Bw, int L, int K, int lane) {
  const int g = lane / 4, t = lane % 4;
  for (int kk = 0; kk < K; kk += 8) {
    uint32_t af[4];
    tf32_frag_a(af, Ab + g * LDG + kk + t, LDG, 1);
#pragma unroll
    for (int n8 = 0; n8 < 2; ++n8) {
      uint32_t bf[2];
      tf32_frag_b(bf, Bw + (kk + t) * L + n8 * 8 + g, L);
      ptx::mma_m16n8k8_tf32(acc[n8], af, bf);
    }
  }
}

// float on TF32: one weight-gradient slot, acc[n8] += gz^T (16 rows of [dpa | dpb | dws]:
// gz's columns from Gc, K = the tile's P pixels) times the chunk's operand columns (nh halves
// of 16 channels from B). No lo residuals: a and b enter as tf32, as in eager's TF32 convs.
__device__ __forceinline__ void weight_grad_tf32(float (&acc)[4][4], const float* Gc, int LDG,
                                                 const float* B, int LDA, int nh, int P,
                                                 int lane) {
  const int g = lane / 4, t = lane % 4;
  for (int kk = 0; kk < P; kk += 8) {
    uint32_t af[4];
    tf32_frag_a(af, Gc + (kk + t) * LDG + g, 1, LDG);  // gz^T: rows are gz's columns
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      if (hh >= nh) continue;
#pragma unroll
      for (int n8 = 0; n8 < 2; ++n8) {
        uint32_t bf[2];
        tf32_frag_b(bf, B + (kk + t) * LDA + hh * 16 + n8 * 8 + g, LDA);
        ptx::mma_m16n8k8_tf32(acc[2 * hh + n8], af, bf);
      }
    }
  }
}

// The same two in exact float32 on the FP32 cores (float32 where TF32 is not allowed), or in
// float64: each lane computes the elements of the m16n8 fragments it would hold after the mma
// (rows g and g + 8, columns 2t and 2t + 1) from the operands in shared memory, so the
// accumulators and everything after them are the tensor-core versions'. Column pairs 2t,
// 2t + 1 (and, in the data gradients, gz's k pairs along its rows) come in 64-bit (float64:
// 128-bit) loads: the rows LDG, LDA and LDWT and every offset into them are even
// (backward_mma.h).
template <typename A>
__device__ __forceinline__ void data_grad_fma(A (&acc)[2][4], const A* Ab, int LDG,
                                              const A* Bw, int L, int K, int lane) {
  const int g = lane / 4, t = lane % 4;
  const A* a_lo = Ab + g * LDG;
  const A* a_hi = Ab + (g + 8) * LDG;
  for (int k = 0; k < K; k += 2) {  // K is a multiple of 16
    const auto a0 = lds2(a_lo + k), a1 = lds2(a_hi + k);
#pragma unroll
    for (int n8 = 0; n8 < 2; ++n8) {
      const auto b = lds2(Bw + k * L + n8 * 8 + 2 * t);        // k, columns 2t, 2t + 1
      const auto bn = lds2(Bw + (k + 1) * L + n8 * 8 + 2 * t);  // k + 1
      A (&c)[4] = acc[n8];
      c[0] = fma_acc(a0.y, bn.x, fma_acc(a0.x, b.x, c[0]));
      c[1] = fma_acc(a0.y, bn.y, fma_acc(a0.x, b.y, c[1]));
      c[2] = fma_acc(a1.y, bn.x, fma_acc(a1.x, b.x, c[2]));
      c[3] = fma_acc(a1.y, bn.y, fma_acc(a1.x, b.y, c[3]));
    }
  }
}

template <typename A>
__device__ __forceinline__ void weight_grad_fma(A (&acc)[4][4], const A* Gc, int LDG,
                                                const A* B, int LDA, int nh, int P, int lane) {
  const int g = lane / 4, t = lane % 4;
  for (int k = 0; k < P; ++k) {
    const A a0 = Gc[k * LDG + g], a1 = Gc[k * LDG + g + 8];  // gz^T: rows are gz's columns
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      if (hh >= nh) continue;
#pragma unroll
      for (int n8 = 0; n8 < 2; ++n8) {
        const auto b = lds2(B + k * LDA + hh * 16 + n8 * 8 + 2 * t);
        A (&c)[4] = acc[2 * hh + n8];
        c[0] = fma_acc(a0, b.x, c[0]);
        c[1] = fma_acc(a0, b.y, c[1]);
        c[2] = fma_acc(a1, b.x, c[2]);
        c[3] = fma_acc(a1, b.y, c[3]);
      }
    }
  }
}

// A group's end with its partials summed across a cluster of pl.red CTAs along y (ranks
// r = 0 .. red - 1 holding groups red part + r): slot by slot, every CTA stages its
// accumulators (one slot of each warp) in `stage` (the operand tiles, free at a group's
// end), and after the cluster barrier sums a 1 / red share of the values over the ranks'
// stagings in rank order (as launch 3 sums groups: the first group's value, then each next
// added) and writes them as partial `part`; a second barrier frees the stagings. Then the
// bias sums alike. Accumulators are zeroed for the next group. Every CTA of the cluster
// calls it at the same groups.
template <typename T, typename A, int WMT>
__device__ __forceinline__ void reduce_partials_in_cluster(
    const BlockDesc& d, const BwdMmaPlan& pl, A (&accW)[WMT][4][4], A (&bsum)[2], bool first_cb,
    A* __restrict__ wpart, A* __restrict__ bpart, int64_t part, unsigned ry, int mt0, int MT,
    int nck, int c0, int r0b, A* stage) {
  constexpr int E = 8 * 16 * 32;  // one slot of each of the 8 warps
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32, C = int(d.C);
  const unsigned K = unsigned(pl.red);
  __syncthreads();  // every warp is done with the group's last operand tiles
#pragma unroll
  for (int j = 0; j < WMT; ++j) {
#pragma unroll
    for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        stage[((warp * 4 + n8) * 4 + e) * 32 + lane] = accW[j][n8][e];
        accW[j][n8][e] = A(0);
      }
    ptx::cluster_sync();  // slot j staged in every CTA of the cluster
    for (int i = E * int(ry) / int(K) + tid; i < E * (int(ry) + 1) / int(K); i += NT) {
      const int w = i / 512, n8 = i / 128 % 4, e = i / 32 % 4, l = i % 32;
      const int u = w + 8 * j;  // warp w's slot j: m16 tile mt0 + u % MT of chunk u / MT
      if (u >= MT * nck) continue;
      const int m = (mt0 + u % MT) * 16 + l / 4 + (e >= 2 ? 8 : 0);
      const int c = c0 + (u / MT) * KC + n8 * 8 + 2 * (l % 4) + (e & 1);
      const int row = partial_row(d, pl, m);
      if (row < 0 || c >= C) continue;
      A sum = ptx::map_shared_rank(stage, 0u)[i];
      for (unsigned q = 1; q < K; ++q) sum += ptx::map_shared_rank(stage, q)[i];
      stg(wpart + (part * pl.rows + row) * C + c, sum);
    }
    ptx::cluster_sync();  // every CTA done reading the stagings
  }
  if (first_cb) {  // (the cluster's CTAs share their channel block: all or none of them)
    stage[tid] = bsum[0];
    stage[NT + tid] = bsum[1];
    bsum[0] = bsum[1] = A(0);
    ptx::cluster_sync();
    for (int i = 2 * NT * int(ry) / int(K) + tid; i < 2 * NT * (int(ry) + 1) / int(K);
         i += NT) {
      if (r0b + i >= pl.rows) continue;  // (bias row r0b + tid + q NT is staged at q NT + tid)
      A sum = ptx::map_shared_rank(stage, 0u)[i];
      for (unsigned q = 1; q < K; ++q) sum += ptx::map_shared_rank(stage, q)[i];
      stg(bpart + part * pl.rows + r0b + i, sum);
    }
    ptx::cluster_sync();
  }
}

// TC: the GEMMs on tensor cores (16-bit, or float on TF32); false (float, double): FMAs.
// Sums, partials and the on-chip float operands (b1, the depthwise weights, act') are in the
// accumulation type A.
template <typename T, int S, bool TC>
__global__ void __launch_bounds__(NT, 1)
    block_backward_mma_kernel(BlockDesc d, BlockTensors<T> t, const T* __restrict__ gy,
                              const T* __restrict__ saved, T* __restrict__ sc_da,
                              T* __restrict__ sc_db, T* __restrict__ dx,
                              typename AccT<T>::type* __restrict__ wpart,
                              typename AccT<T>::type* __restrict__ bpart, BwdMmaPlan pl,
                              bool vec_x, bool vec_g, int cluster) {
  using A = typename AccT<T>::type;
  static_assert(std::is_same_v<A, bwd_acc_t<T>>, "one accumulation type");
  static_assert(!TC || sizeof(T) != 8, "float64 runs on FMAs only");
  static_assert(TC || sizeof(T) >= 4, "16-bit runs on tensor cores only");
  constexpr int WMT = bwd_wmt(int(sizeof(T))), ROWS_MT = bwd_rows_mt(int(sizeof(T)));
  constexpr int XC = S * (TW + 1) + 3;
  MSF_EXTERN_SMEM(sm);
  T* xs0 = reinterpret_cast<T*>(sm + pl.off_x0);
  T* xs1 = reinterpret_cast<T*>(sm + pl.off_x1);
  A* b1 = reinterpret_cast<A*>(sm + pl.off_b1);
  A* dw = reinterpret_cast<A*>(sm + pl.off_dw);
  T* sA = reinterpret_cast<T*>(sm + pl.off_a);
  A* sD = reinterpret_cast<A*>(sm + pl.off_d);
  T* sG = reinterpret_cast<T*>(sm + pl.off_g);
  // the rows each chunk's staging shares with the tile below (plan: off_h, HR)
  const SharedRows<T, S, XC> carry{reinterpret_cast<T*>(sm + pl.off_h)};

  // may start before the kernel before it completes (MSF_LAUNCH_PDL): nothing global before
  // the wait; launch 2 may be launched now (it waits for this launch's completion in turn)
  ptx::grid_dependency_wait();
  ptx::launch_dependents();
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  // grid x: channel blocks, each as rblocks row blocks side by side (they read the same x)
  const int cb = int(blockIdx.x) / pl.rblocks, rb = int(blockIdx.x) % pl.rblocks;
  const int c0 = cb * pl.CB, C = int(d.C), Ho = int(d.Ho), Wo = int(d.Wo);
  const int P = pl.P, TH = pl.TH, LDA = pl.LDA, LDG = pl.LDG, LDD = pl.LDD;
  // this CTA's weight-gradient m16 tiles: mt0 .. mt0 + MT - 1 of the plan's pl.MT
  const int mtiles = P / 16, mt0 = rb * ROWS_MT, MT = min_i(ROWS_MT, pl.MT - mt0);
  const int nck = min_i(pl.nchunk, (pl.C16 - c0 + KC - 1) / KC);  // this CTA's chunks
  const bool first_cb = cb == 0, identity = d.residual && !d.projection;
  // the data-gradient units this row block computes: rb, rb + rblocks, ... < nunits
  // (bwd_dgrad_owner; all of them with one row block); the identity shortcut's is row block
  // 0's; bias rows r0b .. r0b + 2 NT each row block's (of the first channel block)
  const int nunits = (d.projection ? 3 : 2) * (pl.dg_half ? 2 : 1);
  const int nown = rb < nunits ? (nunits - 1 - rb) / pl.rblocks + 1 : 0;
  const int r0b = rb * 2 * NT;
  const int64_t HWin = d.H * d.W;

  // once per CTA: depthwise weights, the pointwise slices, sG's padding columns zeroed
  for (int k = 0; k < nck; ++k) stage_dw<T>(d, t, c0 + k * KC, dw + k * 30 * KC);
  stage_weight_slices<T>(d, pl, t, c0, rb, sm);
  const T zero = from_acc<T>(typename AccT<T>::type(0));
  for (int i = tid; i < P * LDG; i += NT) sG[i] = zero;

  // tiles of an image column by column, each top to bottom
  auto tile_origin = [&](int64_t tile, int64_t& bimg, int& r0, int& q0) {
    bimg = tile / pl.tiles_hw;
    const int tr = int(tile % pl.tiles_hw);
    r0 = (tr % pl.tiles_h) * TH;
    q0 = (tr / pl.tiles_h) * TW;
  };
  // whether tile + 1 is the next tile down the same column of the same image
  auto above = [&](int64_t tile) { return (tile + 1) % pl.tiles_hw % pl.tiles_h != 0; };
  // x of (tile, chunk) into dst; carried: its first HR rows from the chunk's carried rows
  auto prefetch = [&](int64_t tile, int chunk, T* dst, bool carried) {
    int64_t bimg;
    int r0, q0;
    tile_origin(tile, bimg, r0, q0);
    if (carried) carry.put(dst, chunk, tid);
    stage_x<T, XC>(d, vec_x, pl.XR, t.x + bimg * d.C * HWin, t.x, c0 + chunk * KC,
                   S * (r0 - 1) - 1, S * (q0 - 1) - 1, dst, carried ? carry.HR : 0);
    ptx::cp_async_commit();
  };

  // accumulator slot j of this warp: unit u = warp + 8 j of MT x nck (m16 tile mt0 + u % MT
  // of chunk u / MT); warp-uniform, indices compile-time
  A accW[WMT][4][4];
#pragma unroll
  for (int j = 0; j < WMT; ++j)
#pragma unroll
    for (int n = 0; n < 4; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) accW[j][n][e] = A(0);
  A bsum[2] = {A(0), A(0)};

  // cluster > 1: the grid's row of CTAs (every channel and row block, all of the same
  // pixels, tile by tile in step) is one thread-block cluster, and each CTA stages gz for a
  // 1 / cluster share of a tile's pixels and copies the rest from the others' shared memory,
  // so that gz is read from global memory once per tile instead of once per CTA. Per tile
  // two cluster barriers, split around work that does not need them: B1 (every share
  // staged) around the chunk's operands, B2 (every copy out of this CTA's sG done, before
  // the next tile overwrites it) around the rest of the tile.
  // pl.red > 1 (then cluster == 1): red CTAs along y are a cluster holding red consecutive
  // groups (split a multiple of red), whose partials they sum before writing one (below);
  // ry, this CTA's place among them. A CTA whose group is past the last one takes part with
  // zero sums.
  const bool share = cluster > 1;
  const unsigned rank = share || pl.red > 1 ? ptx::cluster_ctarank() : 0u;
  const int64_t ry = pl.red > 1 ? int64_t(rank) : 0;
  bool b2_pending = false;  // B2 arrived, not yet waited for
  int64_t group = blockIdx.y;
  if (group - ry >= pl.groups) return;  // (the whole cluster: every CTA of it returns)
  int buf = 0;
  if (group < pl.groups) prefetch(group * pl.GT, 0, xs0, false);
  for (; group - ry < pl.groups; group += pl.split) {
    const int64_t t_end = group >= pl.groups ? group * pl.GT  // (no tiles)
                          : ((group + 1) * pl.GT < pl.tiles ? (group + 1) * pl.GT : pl.tiles);
    for (int64_t tile = group * pl.GT; tile < t_end; ++tile) {
      int64_t bimg;
      int r0, q0;
      tile_origin(tile, bimg, r0, q0);
      // rows carried into this tile's stagings (the tile above came just before, in this
      // group) and out of them (the next tile of the group is the one below)
      const bool carry_in = pl.HR > 0 && tile > group * pl.GT && above(tile - 1);
      const bool carry_out = pl.HR > 0 && tile + 1 < t_end && above(tile);
      for (int ck = 0; ck < nck; ++ck) {
        const int cc0 = c0 + ck * KC;  // the chunk's first channel
        // the next (tile, chunk) in this CTA's walk, whose x is fetched during this one
        int64_t next_tile = tile;
        int next_ck = ck + 1;
        if (next_ck == nck) {
          next_ck = 0;
          next_tile = tile + 1 < t_end ? tile + 1
                      : (group + pl.split < pl.groups ? (group + pl.split) * pl.GT : -1);
        }
        ptx::cp_async_wait<0>();
        __syncthreads();  // this chunk's x published; the previous chunk's operands are free
        if (share && ck == 0) {  // (the previous tile's reads of sG are behind the barrier)
          if (b2_pending) ptx::cluster_wait();  // no other CTA still copies this sG
          stage_gz<T>(d, pl, vec_g, gy, saved, bimg, r0, q0, sG,
                      gz_share_begin(P, int(rank), cluster),
                      gz_share_begin(P, int(rank) + 1, cluster));
          ptx::cluster_arrive();  // B1
        }
        // the rows the tile below shares; read by its prefetch, after chunk_operands' barriers
        if (carry_out) carry.keep(buf ? xs1 : xs0, pl.XR, ck, tid);
        constexpr bool lo = sizeof(T) == 2;  // [a | b | xs | a_lo | b_lo]; float: [a | b | xs]
        const ChunkOut<T> o{sA, sA + KC, sA + 2 * KC, LDA, sD, LDD, lo ? sA + 3 * KC : nullptr,
                            lo ? sA + 4 * KC : nullptr};
        chunk_operands<T, S, TW>(d, TH, r0, q0, cc0, pl.C16, buf ? xs1 : xs0, b1,
                                 dw + ck * 30 * KC, o);
        if (next_tile >= 0)  // lands meanwhile
          prefetch(next_tile, next_ck, buf ? xs0 : xs1,
                   next_tile == tile ? carry_in : (next_tile == tile + 1 && carry_out));
        buf ^= 1;
        if (share && ck == 0) {
          ptx::cluster_wait();  // B1: every share of this tile's gz staged
          gather_gz<T>(pl, sG, rank, unsigned(cluster));
          ptx::cluster_arrive();  // B2
          b2_pending = true;
        } else if (ck == 0) {
          stage_gz<T>(d, pl, vec_g, gy, saved, bimg, r0, q0, sG, 0, P);
        }
        __syncthreads();

        // ---- data gradients: units of (which, m16 row tile, 16 channels) --------------
        const int nh = pl.C16 - cc0 >= 32 ? 2 : 1;  // 16-channel halves in use
        const int per = pl.dg_half ? mtiles : mtiles * nh;  // work items per unit
        for (int u = warp; u < nown * per; u += NT / 32) {
          const int unit = rb + (u / per) * pl.rblocks, rem = u % per;
          const int which = pl.dg_half ? unit / 2 : unit;
          const int mt = pl.dg_half ? rem : rem / nh, h = pl.dg_half ? unit % 2 : rem % nh;
          if (h >= nh) continue;  // (dg_half: this chunk's second half is past C16)
          const T* Ab = sG + (which == 1 ? pl.gzb : 0);
          const T* Bw = reinterpret_cast<const T*>(sm + bwd_wslice_offset(pl, unit)) +
                        (pl.dg_half ? 0 : ck * KC + h * 16);
          const int L = pl.dg_half ? BWD_LDH : pl.LDWT;
          const int K = which == 2 ? pl.GW : pl.N16;
          A acc[2][4] = {};
          if constexpr (sizeof(T) >= 4) {
            if constexpr (TC) data_grad_tf32(acc, Ab + mt * 16 * LDG, LDG, Bw, L, K, lane);
            else data_grad_fma(acc, Ab + mt * 16 * LDG, LDG, Bw, L, K, lane);
          } else {
            for (int kk = 0; kk < K; kk += 16) {
              uint32_t af[4], r[4];
              ptx::ldmatrix_x4(af, Ab + (mt * 16 + lane % 16) * LDG + kk + 8 * (lane / 16));
              ptx::ldmatrix_x4_trans(r, Bw + (kk + lane % 8 + 8 * ((lane / 8) % 2)) * L +
                                            8 * (lane / 16));
              const uint32_t b0[2] = {r[0], r[1]}, b1f[2] = {r[2], r[3]};
              ptx::mma_m16n8k16<T>(acc[0], af, b0);
              ptx::mma_m16n8k16<T>(acc[1], af, b1f);
            }
          }
#pragma unroll
          for (int n8 = 0; n8 < 2; ++n8)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int p = mt * 16 + lane / 4 + (e >= 2 ? 8 : 0);
              const int col = h * 16 + n8 * 8 + 2 * (lane % 4) + (e & 1), c = cc0 + col;
              const int oh = r0 + p / TW, ow = q0 + p % TW;
              if (c >= C || oh >= Ho || ow >= Wo) continue;
              A v = acc[n8][e];
              if (which < 2) {
                v *= sD[p * LDD + which * KC + col];
                stg((which == 0 ? sc_da : sc_db) + ((bimg * Ho + oh) * Wo + ow) * C + c,
                    from_acc<T>(v));
              } else {  // the projection's gradient, into dx at its input pixel
                stg(dx + dx_index(d, bimg, S * oh, S * ow, c), from_acc<T>(v));
              }
            }
        }
        if (identity && rb == 0) {  // the shortcut's gradient is gz itself (Cout == C)
          const bool cl = d.channels_last;
          for (int i = tid; i < P * KC; i += NT) {
            const int k = cl ? i % KC : i / P, p = cl ? i / KC : i % P, c = cc0 + k;
            const int oh = r0 + p / TW, ow = q0 + p % TW;
            if (c >= C || oh >= Ho || ow >= Wo) continue;
            stg(dx + dx_index(d, bimg, oh, ow, c), sG[p * LDG + gz_col(int(d.N), pl.gzb, c)]);
          }
        }

        // ---- weight gradients of this chunk: K = the tile's pixels ----------------------
#pragma unroll
        for (int j = 0; j < WMT; ++j) {
          const int u = warp + 8 * j, mt = mt0 + u % MT;
          if (u >= MT * nck || u / MT != ck) continue;  // warp-uniform
          const int seg = mt < pl.mt_a ? 0 : (mt < 2 * pl.mt_a ? 1 : 2);
          const int gcol = seg == 0 ? mt * 16 : (seg == 1 ? pl.gzb + (mt - pl.mt_a) * 16
                                                          : (mt - 2 * pl.mt_a) * 16);
          if constexpr (sizeof(T) >= 4) {
            const T* B = sA + seg * KC;
            if constexpr (TC) weight_grad_tf32(accW[j], sG + gcol, LDG, B, LDA, nh, P, lane);
            else weight_grad_fma(accW[j], sG + gcol, LDG, B, LDA, nh, P, lane);
          } else {
            // a and b as hi + lo (their rounding residual): float-accurate operands, so dpa
            // and dpb carry only gz's rounding; xs is exact in T
            const int nparts = seg < 2 ? 2 : 1;
            for (int kk = 0; kk < P; kk += 16) {
              uint32_t af[4];
              ptx::ldmatrix_x4_trans(af, sG + (kk + lane % 8 + 8 * (lane / 16)) * LDG + gcol +
                                             8 * ((lane / 8) % 2));
              for (int part = 0; part < nparts; ++part) {
                const T* bsrc = sA + (part == 0 ? seg : 3 + seg) * KC;
#pragma unroll
                for (int hh = 0; hh < 2; ++hh) {
                  if (hh >= nh) continue;
                  uint32_t r[4];
                  ptx::ldmatrix_x4_trans(r, bsrc + (kk + lane % 8 + 8 * ((lane / 8) % 2)) * LDA +
                                                hh * 16 + 8 * (lane / 16));
                  const uint32_t b0[2] = {r[0], r[1]}, b1f[2] = {r[2], r[3]};
                  ptx::mma_m16n8k16<T>(accW[j][2 * hh], af, b0);
                  ptx::mma_m16n8k16<T>(accW[j][2 * hh + 1], af, b1f);
                }
              }
            }
          }
        }
        if (first_cb && ck == 0) {
#pragma unroll
          for (int q = 0; q < 2; ++q) {
            const int r = r0b + tid + q * NT;
            if (r >= pl.rows) continue;
            const int col = bias_col(d, pl, r);
            A sum = A(0);
            for (int p = 0; p < P; ++p) sum += to_acc(sG[p * LDG + col]);
            bsum[q] += sum;
          }
        }
      }
    }

    // ---- the group's partial -------------------------------------------------------------
    if (pl.red > 1) {
      reduce_partials_in_cluster<T>(d, pl, accW, bsum, first_cb, wpart, bpart,
                                    (group - ry) / pl.red, unsigned(ry), mt0, MT, nck, c0, r0b,
                                    reinterpret_cast<A*>(sm + pl.off_a));
      continue;
    }
#pragma unroll
    for (int j = 0; j < WMT; ++j) {
      const int u = warp + 8 * j, mt = mt0 + u % MT, ck = u / MT;
      if (u >= MT * nck) continue;
#pragma unroll
      for (int n8 = 0; n8 < 4; ++n8)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int m = mt * 16 + lane / 4 + (e >= 2 ? 8 : 0);
          const int c = c0 + ck * KC + n8 * 8 + 2 * (lane % 4) + (e & 1);
          const int row = partial_row(d, pl, m);
          if (row >= 0 && c < C) stg(wpart + (group * pl.rows + row) * C + c, accW[j][n8][e]);
          accW[j][n8][e] = A(0);
        }
    }
    if (first_cb) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int r = r0b + tid + q * NT;
        if (r < pl.rows) stg(bpart + group * pl.rows + r, bsum[q]);
        bsum[q] = A(0);
      }
    }
  }
  ptx::cp_async_wait<0>();
  if (b2_pending) ptx::cluster_wait();  // no CTA of the cluster still reads this one's sG
}

// ---- launch 3: the fixed-order sums of the partials --------------------------------------
template <typename T>
__global__ void __launch_bounds__(NT)
    backward_reduce_kernel(BlockDesc d, const typename AccT<T>::type* __restrict__ wpart,
                           const typename AccT<T>::type* __restrict__ bpart,
                           const typename AccT<T>::type* __restrict__ dwpart, int64_t groups,
                           int64_t parts, int rows, BlockGrads<T> g, char* __restrict__ scratch,
                           int64_t scratch_lines) {
  using A = typename AccT<T>::type;
  static_assert(std::is_same_v<A, bwd_acc_t<T>>, "one accumulation type");
  // may start before launch 2 completes (MSF_LAUNCH_PDL): nothing global before this
  ptx::grid_dependency_wait();
  ptx::launch_dependents();
  // The scratch (da, db) is dead once launch 2 has read it, which stream order
  // guarantees here: its lines still in L2 are dropped rather than written back, so the
  // scratch costs DRAM writes only for what L2 evicted while launches 1 and 2 ran (NOTES 34).
  for (int64_t l = blockIdx.x * int64_t(NT) + threadIdx.x; l < scratch_lines;
       l += int64_t(gridDim.x) * NT)
    ptx::discard_l2_line(scratch + l * 128);
  const int64_t C = d.C, N = d.N;
  const int64_t n_w = int64_t(rows) * C, n_dw = C * BWD_NDW;
  const int64_t total = n_w + rows + n_dw;
  for (int64_t idx = blockIdx.x * int64_t(NT) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * NT) {
    A sum = A(0);
    if (idx < n_w) {
      for (int64_t q = 0; q < groups; ++q) sum += ldg(wpart + q * n_w + idx);
      const int64_t row = idx / C, c = idx % C;
      const T v = from_acc<T>(sum);
      if (row < N) stg(g.dpa + row * C + c, v);
      else if (row < 2 * N) stg(g.dpb + (row - N) * C + c, v);
      else stg(g.dws + (row - 2 * N) * C + c, v);
    } else if (idx < n_w + rows) {
      const int64_t r = idx - n_w;
      for (int64_t q = 0; q < groups; ++q) sum += ldg(bpart + q * rows + r);
      const T v = from_acc<T>(sum);
      if (r < N) stg(g.dqa + r, v);
      else if (r < 2 * N) stg(g.dqb + r - N, v);
      else stg(g.dbs + r - 2 * N, v);
    } else {
      const int64_t i = idx - n_w - rows, c = i / BWD_NDW;
      const int v = int(i % BWD_NDW);
      for (int64_t q = 0; q < parts; ++q) sum += ldg(dwpart + q * n_dw + i);
      const T o = from_acc<T>(sum);
      if (v < 9) stg(g.dwa + c * 9 + v, o);
      else if (v == 9) stg(g.dba + c, o);
      else if (v < 19) stg(g.dwb + c * 9 + v - 10, o);
      else if (v == 19) stg(g.dbb + c, o);
      else if (v < 29) stg(g.dwc + c * 9 + v - 20, o);
      else stg(g.dbc + c, o);
    }
  }
}

int env_int(const char* name, int unset = 0) {  // unset: the value when empty or not set
  const char* e = std::getenv(name);
  return e != nullptr && *e != '\0' ? std::atoi(e) : unset;
}

// Whether the current device has compute capability 9.0 or higher (programmatic dependent
// launch, thread-block clusters), asked once per device.
bool device_is_sm90() {
  static std::atomic<int> major[64] = {};  // per device: compute capability major + 1
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return false;
  int m = major[dev].load(std::memory_order_relaxed);
  if (m == 0) {
    int v = 0;
    if (cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) v = 0;
    m = v + 1;
    major[dev].store(m, std::memory_order_relaxed);
  }
  return m - 1 >= 9;
}

// The opt-in sm_90 features, each off until a GPU run has timed it: whether its variable is
// 1 (read once per process; by the emulator, whose tests change them, at every call) and the
// device has compute capability 9.0 or higher.
enum Sm90Knob { kPdl, kBwdCluster, kFwdCluster };
bool sm90_knob(Sm90Knob k) {
  static const char* const names[] = {"MSFUSED_CUDA_PDL", "MSFUSED_CUDA_BWD_CLUSTER",
                                      "MSFUSED_CUDA_FWD_CLUSTER"};
#ifdef MSFUSED_CUDA_EMU
  const bool asked = env_int(names[k]) != 0;
#else
  static const bool read[] = {env_int(names[0]) != 0, env_int(names[1]) != 0,
                              env_int(names[2]) != 0};
  const bool asked = read[k];
#endif
  return asked && device_is_sm90();
}

// Whether launch 1 may run as thread-block clusters: MSFUSED_CUDA_BWD_CLUSTER=1
// (benchmarks/NOTES.md entries 59-60).
bool bwd_clusters_enabled() { return sm90_knob(kBwdCluster); }

// The cluster launch 1 runs as, sharing gz (the kernel's `cluster`): its grid's row of CTAs
// (grid.x: every channel and row block of the same pixels) where clusters are enabled, the
// row is 2 to 8 CTAs (the portable sizes) and such a cluster fits on the device; 1 (each
// CTA stages all of gz itself) otherwise. Either way the same bits.
template <typename Kernel>
int gz_cluster(Kernel kernel, dim3 grid, size_t smem) {
  if (grid.x < 2 || grid.x > 8 || !bwd_clusters_enabled()) return 1;
  return cluster_fits(kernel, dim3(grid.x), NT, smem) ? int(grid.x) : 1;
}

// Launch 1 over one batch slice: d, t, gy, saved and dx that slice's (its images from 0), pl
// the plan with its tiles, groups and split; its partials start at group goff of the batch's.
template <typename T, int S, bool TC>
const char* launch_typed(const BlockDesc& d, const BlockTensors<T>& t, const T* gy,
                         const T* saved, T* dx, const BwdMmaPlan& pl, char* ws, int64_t goff,
                         cudaStream_t stream) {
  auto kernel = block_backward_mma_kernel<T, S, TC>;
  static std::atomic<int> raised[64] = {};
  if (const char* err = allow_dynamic_smem(kernel, pl.smem, raised)) return err;
  const int v = VE<T>;
  const bool vec_x = d.channels_last && d.C % v == 0 && aligned16(t.x);
  const bool vec_g = d.channels_last && d.Cout % v == 0 && d.N % v == 0 && aligned16(gy) &&
                     (saved == nullptr || aligned16(saved));
  T* da = reinterpret_cast<T*>(ws + pl.ws_da);
  T* db = reinterpret_cast<T*>(ws + pl.ws_db);

  using A = bwd_acc_t<T>;
  A* wpart = reinterpret_cast<A*>(ws + pl.ws_wpart) + goff * pl.rows * d.C;
  A* bpart = reinterpret_cast<A*>(ws + pl.ws_bpart) + goff * pl.rows;
  const dim3 grid(unsigned(pl.cblocks * pl.rblocks), unsigned(pl.split));
  const int cluster = pl.red > 1 ? 1 : gz_cluster(kernel, grid, pl.smem);
  const dim3 cdim(unsigned(cluster), unsigned(pl.red));  // (at most one of them over 1)
  const cudaError_t e =
      MSF_LAUNCH_CLUSTER(pdl_enabled(), cdim, kernel, grid, NT, pl.smem, stream, d, t, gy,
                         saved, da, db, dx, wpart, bpart, pl, vec_x, vec_g, cluster);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template <typename T, bool TC>
const char* launch_strided(const BlockDesc& d, const BlockTensors<T>& t, const T* gy,
                           const T* saved, T* dx, const BwdMmaPlan& pl, char* ws, int64_t goff,
                           cudaStream_t stream) {
  return d.stride == 1 ? launch_typed<T, 1, TC>(d, t, gy, saved, dx, pl, ws, goff, stream)
                       : launch_typed<T, 2, TC>(d, t, gy, saved, dx, pl, ws, goff, stream);
}

}  // namespace

bool pdl_enabled() { return sm90_knob(kPdl); }

bool fwd_clusters_enabled() { return sm90_knob(kFwdCluster); }

BwdMmaPlan backward_mma_plan(const BlockDesc& d, int esz) {
  int dev = 0, block = 0, l2 = 0;
  cudaGetDevice(&dev);
  if (cudaDeviceGetAttribute(&block, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    block = 48 * 1024;
  if (cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev) != cudaSuccess) l2 = 0;
  // MSFUSED_CUDA_BWD_SPLIT forces the split count (tests: the result must not change),
  // MSFUSED_CUDA_BWD_GROUP the tiles per group (measuring), MSFUSED_CUDA_BWD_SCRATCH_KB the
  // scratch budget in KiB (0: one slice, the whole batch). Read once per process (by the
  // emulator, whose tests change them, at every call).
#ifdef MSFUSED_CUDA_EMU
  const int split = env_int("MSFUSED_CUDA_BWD_SPLIT"), gt = env_int("MSFUSED_CUDA_BWD_GROUP");
  const int scratch_kb = env_int("MSFUSED_CUDA_BWD_SCRATCH_KB", -1);
#else
  static const int split = env_int("MSFUSED_CUDA_BWD_SPLIT");
  static const int gt = env_int("MSFUSED_CUDA_BWD_GROUP");
  static const int scratch_kb = env_int("MSFUSED_CUDA_BWD_SCRATCH_KB", -1);
#endif
  // By default a quarter of L2 (12.5 MB on an H100, 15 on an H200), so that launch 2 finds
  // the scratch launch 1 just wrote in L2 beside launch 1's own traffic, in slices of at
  // least a wave of launch-1 CTAs; a budget set explicitly is kept whatever the wave.
  // Clusters (MSFUSED_CUDA_BWD_CLUSTER=1): the partials of a one-channel-block grid summed
  // across clusters of 4 CTAs along y (4: four such clusters fit a GPC of 16 SMs, where 8
  // would leave a GPC with fewer than 16 free SMs one cluster).
  const int red = bwd_clusters_enabled() ? 4 : 1;
  if (scratch_kb >= 0) return plan_backward_mma(d, esz, size_t(block), split, gt,
                                                size_t(scratch_kb) << 10, false, red);
  return plan_backward_mma(d, esz, size_t(block), split, gt, size_t(l2) / 4, true, red);
}

template <typename T>
const char* launch_block_backward_mma(const BlockDesc& d, const BlockTensors<T>& t,
                                      const T* grad_y, const T* saved, const BlockGrads<T>& g,
                                      void* workspace, bool tf32, cudaStream_t stream,
                                      bool* launched) {
  const BwdMmaPlan pl = backward_mma_plan(d, int(sizeof(T)));
  *launched = pl.P != 0;
  if (pl.P == 0) return nullptr;
  using A = bwd_acc_t<T>;
  char* ws = static_cast<char*>(workspace);
  const char* err = nullptr;
  A* dwpart = reinterpret_cast<A*>(ws + pl.ws_dwpart);
  // launches 1 and 2 slice by slice (one slice unless the scratch budget asks for more):
  // every per-image tensor is image-major in both layouts, so a slice is the batch's
  // tensors from image b0 on, with B = its images
  BlockDesc b1d = d;
  b1d.B = 1;
  const int64_t x_img = d.C * d.H * d.W, y_img = d.Cout * d.Ho * d.Wo;
  const int64_t dw_img = backward_dw_parts(b1d) * d.C * BWD_NDW;
  for (int64_t b0 = 0; b0 < d.B; b0 += pl.slice_imgs) {
    BlockDesc ds = d;
    ds.B = d.B - b0 < pl.slice_imgs ? d.B - b0 : pl.slice_imgs;
    BlockTensors<T> ts = t;
    ts.x = t.x + b0 * x_img;
    const T* gys = grad_y + b0 * y_img;
    const T* svs = saved != nullptr ? saved + b0 * y_img : nullptr;
    BwdMmaPlan ps = pl;  // the slice's tiles and groups (a whole number of groups before it)
    ps.tiles = ds.B * pl.tiles_hw;
    ps.groups = (ps.tiles + pl.GT - 1) / pl.GT;
    if (ps.split > ps.groups && pl.red == 1) ps.split = int(ps.groups);  // (red: one slice)
    const int64_t goff = b0 * pl.tiles_hw / pl.GT;
    T* dx_s = g.dx + b0 * x_img;
    if constexpr (std::is_same_v<T, float>) {
      if (!tf32) err = launch_strided<T, false>(ds, ts, gys, svs, dx_s, ps, ws, goff, stream);
      else err = launch_strided<T, true>(ds, ts, gys, svs, dx_s, ps, ws, goff, stream);
    } else if constexpr (std::is_same_v<T, double>) {
      err = launch_strided<T, false>(ds, ts, gys, svs, dx_s, ps, ws, goff, stream);
    } else {
      err = launch_strided<T, true>(ds, ts, gys, svs, dx_s, ps, ws, goff, stream);
    }
    if (err != nullptr) return err;
    err = launch_backward_dw<T>(ds, ts, reinterpret_cast<const T*>(ws + pl.ws_da),
                                reinterpret_cast<const T*>(ws + pl.ws_db), dx_s,
                                dwpart + b0 * dw_img, stream);
    if (err != nullptr) return err;
  }
  const int64_t total = int64_t(pl.rows) * d.C + pl.rows + d.C * BWD_NDW;
  int64_t blocks = (total + NT - 1) / NT;
  if (blocks > 4096) blocks = 4096;
  auto rk = backward_reduce_kernel<T>;
  // the scratch [ws_da, ws_wpart): the whole 128-byte lines inside it (a line it shares
  // with the partials, if the workspace is not 128-byte aligned, stays)
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(ws + pl.ws_da) + 127) / 128 * 128;
  const uintptr_t hi = reinterpret_cast<uintptr_t>(ws + pl.ws_wpart) / 128 * 128;
  const int64_t scratch_lines = hi > lo ? int64_t((hi - lo) / 128) : 0;
  const cudaError_t e =
      MSF_LAUNCH_PDL(pdl_enabled(), rk, unsigned(blocks), NT, 0, stream, d,
                     reinterpret_cast<const A*>(ws + pl.ws_wpart),
                     reinterpret_cast<const A*>(ws + pl.ws_bpart), dwpart, pl.parts,
                     backward_dw_parts(d), pl.rows, g, reinterpret_cast<char*>(lo),
                     scratch_lines);
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template const char* launch_block_backward_mma<float>(const BlockDesc&,
                                                      const BlockTensors<float>&, const float*,
                                                      const float*, const BlockGrads<float>&,
                                                      void*, bool, cudaStream_t, bool*);
template const char* launch_block_backward_mma<double>(const BlockDesc&,
                                                       const BlockTensors<double>&,
                                                       const double*, const double*,
                                                       const BlockGrads<double>&, void*, bool,
                                                       cudaStream_t, bool*);
template const char* launch_block_backward_mma<__half>(const BlockDesc&,
                                                       const BlockTensors<__half>&,
                                                       const __half*, const __half*,
                                                       const BlockGrads<__half>&, void*,
                                                       bool, cudaStream_t, bool*);
template const char* launch_block_backward_mma<__nv_bfloat16>(
    const BlockDesc&, const BlockTensors<__nv_bfloat16>&, const __nv_bfloat16*,
    const __nv_bfloat16*, const BlockGrads<__nv_bfloat16>&, void*, bool, cudaStream_t, bool*);

}  // namespace cuda
}  // namespace msfused
