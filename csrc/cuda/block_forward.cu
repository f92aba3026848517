// Fused forward of the block in one launch, where block_forward_mma.cu has no plan (its
// operand tile does not fit shared memory).
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
// This file is every dtype's forward where block_forward_mma.cu finds no tile that fits
// shared memory: FMAs, accumulators in registers, each thread owning 4 output channels x 4
// pixels. Everywhere else block_forward_mma.cu runs, which stages x once per tile for every
// output channel.
#include <type_traits>

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

// Three CTAs per SM (at most 85 registers): left to itself ptxas took 80 for the 16-bit
// kernels and spilled one address; double needs two (122 registers).
template <typename T> constexpr int kFwdMinBlocks = sizeof(T) == 8 ? 2 : 3;

template <typename T, int KC>
__global__ void __launch_bounds__(NT, kFwdMinBlocks<T>)
    block_forward_kernel(BlockDesc d, BlockTensors<T> t, T* y, T* pre, int tiles_w,
                         int tiles_hw, int nblk_a) {
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

}  // namespace

template <typename T>
const char* launch_block_forward(const BlockDesc& d, const BlockTensors<T>& t, T* y, T* pre,
                                 bool allow_tf32, cudaStream_t stream) {
  if (d.B * d.Cout * d.Ho * d.Wo == 0) return nullptr;
  // the one-launch kernel (block_forward_mma.cu; float32's GEMM on TF32 where allowed, else
  // exact FMAs; float64's on FMAs) unless C is too large for its operand tile in shared
  // memory; that case: the kernel below.
  {
    bool launched = false;
    const char* err = launch_block_forward_mma<T>(d, t, y, pre, allow_tf32, stream, &launched);
    if (launched || err != nullptr) return err;
  }
  {
    using A = typename AccT<T>::type;
    constexpr int KC = FwdKC<T>::value;
    const int64_t tiles_h = (d.Ho + TH - 1) / TH, tiles_w = (d.Wo + TW - 1) / TW;
    const int64_t nblk = (d.N + COB - 1) / COB;
    const int64_t grid_x = d.B * tiles_h * tiles_w;
    const int64_t grid_y = d.merge == kConcat ? 2 * nblk : nblk;
    if (grid_x > 0x7fffffffLL || tiles_h * tiles_w > 0x7fffffffLL || grid_y > 65535)
      return "block_forward: the input is too large for the CUDA kernel's grid";
    const size_t smem = fwd_smem_elems<A, KC>(d.stride) * sizeof(A);
    auto kernel = block_forward_kernel<T, KC>;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return cudaGetErrorString(e);
    const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
    MSF_LAUNCH(kernel, grid, NT, smem, stream, d, t, y, pre, static_cast<int>(tiles_w),
               static_cast<int>(tiles_h * tiles_w), static_cast<int>(nblk));
    e = cudaGetLastError();
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
  }
}

template const char* launch_block_forward<float>(const BlockDesc&, const BlockTensors<float>&,
                                                 float*, float*, bool, cudaStream_t);
template const char* launch_block_forward<double>(const BlockDesc&, const BlockTensors<double>&,
                                                  double*, double*, bool, cudaStream_t);
template const char* launch_block_forward<__half>(const BlockDesc&, const BlockTensors<__half>&,
                                                  __half*, __half*, bool, cudaStream_t);
template const char* launch_block_forward<__nv_bfloat16>(const BlockDesc&,
                                                         const BlockTensors<__nv_bfloat16>&,
                                                         __nv_bfloat16*, __nv_bfloat16*,
                                                         bool, cudaStream_t);

}  // namespace cuda
}  // namespace msfused
