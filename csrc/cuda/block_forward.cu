// Fused forward of the block in one launch.
//
// Grid: x = B * tiles (8x8 output pixels of one image), y = blocks of 64 output channels of
// one branch (concat: the blocks of branch A, then those of branch B; add: blocks of N).
// A CTA (256 threads) loops over chunks of KC input channels: stages x over the tile and
// its halo in shared memory, computes a (or b1 on the tile plus ring, then b) and the
// strided x for a projection on chip, and accumulates the 64 x 64 output block of the
// pointwise GEMM (K = the chunk's channels of each needed branch + projection). The
// epilogue adds biases, the residual, applies the activation and writes y (and the
// pre-activation) once. Nothing between x and y touches global memory.
//
// Two GEMM paths:
//  - float32 / float64 (block_forward_kernel): FMAs, accumulators in registers, each thread
//    owns 4 output channels x 4 pixels.
//  - float16 / bfloat16 (block_forward_tc_kernel): tensor cores through nvcuda::wmma
//    (16x16x16, float accumulation). The chunk's a, b and strided x are rounded to the
//    dtype (as eager PyTorch's conv outputs are) into k-major [KC][LDP] tiles, the
//    pointwise weights into co-major [COB][LDK] tiles; each of the 8 warps owns a
//    16-pixel x 32-channel piece of the 64 x 64 output and accumulates every K-slice
//    (branch A, branch B, projection) into the same float fragments. The fragments go
//    through shared memory to the same epilogue as the FMA path.
#include "block_cuda.h"
#include "tile.cuh"

namespace msfused {
namespace cuda {
namespace {

constexpr int COB = 64;       // output channels per CTA
constexpr int WST = COB + 1;  // padded row of the staged pointwise weights

template <typename T> struct FwdKC { static constexpr int value = 16; };
template <> struct FwdKC<double> { static constexpr int value = 8; };

template <typename A, int KC>
size_t fwd_smem_elems(int s) {
  return size_t(KC) * stage_rows(s) * stage_cols(s) + size_t(KC) * RH * RW + 3 * size_t(KC) * TP +
         3 * size_t(KC) * WST + 30 * size_t(KC);
}

// The CTA's output tile and channel block. Which branch this CTA computes; co indexes the
// branch's N channels, ch_off the first of its channels in the output.
struct CtaTile {
  int64_t bimg, r0, q0, co0, ch_off;
  bool need_a, need_b, proj;
};

__device__ __forceinline__ CtaTile cta_tile(const BlockDesc& d, int tiles_w, int tiles_hw,
                                            int nblk_a) {
  CtaTile ct;
  ct.bimg = blockIdx.x / tiles_hw;
  const int trem = static_cast<int>(blockIdx.x % tiles_hw);
  ct.r0 = int64_t(trem / tiles_w) * TH;
  ct.q0 = int64_t(trem % tiles_w) * TW;
  const int blk = blockIdx.y;
  ct.need_a = ct.need_b = true;
  ct.co0 = int64_t(blk) * COB;
  ct.ch_off = 0;
  if (d.merge == kConcat) {
    if (blk < nblk_a) {
      ct.need_b = false;
    } else {
      ct.need_a = false;
      ct.co0 = int64_t(blk - nblk_a) * COB;
      ct.ch_off = d.N;
    }
  }
  ct.proj = d.projection;
  return ct;
}

// Epilogue: biases, residual, activation; masked to real channels and pixels. The thread
// finishes output channels co0 + tc + 16 i and tile pixels tp + 16 j (i, j < 4); get(i, j)
// is the GEMM's value there.
template <typename T, typename A, typename Get>
__device__ __forceinline__ void epilogue(const BlockDesc& d, const BlockTensors<T>& t, T* y,
                                         T* pre, const CtaTile& ct, int tc, int tp, Get get) {
  const int64_t bimg = ct.bimg, r0 = ct.r0, q0 = ct.q0, co0 = ct.co0, ch_off = ct.ch_off;
  const int64_t N = d.N;
  const bool need_a = ct.need_a, need_b = ct.need_b, proj = ct.proj;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t co = co0 + tc + 16 * i;
    if (co >= N) continue;
    const int64_t ch = ch_off + co;
    A bias = A(0);
    if (need_a && t.qa != nullptr) bias += to_acc(t.qa[co]);
    if (need_b && t.qb != nullptr) bias += to_acc(t.qb[co]);
    if (proj && t.bs != nullptr) bias += to_acc(t.bs[ch]);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int p = tp + 16 * j;
      const int64_t oh = r0 + p / TW, ow = q0 + p % TW;
      if (oh >= d.Ho || ow >= d.Wo) continue;
      A v = get(i, j) + bias;
      if (d.residual && !proj)  // identity: stride 1 and Cout == C, so (oh, ow) is in x
        v += to_acc(t.x[io_index(d.channels_last, bimg, ch, oh, ow, d.C, d.H, d.W)]);
      const int64_t o = io_index(d.channels_last, bimg, ch, oh, ow, d.Cout, d.Ho, d.Wo);
      if (pre != nullptr) pre[o] = from_acc<T>(v);
      y[o] = from_acc<T>(act_apply(d.act, v));
    }
  }
}

template <typename T, int KC>
__global__ void __launch_bounds__(NT) block_forward_kernel(BlockDesc d, BlockTensors<T> t, T* y,
                                                           T* pre, int tiles_w, int tiles_hw,
                                                           int nblk_a) {
  using A = typename AccT<T>::type;
  MSF_EXTERN_SMEM(smem_raw);
  const int s = d.stride;
  const int XR = stage_rows(s), XC = stage_cols(s);
  A* xs = reinterpret_cast<A*>(smem_raw);
  A* b1 = xs + KC * XR * XC;
  A* sa = b1 + KC * RH * RW;
  A* sb = sa + KC * TP;
  A* sx = sb + KC * TP;
  A* wA = sx + KC * TP;
  A* wB = wA + KC * WST;
  A* wS = wB + KC * WST;
  A* dw = wS + KC * WST;  // 30 * KC

  const CtaTile ct = cta_tile(d, tiles_w, tiles_hw, nblk_a);
  const int64_t bimg = ct.bimg, r0 = ct.r0, q0 = ct.q0, co0 = ct.co0, ch_off = ct.ch_off;
  const int64_t N = d.N, C = d.C;
  const bool need_a = ct.need_a, need_b = ct.need_b, proj = ct.proj;

  // NHWC: consecutive threads own consecutive channels (coalesced stores); NCHW: pixels.
  const int tid = threadIdx.x;
  const int tc = d.channels_last ? tid % 16 : tid / 16;
  const int tp = d.channels_last ? tid / 16 : tid % 16;

  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);

  const int64_t ih0 = s * (r0 - 1) - 1, iw0 = s * (q0 - 1) - 1;
  for (int64_t c0 = 0; c0 < C; c0 += KC) {
    __syncthreads();  // the previous chunk's GEMM is done with the staged operands
    stage_x<T, A, KC>(d, t.x, bimg, c0, ih0, iw0, XR, XC, xs);
    stage_dw_weights<T, A, KC>(d, t, c0, dw);
    for (int idx = tid; idx < KC * COB; idx += NT) {
      const int k = idx % KC, j = idx / KC;  // k fastest: consecutive channels in memory
      const int64_t c = c0 + k, co = co0 + j;
      const bool ok = c < C && co < N;
      wA[k * WST + j] = (need_a && ok) ? to_acc(t.pa[co * C + c]) : A(0);
      wB[k * WST + j] = (need_b && ok) ? to_acc(t.pb[co * C + c]) : A(0);
      wS[k * WST + j] = (proj && ok) ? to_acc(t.ws[(ch_off + co) * C + c]) : A(0);
    }
    __syncthreads();
    if (need_b) compute_b1<A, KC>(d, r0, q0, XR, XC, xs, dw, b1);
    for (int idx = tid; idx < KC * TP; idx += NT) {
      const int k = idx / TP, p = idx % TP;
      if (need_a) sa[idx] = act_apply(d.act, a_pre_at<A, KC>(s, k, p, XR, XC, xs, dw));
      if (proj) sx[idx] = xs_at(s, k, p, XR, XC, xs);
    }
    __syncthreads();
    if (need_b)
      for (int idx = tid; idx < KC * TP; idx += NT) {
        const int k = idx / TP, p = idx % TP;
        sb[idx] = act_apply(d.act, b_pre_at<A, KC>(k, p, b1, dw));
      }
    __syncthreads();
#pragma unroll 4
    for (int k = 0; k < KC; ++k) {
      if (need_a) {
        A w[4], v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = wA[k * WST + tc + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = sa[k * TP + tp + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += w[i] * v[j];
      }
      if (need_b) {
        A w[4], v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = wB[k * WST + tc + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = sb[k * TP + tp + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += w[i] * v[j];
      }
      if (proj) {
        A w[4], v[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) w[i] = wS[k * WST + tc + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = sx[k * TP + tp + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += w[i] * v[j];
      }
    }
  }

  epilogue<T, A>(d, t, y, pre, ct, tc, tp, [&](int i, int j) { return acc[i][j]; });
}

// ---- float16 / bfloat16: the pointwise GEMM on tensor cores (nvcuda::wmma) ---------------
//
// D[p][co] = sum_k act[p][k] * w[k][co] over the chunk's K-slices, M = 64 tile pixels,
// N = 64 output channels, 16x16x16 fragments. Operand tiles (16-bit, in shared memory):
//   sa, sb, sx: [TC_KC][LDP], element (p, k) at k * LDP + p: the A operand, col_major.
//     k-major so the depthwise loops (consecutive threads, consecutive pixels) store
//     without bank conflicts; LDP = 72 (144-byte rows) keeps the 8 rows that one 8x8
//     fragment piece reads in distinct 16-byte bank groups.
//   wA, wB, wS: [COB][LDK], element (k, co) at co * LDK + k: the B operand, col_major.
//     co-major so the staging loop reads the weights (co, c) with c fastest, coalesced;
//     LDK = 24 (48-byte rows), conflict-free for the same reason.
// Leading dimensions are multiples of 8 elements and every fragment pointer is 32-byte
// aligned (WMMA's rules; tools/cuda_emu asserts them). The float accumulators are stored to
// sout [64][LDO] (pixel-major for NHWC, channel-major for NCHW, so the epilogue's reads are
// at most 2-way conflicted), which reuses the staging area once the chunk loop is done.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#error "msfused: the float16/bfloat16 forward needs bfloat16 tensor cores (sm_80 or newer); set TORCH_CUDA_ARCH_LIST to 8.0 or above"
#endif
constexpr int TC_KC = 16;      // channels per chunk: one 16-deep k-step per K-slice
constexpr int LDP = TP + 8;    // 72
constexpr int LDK = TC_KC + 8; // 24
constexpr int LDO = COB + 8;   // 72 floats
static_assert(TP == 64 && COB == 64 && NT == 256, "8 warps of 16 pixels x 32 channels");
static_assert(LDP % 8 == 0 && LDK % 8 == 0 && LDO % 4 == 0, "WMMA leading dimensions");

// Byte offsets of the tensor-core kernel's shared memory (128-byte aligned sections).
struct TcSmem {
  size_t xs, b1, dw, sa, sb, sx, wa, wb, ws, total;
};
__host__ __device__ inline size_t align128(size_t v) { return (v + 127) & ~size_t(127); }
__host__ __device__ inline TcSmem tc_smem(int s) {
  constexpr size_t F = sizeof(float), H = 2;  // float staging, 16-bit operands
  TcSmem m;
  size_t o = 0;
  m.xs = o; o = align128(o + F * TC_KC * stage_rows(s) * stage_cols(s));
  m.b1 = o; o = align128(o + F * TC_KC * RH * RW);
  m.dw = o; o = align128(o + F * 30 * TC_KC);
  m.sa = o; o = align128(o + H * TC_KC * LDP);
  m.sb = o; o = align128(o + H * TC_KC * LDP);
  m.sx = o; o = align128(o + H * TC_KC * LDP);
  m.wa = o; o = align128(o + H * COB * LDK);
  m.wb = o; o = align128(o + H * COB * LDK);
  m.ws = o; o = align128(o + H * COB * LDK);
  const size_t out = F * TP * LDO;  // sout, from offset 0 after the chunk loop
  m.total = o > out ? o : out;
  return m;
}

// acc[n] += A(16 px x 16 k at act) * B(16 k x 16 co at w + 16 n co), n = 0, 1.
template <typename T>
__device__ __forceinline__ void tc_mma(
    nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> (&acc)[2],
    const T* act, const T* w) {
  namespace wmma = nvcuda::wmma;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa;
  wmma::load_matrix_sync(fa, act, LDP);
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
    wmma::load_matrix_sync(fb, w + n * 16 * LDK, LDK);
    wmma::mma_sync(acc[n], fa, fb, acc[n]);
  }
}

template <typename T>
__global__ void __launch_bounds__(NT) block_forward_tc_kernel(BlockDesc d, BlockTensors<T> t,
                                                              T* y, T* pre, int tiles_w,
                                                              int tiles_hw, int nblk_a) {
  namespace wmma = nvcuda::wmma;
  constexpr int KC = TC_KC;
  MSF_EXTERN_SMEM(smem_raw);
  const int s = d.stride;
  const int XR = stage_rows(s), XC = stage_cols(s);
  const TcSmem L = tc_smem(s);
  float* xs = reinterpret_cast<float*>(smem_raw + L.xs);
  float* b1 = reinterpret_cast<float*>(smem_raw + L.b1);
  float* dw = reinterpret_cast<float*>(smem_raw + L.dw);
  T* sa = reinterpret_cast<T*>(smem_raw + L.sa);
  T* sb = reinterpret_cast<T*>(smem_raw + L.sb);
  T* sx = reinterpret_cast<T*>(smem_raw + L.sx);
  T* wA = reinterpret_cast<T*>(smem_raw + L.wa);
  T* wB = reinterpret_cast<T*>(smem_raw + L.wb);
  T* wS = reinterpret_cast<T*>(smem_raw + L.ws);
  float* sout = reinterpret_cast<float*>(smem_raw);  // after the chunk loop only

  const CtaTile ct = cta_tile(d, tiles_w, tiles_hw, nblk_a);
  const int64_t bimg = ct.bimg, r0 = ct.r0, q0 = ct.q0, co0 = ct.co0, ch_off = ct.ch_off;
  const int64_t N = d.N, C = d.C;
  const bool need_a = ct.need_a, need_b = ct.need_b, proj = ct.proj;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = (warp % 4) * 16;  // this warp's 16 pixels
  const int wn = (warp / 4) * 32;  // and 32 output channels
  const T zero = from_acc<T>(0.f);

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);

  const int64_t ih0 = s * (r0 - 1) - 1, iw0 = s * (q0 - 1) - 1;
  for (int64_t c0 = 0; c0 < C; c0 += KC) {
    __syncthreads();  // the previous chunk's GEMM is done with the staged operands
    stage_x<T, float, KC>(d, t.x, bimg, c0, ih0, iw0, XR, XC, xs);
    stage_dw_weights<T, float, KC>(d, t, c0, dw);
    for (int idx = tid; idx < KC * COB; idx += NT) {
      const int k = idx % KC, j = idx / KC;  // k fastest: consecutive channels in memory
      const int64_t c = c0 + k, co = co0 + j;
      const bool ok = c < C && co < N;
      if (need_a) wA[j * LDK + k] = ok ? t.pa[co * C + c] : zero;
      if (need_b) wB[j * LDK + k] = ok ? t.pb[co * C + c] : zero;
      if (proj) wS[j * LDK + k] = ok ? t.ws[(ch_off + co) * C + c] : zero;
    }
    __syncthreads();
    if (need_b) compute_b1<float, KC>(d, r0, q0, XR, XC, xs, dw, b1);
    for (int idx = tid; idx < KC * TP; idx += NT) {
      const int k = idx / TP, p = idx % TP;
      if (need_a) sa[k * LDP + p] = from_acc<T>(act_apply(d.act, a_pre_at<float, KC>(s, k, p, XR, XC, xs, dw)));
      if (proj) sx[k * LDP + p] = from_acc<T>(xs_at(s, k, p, XR, XC, xs));
    }
    __syncthreads();
    if (need_b)
      for (int idx = tid; idx < KC * TP; idx += NT) {
        const int k = idx / TP, p = idx % TP;
        sb[k * LDP + p] = from_acc<T>(act_apply(d.act, b_pre_at<float, KC>(k, p, b1, dw)));
      }
    __syncthreads();
    if (need_a) tc_mma<T>(acc, sa + wm, wA + wn * LDK);
    if (need_b) tc_mma<T>(acc, sb + wm, wB + wn * LDK);
    if (proj) tc_mma<T>(acc, sx + wm, wS + wn * LDK);
  }

  // Accumulators to shared memory (over the staging area), then the common epilogue.
  __syncthreads();
  const bool cl = d.channels_last;
#pragma unroll
  for (int n = 0; n < 2; ++n) {
    const int co = wn + 16 * n;
    if (cl)
      wmma::store_matrix_sync(sout + wm * LDO + co, acc[n], LDO, wmma::mem_row_major);
    else
      wmma::store_matrix_sync(sout + co * LDO + wm, acc[n], LDO, wmma::mem_col_major);
  }
  __syncthreads();
  // NHWC: consecutive threads own consecutive channels (coalesced stores); NCHW: pixels.
  const int tc = cl ? tid % 16 : tid / 16;
  const int tp = cl ? tid / 16 : tid % 16;
  epilogue<T, float>(d, t, y, pre, ct, tc, tp, [&](int i, int j) {
    const int co = tc + 16 * i, p = tp + 16 * j;
    return cl ? sout[p * LDO + co] : sout[co * LDO + p];
  });
}

template <typename T, int KC>
auto pick_forward_kernel() {
  if constexpr (sizeof(T) == 2)
    return block_forward_tc_kernel<T>;
  else
    return block_forward_kernel<T, KC>;
}

}  // namespace

template <typename T>
const char* launch_block_forward(const BlockDesc& d, const BlockTensors<T>& t, T* y, T* pre,
                                 cudaStream_t stream) {
  using A = typename AccT<T>::type;
  constexpr int KC = FwdKC<T>::value;
  if (d.B * d.Cout * d.Ho * d.Wo == 0) return nullptr;
  const int64_t tiles_h = (d.Ho + TH - 1) / TH, tiles_w = (d.Wo + TW - 1) / TW;
  const int64_t nblk = (d.N + COB - 1) / COB;
  const int64_t grid_x = d.B * tiles_h * tiles_w;
  const int64_t grid_y = d.merge == kConcat ? 2 * nblk : nblk;
  if (grid_x > 0x7fffffffLL || tiles_h * tiles_w > 0x7fffffffLL || grid_y > 65535)
    return "block_forward: the input is too large for the CUDA kernel's grid";
  // float16/bfloat16: tensor cores; float32/float64: FMAs.
  constexpr bool tc = sizeof(T) == 2;
  const size_t smem = tc ? tc_smem(d.stride).total : fwd_smem_elems<A, KC>(d.stride) * sizeof(A);
  auto kernel = pick_forward_kernel<T, KC>();
  cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       static_cast<int>(smem));
  if (e != cudaSuccess) return cudaGetErrorString(e);
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
  MSF_LAUNCH(kernel, grid, NT, smem, stream, d, t, y, pre, static_cast<int>(tiles_w),
             static_cast<int>(tiles_h * tiles_w), static_cast<int>(nblk));
  e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

template const char* launch_block_forward<float>(const BlockDesc&, const BlockTensors<float>&,
                                                 float*, float*, cudaStream_t);
template const char* launch_block_forward<double>(const BlockDesc&, const BlockTensors<double>&,
                                                  double*, double*, cudaStream_t);
template const char* launch_block_forward<__half>(const BlockDesc&, const BlockTensors<__half>&,
                                                  __half*, __half*, cudaStream_t);
template const char* launch_block_forward<__nv_bfloat16>(const BlockDesc&,
                                                         const BlockTensors<__nv_bfloat16>&,
                                                         __nv_bfloat16*, __nv_bfloat16*,
                                                         cudaStream_t);

}  // namespace cuda
}  // namespace msfused
