// The on-chip recompute shared by the tensor-core forward (block_forward_mma.cu) and the
// tensor-core backward's first launch (block_backward_mma.cu): x over an output tile plus
// its halo staged in shared memory one chunk of KC channels at a time, and the three
// depthwise convs run from it into the pointwise GEMMs' operand A[pixel][k] = a, b and the
// strided x, rounded to the dtype as eager's conv outputs are.
//
// The tile is TH x TW output pixels at (r0, q0) of one image. b1 is needed on the tile plus a
// 1-pixel ring (the second conv's window), which reads input rows s*(r0-1)-1 ..
// s*(r0+TH)+1: XR = s*(TH+1)+3 staged rows from ih0 = s*(r0-1)-1 (columns alike, XC).
#pragma once
#include "common.cuh"
#include "global_io.cuh"
#include "ptx_wrappers.cuh"

namespace msfused {
namespace cuda {

constexpr int DWT_NT = 256;  // threads per CTA of the kernels that use this file
constexpr int DWT_KC = 32;   // channels per staged chunk
constexpr int DWT_SEG = 4;   // rows per depthwise work item: 3 (SEG + 2) / SEG loads per output

// Elements per 16 bytes (one cp.async / vector access).
template <typename T> constexpr int VE = 16 / int(sizeof(T));

__device__ __forceinline__ int min_i(int a, int b) { return a < b ? a : b; }

template <typename A>
__device__ __forceinline__ void load_taps(A (&w)[9], const A* __restrict__ src) {
#pragma unroll
  for (int j = 0; j < 9; ++j) w[j] = src[j];
}

// One channel's 3x3 depthwise conv down a column of a channel-interleaved shared tile:
// for r in [r_begin, r_end), v = sum_ij w[3i+j] src[(S r + i) ld + j KC] and emit(r, v, the
// window's centre). The 3x3 window slides in registers: S new input rows (3 S loads) per
// output instead of 9. A: the accumulation type (float; double for float64).
template <int S, typename Src, typename A, typename Emit>
__device__ __forceinline__ void dw_column(const Src* __restrict__ src, int ld,
                                          const A (&w)[9], int r_begin, int r_end,
                                          Emit emit) {
  constexpr int KC = DWT_KC;
  A win[3][3];
  auto load_row = [&](A (&row)[3], int ir) {
#pragma unroll
    for (int j = 0; j < 3; ++j) row[j] = to_acc(src[ir * ld + j * KC]);
  };
  load_row(win[0], S * r_begin);
  load_row(win[1], S * r_begin + 1);
  load_row(win[2], S * r_begin + 2);
  for (int r = r_begin; r < r_end; ++r) {
    if (r > r_begin) {
#pragma unroll
      for (int j = 0; j < 3; ++j) {
        if (S == 1) {
          win[0][j] = win[1][j];
          win[1][j] = win[2][j];
        } else {
          win[0][j] = win[2][j];
        }
      }
      if (S == 1) {
        load_row(win[2], r + 2);
      } else {
        load_row(win[1], S * r + 1);
        load_row(win[2], S * r + 2);
      }
    }
    A v = A(0);
#pragma unroll
    for (int i = 0; i < 3; ++i)
#pragma unroll
      for (int j = 0; j < 3; ++j) v += w[i * 3 + j] * win[i][j];
    emit(r, v, win[1][1]);
  }
}

// x[b, c0 .. c0+KC, ih0 + rr0 .. ih0+XR, iw0 .. iw0+XC] into xs[(rr * XC + cc) * KC + k], zero
// outside the image and for c >= C (rows below rr0 are left as they are: SharedRows below). vec: 16-byte cp.async (channels_last, C a multiple of 16 bytes' elements, x
// 16-byte aligned); otherwise element loads, coalesced along the layout's fastest dimension.
// x_any: any valid address (the zero-fill copies' source).
template <typename T, int XC>
__device__ __forceinline__ void stage_x(const BlockDesc& d, bool vec, int XR, const T* x_img,
                                        const T* x_any, int c0, int ih0, int iw0,
                                        T* __restrict__ xs, int rr0 = 0,
                                        int tid = int(threadIdx.x)) {
  constexpr int KC = DWT_KC, NT = DWT_NT;
  const int C = int(d.C), H = int(d.H), W = int(d.W);
  const int nr = XR - rr0;
  constexpr int V = VE<T>;
  if (vec) {
    for (int i = tid; i < nr * XC * (KC / V); i += NT) {
      const int v = i % (KC / V), pos = rr0 * XC + i / (KC / V), rr = pos / XC, cc = pos % XC;
      const int h = ih0 + rr, w = iw0 + cc, c = c0 + V * v;
      const bool ok = h >= 0 && h < H && w >= 0 && w < W && c < C;
      const T* src = ok ? x_img + (int64_t(h) * W + w) * C + c : x_any;
      ptx::cp_async_16(xs + pos * KC + V * v, src, ok);
    }
    return;
  }
  const T zero = from_acc<T>(typename AccT<T>::type(0));
  if (d.channels_last) {  // channels fastest: consecutive threads, consecutive memory
    for (int i = tid; i < nr * XC * KC; i += NT) {
      const int k = i % KC, pos = rr0 * XC + i / KC, rr = pos / XC, cc = pos % XC;
      const int h = ih0 + rr, w = iw0 + cc, c = c0 + k;
      const bool ok = h >= 0 && h < H && w >= 0 && w < W && c < C;
      xs[pos * KC + k] = ok ? ldg(x_img + (int64_t(h) * W + w) * C + c) : zero;
    }
  } else {  // NCHW: columns fastest
    for (int i = tid; i < nr * XC * KC; i += NT) {
      const int cc = i % XC, r = i / XC, rr = rr0 + r % nr, k = r / nr;
      const int h = ih0 + rr, w = iw0 + cc, c = c0 + k;
      const bool ok = h >= 0 && h < H && w >= 0 && w < W && c < C;
      xs[(rr * XC + cc) * KC + k] = ok ? ldg(x_img + (int64_t(c) * H + h) * W + w) : zero;
    }
  }
}

// bytes (a multiple of 16) from src to dst in shared memory, both 16-byte aligned, by the
// whole CTA, 16 bytes per access.
__device__ __forceinline__ void copy_smem16(const void* src, void* dst, int bytes,
                                            int tid = int(threadIdx.x)) {
  const Vec16* s = static_cast<const Vec16*>(src);
  Vec16* o = static_cast<Vec16*>(dst);
  for (int i = tid; i < bytes / 16; i += DWT_NT) o[i] = s[i];
}

// The rows a tile's staging shares with the staging of the tile below it: its last S + 3
// rows are the next one's first S + 3. Kernels that walk tiles down a column keep them per
// chunk (chunk k's at base + k * ELEMS, in the stage's layout) instead of staging them again.
template <typename T, int S, int XC>
struct SharedRows {
  static constexpr int HR = S + 3, ELEMS = HR * XC * DWT_KC;
  T* base;
  // chunk k's rows out of its landed stage xs (XR rows)
  __device__ __forceinline__ void keep(const T* xs, int XR, int k, int tid) const {
    copy_smem16(xs + (XR - HR) * XC * DWT_KC, base + k * ELEMS, ELEMS * int(sizeof(T)), tid);
  }
  // into chunk k's next stage xs, whose rows from HR on stage_x fetches (rr0 = HR)
  __device__ __forceinline__ void put(T* xs, int k, int tid) const {
    copy_smem16(base + k * ELEMS, xs, ELEMS * int(sizeof(T)), tid);
  }
};

// Depthwise weights and biases of channels c0 .. c0+KC: dw[(which * KC + k) * 9 + tap] for
// which = a, b (first conv of branch B), c (second), then the biases at 27 KC + which * KC + k
// (in the accumulation type).
template <typename T>
__device__ __forceinline__ void stage_dw(const BlockDesc& d, const BlockTensors<T>& t, int c0,
                                         typename AccT<T>::type* __restrict__ dw,
                                         int tid = int(threadIdx.x)) {
  using A = typename AccT<T>::type;
  constexpr int KC = DWT_KC;
  const int C = int(d.C);
  for (int i = tid; i < 30 * KC; i += DWT_NT) {
    A v = A(0);
    if (i < 27 * KC) {
      const int which = i / (9 * KC), r = i % (9 * KC), c = c0 + r / 9;
      const T* w = which == 0 ? t.wa : (which == 1 ? t.wb : t.wc);
      if (c < C) v = to_acc(ldg(w + c * 9 + r % 9));
    } else {
      const int which = (i - 27 * KC) / KC, c = c0 + (i - 27 * KC) % KC;
      const T* b = which == 0 ? t.ba : (which == 1 ? t.bb : t.bc);
      if (b != nullptr && c < C) v = to_acc(ldg(b + c));
    }
    dw[i] = v;
  }
}

// Where one chunk's operands go: out_a[p * lda + k] = a at tile pixel p = r * TW + col for chunk
// channel k (likewise out_b = b, out_x = the strided x, null when not needed), and, when dact is
// not null, dact[p * ldd + k] = act'(a_pre), dact[p * ldd + KC + k] = act'(b_pre) (the backward's
// activation derivatives, in the accumulation type), and when out_a_lo / out_b_lo are not null, the
// rounding residuals a - (T)a, b - (T)b (the backward's weight-gradient GEMM adds them for
// float-accurate operands). Channels c0 + k in [C, c16) get zeros; nothing is written at or past
// c16.
template <typename T>
struct ChunkOut {
  T* out_a;
  T* out_b;
  T* out_x;
  int lda;
  typename AccT<T>::type* dact;
  int ldd;
  T* out_a_lo = nullptr;
  T* out_b_lo = nullptr;
};

// The chunk of channels c0 .. c0+KC staged in xs (stage_x, published by a __syncthreads()) with its
// depthwise weights in dw (stage_dw): b1 on the tile plus its ring (activated, in the accumulation
// type, zero outside the output: the second conv's padding) into b1, then a, xs and b into the
// operand. Ends with a __syncthreads(): xs, b1 and dw are free again. tid (here and in the
// stagings): the thread's index in the CTA, passed where the caller has made it opaque to the
// compiler (block_forward_mma.cu's tile loop).
template <typename T, int S, int TW>
__device__ __forceinline__ void chunk_operands(const BlockDesc& d, int TH, int r0, int q0,
                                               int c0, int c16, const T* __restrict__ xs,
                                               typename AccT<T>::type* __restrict__ b1,
                                               const typename AccT<T>::type* __restrict__ dw,
                                               const ChunkOut<T>& o,
                                               int tid = int(threadIdx.x)) {
  using A = typename AccT<T>::type;
  constexpr int KC = DWT_KC, NT = DWT_NT, SEG = DWT_SEG;
  constexpr int XC = S * (TW + 1) + 3, RW = TW + 2;
  const int C = int(d.C), Ho = int(d.Ho), Wo = int(d.Wo), act = d.act;
  const int seg_ring = (TH + 2 + SEG - 1) / SEG, seg_tile = (TH + SEG - 1) / SEG;
  const T zero = from_acc<T>(typename AccT<T>::type(0));
  // b1; each item is one channel and one column over SEG rows (consecutive threads:
  // consecutive channels, conflict-free)
  for (int i = tid; i < KC * RW * seg_ring; i += NT) {
    const int k = i % KC, rest = i / KC, lc = rest % RW, r_begin = (rest / RW) * SEG;
    const int r_end = min_i(r_begin + SEG, TH + 2), ow = q0 - 1 + lc;
    A* out = b1 + lc * KC + k;
    if (c0 + k >= C || ow < 0 || ow >= Wo) {
      for (int r = r_begin; r < r_end; ++r) out[r * RW * KC] = A(0);
      continue;
    }
    A w[9];
    load_taps(w, dw + (KC + k) * 9);
    const A bias = dw[27 * KC + KC + k];
    dw_column<S>(xs + S * lc * KC + k, XC * KC, w, r_begin, r_end, [&](int r, A v, A) {
      const int oh = r0 - 1 + r;
      out[r * RW * KC] = (oh >= 0 && oh < Ho) ? act_apply(act, v + bias) : A(0);
    });
  }
  // a and the strided x at the tile's pixels
  for (int i = tid; i < KC * TW * seg_tile; i += NT) {
    const int k = i % KC, rest = i / KC, lc = rest % TW, r_begin = (rest / TW) * SEG;
    const int r_end = min_i(r_begin + SEG, TH), c = c0 + k;
    if (c >= c16) continue;
    T* oa = o.out_a + lc * o.lda + k;  // + p * lda with p = r * TW + lc
    T* ox = o.out_x != nullptr ? o.out_x + lc * o.lda + k : nullptr;
    T* ol = o.out_a_lo != nullptr ? o.out_a_lo + lc * o.lda + k : nullptr;
    A* od = o.dact != nullptr ? o.dact + lc * o.ldd + k : nullptr;
    if (c >= C) {
      for (int r = r_begin; r < r_end; ++r) {
        oa[r * TW * o.lda] = zero;
        if (ox != nullptr) ox[r * TW * o.lda] = zero;
        if (ol != nullptr) ol[r * TW * o.lda] = zero;
        if (od != nullptr) od[r * TW * o.ldd] = A(0);
      }
      continue;
    }
    A w[9];
    load_taps(w, dw + k * 9);
    const A bias = dw[27 * KC + k];
    dw_column<S>(xs + (S * XC + S * (lc + 1)) * KC + k, XC * KC, w, r_begin, r_end,
                 [&](int r, A v, A center) {
                   const A av = act_apply(act, v + bias);
                   const T ah = from_acc<T>(av);
                   oa[r * TW * o.lda] = ah;
                   if (ol != nullptr) ol[r * TW * o.lda] = from_acc<T>(av - to_acc(ah));
                   if (ox != nullptr) ox[r * TW * o.lda] = from_acc<T>(center);
                   if (od != nullptr) od[r * TW * o.ldd] = act_grad(act, A(1), v + bias);
                 });
  }
  __syncthreads();
  // b, from b1
  for (int i = tid; i < KC * TW * seg_tile; i += NT) {
    const int k = i % KC, rest = i / KC, lc = rest % TW, r_begin = (rest / TW) * SEG;
    const int r_end = min_i(r_begin + SEG, TH), c = c0 + k;
    if (c >= c16) continue;
    T* ob = o.out_b + lc * o.lda + k;
    T* ol = o.out_b_lo != nullptr ? o.out_b_lo + lc * o.lda + k : nullptr;
    A* od = o.dact != nullptr ? o.dact + lc * o.ldd + KC + k : nullptr;
    if (c >= C) {
      for (int r = r_begin; r < r_end; ++r) {
        ob[r * TW * o.lda] = zero;
        if (ol != nullptr) ol[r * TW * o.lda] = zero;
        if (od != nullptr) od[r * TW * o.ldd] = A(0);
      }
      continue;
    }
    A w[9];
    load_taps(w, dw + (2 * KC + k) * 9);
    const A bias = dw[27 * KC + 2 * KC + k];
    dw_column<1>(b1 + lc * KC + k, RW * KC, w, r_begin, r_end, [&](int r, A v, A) {
      const A bv = act_apply(act, v + bias);
      const T bh = from_acc<T>(bv);
      ob[r * TW * o.lda] = bh;
      if (ol != nullptr) ol[r * TW * o.lda] = from_acc<T>(bv - to_acc(bh));
      if (od != nullptr) od[r * TW * o.ldd] = act_grad(act, A(1), v + bias);
    });
  }
  __syncthreads();
}

}  // namespace cuda
}  // namespace msfused
