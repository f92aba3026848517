// Fused backward of the block for the shapes that the three-launch backward
// (block_backward_mma.cu) cannot plan (a block so wide that not even its smallest tile's
// operands fit shared memory): six launches, a, b1, b recomputed from x, every weight
// gradient reduced deterministically (per-CTA partials, then a fixed-order sum; no atomics).
//
//   1. gz_kernel        gz = grad_y * act'(saved)                     -> G     (B, Cout, P)
//   2. recompute_kernel a_pre, b_pre per 8x8 tile and 16-channel chunk -> Apre, Bpre (B, C, P)
//   3. wgrad_kernel     partials of dpa = Ga^T a, dpb = Gb^T b, dws = G^T x_s and of the
//                       pointwise / projection bias grads, over S pixel splits
//   4. dact_kernel      da = pa^T Ga, db = pb^T Gb (x act'(pre), in place over Apre/Bpre),
//                       dxs = ws^T G                                   -> dXS   (B, C, P)
//   5. dw_kernel        per (image, channel) plane, 16x16 input tiles: db1 = wc^T * db_pre
//                       (x act'(b1_pre) recomputed), dx (transposed depthwise of da_pre with
//                       wa and db1_pre with wb, + projection / identity), and per-plane
//                       partials of the depthwise weight/bias grads
//   6. reduce_kernel    fixed-order sums of all partials into the weight/bias gradients
// Scratch (planar (B, C, Ho*Wo), accumulation type) is one workspace from the binding.
#include "backward_mma.h"
#include "block_cuda.h"
#include "tile.cuh"

namespace msfused {
namespace cuda {
namespace {

template <typename T> struct BwdKC { static constexpr int value = 16; };
template <> struct BwdKC<double> { static constexpr int value = 8; };

constexpr int KP = 16;        // pixels per step of the weight-gradient GEMM
constexpr int GST = 64 + 1;   // padded smem row
constexpr int DT = 16;        // input tile edge of dw_kernel (a multiple of the stride)
constexpr int NDW = 30;       // depthwise partials per plane: dwa[9] dba dwb[9] dbb dwc[9] dbc

struct BwdLayout {
  int64_t S;  // pixel splits of the weight-gradient GEMM
  size_t G, Apre, Bpre, dXS, W, Bias, DW, total;  // byte offsets
};

BwdLayout bwd_layout(const BlockDesc& d, int acc_bytes) {
  BwdLayout L;
  const int64_t P = d.Ho * d.Wo, E = d.B * P;
  L.S = (E + 511) / 512;
  if (L.S < 1) L.S = 1;
  if (L.S > 64) L.S = 64;
  size_t off = 0;
  auto take = [&](int64_t elems) {
    const size_t at = off;
    off += (static_cast<size_t>(elems) * acc_bytes + 255) / 256 * 256;
    return at;
  };
  const int64_t pc = d.projection ? d.Cout : 0;
  L.G = take(d.B * d.Cout * P);
  L.Apre = take(d.B * d.C * P);
  L.Bpre = take(d.B * d.C * P);
  L.dXS = take(d.projection ? d.B * d.C * P : 0);
  L.W = take(L.S * (2 * d.N * d.C + pc * d.C));
  L.Bias = take(L.S * (2 * d.N + pc));
  L.DW = take(d.B * d.C * NDW);
  L.total = off;
  return L;
}

// ---- 1. gz -------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(NT) gz_kernel(BlockDesc d, const T* __restrict__ gy,
                                                const T* __restrict__ saved,
                                                typename AccT<T>::type* __restrict__ G) {
  using A = typename AccT<T>::type;
  const int64_t P = d.Ho * d.Wo, total = d.B * d.Cout * P;
  for (int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; e < total;
       e += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = e % P, t = e / P, co = t % d.Cout, b = t / d.Cout;
    const int64_t io = d.channels_last ? (b * P + p) * d.Cout + co : e;
    A g = to_acc(gy[io]);
    if (act_saves(d.act) != kSavesNothing) g = act_grad(d.act, g, to_acc(saved[io]));
    G[e] = g;
  }
}

// ---- 2. recompute a_pre, b_pre -----------------------------------------------------------
template <typename A, int KC>
size_t recompute_smem_elems(int s) {
  return size_t(KC) * stage_rows(s) * stage_cols(s) + size_t(KC) * RH * RW + 30 * size_t(KC);
}

template <typename T, int KC>
__global__ void __launch_bounds__(NT) recompute_kernel(BlockDesc d, BlockTensors<T> t,
                                                       typename AccT<T>::type* __restrict__ Apre,
                                                       typename AccT<T>::type* __restrict__ Bpre,
                                                       int tiles_w, int tiles_hw) {
  using A = typename AccT<T>::type;
  MSF_EXTERN_SMEM(smem_raw);
  const int s = d.stride;
  const int XR = stage_rows(s), XC = stage_cols(s);
  A* xs = reinterpret_cast<A*>(smem_raw);
  A* b1 = xs + KC * XR * XC;
  A* dw = b1 + KC * RH * RW;
  const int64_t bimg = blockIdx.x / tiles_hw;
  const int trem = static_cast<int>(blockIdx.x % tiles_hw);
  const int64_t r0 = int64_t(trem / tiles_w) * TH, q0 = int64_t(trem % tiles_w) * TW;
  const int64_t c0 = int64_t(blockIdx.y) * KC;
  stage_x<T, A, KC>(d, t.x, bimg, c0, s * (r0 - 1) - 1, s * (q0 - 1) - 1, XR, XC, xs);
  stage_dw_weights<T, A, KC>(d, t, c0, dw);
  __syncthreads();
  compute_b1<A, KC>(d, r0, q0, XR, XC, xs, dw, b1);
  __syncthreads();
  const int64_t P = d.Ho * d.Wo;
  for (int idx = threadIdx.x; idx < KC * TP; idx += NT) {
    const int k = idx / TP, p = idx % TP;
    const int64_t c = c0 + k, oh = r0 + p / TW, ow = q0 + p % TW;
    if (c >= d.C || oh >= d.Ho || ow >= d.Wo) continue;
    const int64_t off = (bimg * d.C + c) * P + oh * d.Wo + ow;
    Apre[off] = a_pre_at<A, KC>(s, k, p, XR, XC, xs, dw);
    Bpre[off] = b_pre_at<A, KC>(k, p, b1, dw);
  }
}

// ---- 3. pointwise / projection weight-gradient partials ----------------------------------
// blockIdx.z = which * S + split; which 0: dpa (rows n of G, cols act(a)), 1: dpb (rows of
// branch B in G, cols act(b)), 2: dws (rows co of G, cols strided x). 64 x 64 output block
// per CTA, 4 x 4 per thread, summed over the split's pixels.
// Four CTAs per SM (at most 64 registers: the float-accumulating kernels fit); ptxas kept
// double at 64 too and spilled, so double gets two.
template <typename T> constexpr int kWgradMinBlocks = sizeof(T) == 8 ? 2 : 4;

template <typename T>
__global__ void __launch_bounds__(NT, kWgradMinBlocks<T>)
    wgrad_kernel(BlockDesc d, const T* __restrict__ x,
                 const typename AccT<T>::type* __restrict__ G,
                 const typename AccT<T>::type* __restrict__ Apre,
                 const typename AccT<T>::type* __restrict__ Bpre,
                 typename AccT<T>::type* __restrict__ Wpart,
                 typename AccT<T>::type* __restrict__ Bpart, int S, int cblocks) {
  using A = typename AccT<T>::type;
  __shared__ A gs[KP * GST];
  __shared__ A ss[KP * GST];
  const int which = blockIdx.z / S, split = blockIdx.z % S;
  const int64_t M = which == 2 ? d.Cout : d.N;
  const int64_t m0 = int64_t(blockIdx.x / cblocks) * 64, c0 = int64_t(blockIdx.x % cblocks) * 64;
  const bool first_cb = (blockIdx.x % cblocks) == 0;
  if (m0 >= M) return;  // whole CTA
  const int64_t P = d.Ho * d.Wo, E = d.B * P, C = d.C;
  const int64_t len = (E + S - 1) / S, e0 = split * len, e1 = e0 + len < E ? e0 + len : E;
  const int64_t grow = (which == 1 && d.merge == kConcat) ? d.N : 0;
  const int tid = threadIdx.x, tm = tid / 16, tcc = tid % 16;
  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
  A bsum = A(0);
  for (int64_t eb = e0; eb < e1; eb += KP) {
    for (int idx = tid; idx < KP * 64; idx += NT) {
      const int kp = idx % KP, r = idx / KP;
      const int64_t e = eb + kp;
      A gv = A(0), sv = A(0);
      if (e < e1) {
        const int64_t b = e / P, p = e % P;
        const int64_t m = m0 + r, c = c0 + r;
        if (m < M) gv = G[(b * d.Cout + grow + m) * P + p];
        if (c < C) {
          if (which == 0) {
            sv = act_apply(d.act, Apre[(b * C + c) * P + p]);
          } else if (which == 1) {
            sv = act_apply(d.act, Bpre[(b * C + c) * P + p]);
          } else {
            const int64_t oh = p / d.Wo, ow = p % d.Wo;
            sv = to_acc(x[io_index(d.channels_last, b, c, d.stride * oh, d.stride * ow, C, d.H,
                                   d.W)]);
          }
        }
      }
      gs[kp * GST + r] = gv;
      ss[kp * GST + r] = sv;
    }
    __syncthreads();
#pragma unroll 4
    for (int kp = 0; kp < KP; ++kp) {
      A g[4], v[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) g[i] = gs[kp * GST + tm + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) v[j] = ss[kp * GST + tcc + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += g[i] * v[j];
    }
    if (tid < 64)
      for (int kp = 0; kp < KP; ++kp) bsum += gs[kp * GST + tid];
    __syncthreads();
  }
  const int64_t woff = which == 0 ? 0 : (which == 1 ? S * d.N * C : 2 * S * d.N * C);
  A* Wp = Wpart + woff + split * M * C;
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t m = m0 + tm + 16 * i, c = c0 + tcc + 16 * j;
      if (m < M && c < C) Wp[m * C + c] = acc[i][j];
    }
  if (first_cb && tid < 64 && m0 + tid < M) {
    const int64_t boff = which == 0 ? 0 : (which == 1 ? S * d.N : 2 * S * d.N);
    Bpart[boff + split * M + m0 + tid] = bsum;
  }
}

// ---- 4. da_pre, db_pre (in place over Apre / Bpre) and the projection's input grad -------
template <typename T>
__global__ void __launch_bounds__(NT) dact_kernel(BlockDesc d, BlockTensors<T> t,
                                                  const typename AccT<T>::type* __restrict__ G,
                                                  typename AccT<T>::type* Apre,
                                                  typename AccT<T>::type* Bpre,
                                                  typename AccT<T>::type* __restrict__ dXS,
                                                  int64_t pblocks) {
  using A = typename AccT<T>::type;
  __shared__ A wsm[16 * 64];
  __shared__ A gsm[16 * 64];
  const int which = blockIdx.z;
  const int64_t b = blockIdx.x / pblocks, p0 = (blockIdx.x % pblocks) * 64;
  const int64_t c0 = int64_t(blockIdx.y) * 64;
  const int64_t P = d.Ho * d.Wo, C = d.C;
  const int64_t K = which == 2 ? d.Cout : d.N;
  const int64_t grow = (which == 1 && d.merge == kConcat) ? d.N : 0;
  const T* Wt = which == 0 ? t.pa : (which == 1 ? t.pb : t.ws);
  const int tid = threadIdx.x, tp = tid % 16, tc = tid / 16;
  A acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = A(0);
  for (int64_t k0 = 0; k0 < K; k0 += 16) {
    for (int idx = tid; idx < 16 * 64; idx += NT) {
      const int kk = idx / 64, r = idx % 64;
      const int64_t k = k0 + kk, c = c0 + r, p = p0 + r;
      wsm[idx] = (k < K && c < C) ? to_acc(Wt[k * C + c]) : A(0);
      gsm[idx] = (k < K && p < P) ? G[(b * d.Cout + grow + k) * P + p] : A(0);
    }
    __syncthreads();
#pragma unroll 4
    for (int kk = 0; kk < 16; ++kk) {
      A w[4], g[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) w[i] = wsm[kk * 64 + tc + 16 * i];
#pragma unroll
      for (int j = 0; j < 4; ++j) g[j] = gsm[kk * 64 + tp + 16 * j];
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += w[i] * g[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t c = c0 + tc + 16 * i, p = p0 + tp + 16 * j;
      if (c >= C || p >= P) continue;
      const int64_t off = (b * C + c) * P + p;
      if (which == 0) {
        Apre[off] = act_grad(d.act, acc[i][j], Apre[off]);
      } else if (which == 1) {
        Bpre[off] = act_grad(d.act, acc[i][j], Bpre[off]);
      } else {
        dXS[off] = acc[i][j];
      }
    }
}

// ---- 5. depthwise backward and dx, one (image, channel) plane per CTA --------------------
// Input tile rows [R0, R0+16) (R0 a multiple of 16, so of s). It needs da_pre and db1_pre on
// output rows O = [R0/s - 1, R0/s + 16/s + 1) (ON rows), db_pre on O plus a ring, b1 on O
// (from x rows R0-s-1 .. R0+17, XRn rows). It owns the outputs [R0/s, R0/s + 16/s) for the
// weight-gradient partials, so the tiles partition the outputs.
template <typename T>
__global__ void __launch_bounds__(NT) dw_kernel(BlockDesc d, BlockTensors<T> t,
                                                const typename AccT<T>::type* __restrict__ G,
                                                const typename AccT<T>::type* __restrict__ dA,
                                                const typename AccT<T>::type* __restrict__ dB,
                                                const typename AccT<T>::type* __restrict__ dXS,
                                                T* __restrict__ dx,
                                                typename AccT<T>::type* __restrict__ DWpart) {
  using A = typename AccT<T>::type;
  constexpr int XRM = DT + 5;  // s = 2: 16 + 2 + 3
  constexpr int ONM = DT + 2;  // s = 1
  __shared__ A xr[XRM * XRM];
  __shared__ A dbr[(ONM + 2) * (ONM + 2)];
  __shared__ A dar[ONM * ONM];
  __shared__ A b1v[ONM * ONM];
  __shared__ A db1[ONM * ONM];
  __shared__ A wsm[28];
  __shared__ A red[NDW][NT / 32];
  const int64_t b = blockIdx.x / d.C, c = blockIdx.x % d.C;
  const int s = d.stride, XRn = DT + s + 3, ON = DT / s + 2, OS = DT / s;
  const int tid = threadIdx.x;
  if (tid < 27) {
    const T* w = tid < 9 ? t.wa : (tid < 18 ? t.wb : t.wc);
    wsm[tid] = to_acc(w[c * 9 + tid % 9]);
  } else if (tid == 27) {
    wsm[27] = t.bb != nullptr ? to_acc(t.bb[c]) : A(0);
  }
  const A* wa = wsm;
  const A* wb = wsm + 9;
  const A* wc = wsm + 18;
  const int64_t P = d.Ho * d.Wo, plane = (b * d.C + c) * P;
  A part[NDW];
#pragma unroll
  for (int v = 0; v < NDW; ++v) part[v] = A(0);

  for (int64_t R0 = 0; R0 < d.H; R0 += DT) {
    for (int64_t Q0 = 0; Q0 < d.W; Q0 += DT) {
      __syncthreads();  // previous tile done (and wsm visible)
      for (int idx = tid; idx < XRn * XRn; idx += NT) {
        const int64_t h = R0 - s - 1 + idx / XRn, w = Q0 - s - 1 + idx % XRn;
        xr[idx] = (h >= 0 && h < d.H && w >= 0 && w < d.W)
                      ? to_acc(t.x[io_index(d.channels_last, b, c, h, w, d.C, d.H, d.W)])
                      : A(0);
      }
      for (int idx = tid; idx < (ON + 2) * (ON + 2); idx += NT) {
        const int64_t oh = R0 / s - 2 + idx / (ON + 2), ow = Q0 / s - 2 + idx % (ON + 2);
        dbr[idx] = (oh >= 0 && oh < d.Ho && ow >= 0 && ow < d.Wo) ? dB[plane + oh * d.Wo + ow]
                                                                  : A(0);
      }
      for (int idx = tid; idx < ON * ON; idx += NT) {
        const int64_t oh = R0 / s - 1 + idx / ON, ow = Q0 / s - 1 + idx % ON;
        dar[idx] = (oh >= 0 && oh < d.Ho && ow >= 0 && ow < d.Wo) ? dA[plane + oh * d.Wo + ow]
                                                                  : A(0);
      }
      __syncthreads();
      // b1 and db1_pre on O (zero outside the output: b1 is padding there)
      for (int idx = tid; idx < ON * ON; idx += NT) {
        const int lr = idx / ON, lc = idx % ON;
        const int64_t oh = R0 / s - 1 + lr, ow = Q0 / s - 1 + lc;
        A bv = A(0), g1 = A(0);
        if (oh >= 0 && oh < d.Ho && ow >= 0 && ow < d.Wo) {
          const A pre = dw3(xr + (s * lr) * XRn + s * lc, XRn, wb) + wsm[27];
          bv = act_apply(d.act, pre);
          A g = A(0);
#pragma unroll
          for (int i = 0; i < 3; ++i)
#pragma unroll
            for (int j = 0; j < 3; ++j) g += wc[i * 3 + j] * dbr[(lr + 2 - i) * (ON + 2) + lc + 2 - j];
          g1 = act_grad(d.act, g, pre);
        }
        b1v[idx] = bv;
        db1[idx] = g1;
      }
      __syncthreads();
      {  // dx at one input pixel per thread
        const int64_t h = R0 + tid / DT, w = Q0 + tid % DT;
        if (h < d.H && w < d.W) {
          A v = A(0);
#pragma unroll
          for (int i = 0; i < 3; ++i) {
            const int64_t nh = h + 1 - i;
            if (nh < 0 || nh % s != 0 || nh / s >= d.Ho) continue;
            const int lr = static_cast<int>(nh / s - (R0 / s - 1));
#pragma unroll
            for (int j = 0; j < 3; ++j) {
              const int64_t nw = w + 1 - j;
              if (nw < 0 || nw % s != 0 || nw / s >= d.Wo) continue;
              const int lc = static_cast<int>(nw / s - (Q0 / s - 1));
              v += wa[i * 3 + j] * dar[lr * ON + lc] + wb[i * 3 + j] * db1[lr * ON + lc];
            }
          }
          if (d.projection) {
            if (h % s == 0 && w % s == 0) v += dXS[plane + (h / s) * d.Wo + w / s];
          } else if (d.residual) {  // identity: s == 1, Cout == C
            v += G[(b * d.Cout + c) * P + h * d.Wo + w];
          }
          dx[io_index(d.channels_last, b, c, h, w, d.C, d.H, d.W)] = from_acc<T>(v);
        }
      }
      if (tid < OS * OS) {  // owned outputs: weight-gradient partials
        const int lo_r = tid / OS, lo_c = tid % OS;
        const int64_t oh = R0 / s + lo_r, ow = Q0 / s + lo_c;
        if (oh < d.Ho && ow < d.Wo) {
          const int l = lo_r + 1, m = lo_c + 1;
          const A gA = dar[l * ON + m], g1 = db1[l * ON + m];
          const A gB = dbr[(l + 1) * (ON + 2) + m + 1];
          part[9] += gA;
          part[19] += g1;
          part[29] += gB;
#pragma unroll
          for (int i = 0; i < 3; ++i)
#pragma unroll
            for (int j = 0; j < 3; ++j) {
              const A xv = xr[(s * l + i) * XRn + s * m + j];
              part[i * 3 + j] += gA * xv;
              part[10 + i * 3 + j] += g1 * xv;
              part[20 + i * 3 + j] += gB * b1v[(l + i - 1) * ON + m + j - 1];
            }
        }
      }
    }
  }
  // Deterministic block reduction: warp shuffles, then warps in order.
  const int lane = tid % 32, warp = tid / 32;
#pragma unroll
  for (int v = 0; v < NDW; ++v) {
    A val = part[v];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) val += __shfl_down_sync(0xffffffffu, val, off);
    if (lane == 0) red[v][warp] = val;
  }
  __syncthreads();
  if (tid < NDW) {
    A sum = A(0);
    for (int w = 0; w < NT / 32; ++w) sum += red[tid][w];
    DWpart[(b * d.C + c) * NDW + tid] = sum;
  }
}

// ---- 6. fixed-order reduction of the partials --------------------------------------------
template <typename T>
__global__ void __launch_bounds__(NT) reduce_kernel(BlockDesc d,
                                                    const typename AccT<T>::type* __restrict__ Wpart,
                                                    const typename AccT<T>::type* __restrict__ Bpart,
                                                    const typename AccT<T>::type* __restrict__ DW,
                                                    int S, BlockGrads<T> g) {
  using A = typename AccT<T>::type;
  const int64_t C = d.C, N = d.N, Co = d.Cout;
  const int64_t n_dw = C * NDW, n_pw = N * C, n_ws = d.projection ? Co * C : 0;
  const int64_t n_bs = d.projection ? Co : 0;
  const int64_t total = n_dw + 2 * n_pw + n_ws + 2 * N + n_bs;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    int64_t r = idx;
    A sum = A(0);
    if (r < n_dw) {
      const int64_t c = r / NDW;
      const int v = static_cast<int>(r % NDW);
      for (int64_t b = 0; b < d.B; ++b) sum += DW[(b * C + c) * NDW + v];
      const T o = from_acc<T>(sum);
      if (v < 9) g.dwa[c * 9 + v] = o;
      else if (v == 9) g.dba[c] = o;
      else if (v < 19) g.dwb[c * 9 + v - 10] = o;
      else if (v == 19) g.dbb[c] = o;
      else if (v < 29) g.dwc[c * 9 + v - 20] = o;
      else g.dbc[c] = o;
      continue;
    }
    r -= n_dw;
    if (r < n_pw) {
      for (int s = 0; s < S; ++s) sum += Wpart[s * n_pw + r];
      g.dpa[r] = from_acc<T>(sum);
      continue;
    }
    r -= n_pw;
    if (r < n_pw) {
      for (int s = 0; s < S; ++s) sum += Wpart[S * n_pw + s * n_pw + r];
      g.dpb[r] = from_acc<T>(sum);
      continue;
    }
    r -= n_pw;
    if (r < n_ws) {
      for (int s = 0; s < S; ++s) sum += Wpart[2 * S * n_pw + s * n_ws + r];
      g.dws[r] = from_acc<T>(sum);
      continue;
    }
    r -= n_ws;
    if (r < N) {
      for (int s = 0; s < S; ++s) sum += Bpart[s * N + r];
      g.dqa[r] = from_acc<T>(sum);
      continue;
    }
    r -= N;
    if (r < N) {
      for (int s = 0; s < S; ++s) sum += Bpart[S * N + s * N + r];
      g.dqb[r] = from_acc<T>(sum);
      continue;
    }
    r -= N;
    for (int s = 0; s < S; ++s) sum += Bpart[2 * S * N + s * Co + r];
    g.dbs[r] = from_acc<T>(sum);
  }
}

inline unsigned grid_for(int64_t n, int64_t cap) {
  int64_t blocks = (n + NT - 1) / NT;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

}  // namespace

size_t block_backward_workspace_bytes(const BlockDesc& d, int elem_bytes) {
  const BwdMmaPlan pl = backward_mma_plan(d, elem_bytes);  // the three-launch backward's,
  if (pl.P != 0) return pl.ws_total;                       // where its plan fits
  return bwd_layout(d, elem_bytes == 8 ? 8 : 4).total;
}

template <typename T>
const char* launch_block_backward(const BlockDesc& d, const BlockTensors<T>& t, const T* grad_y,
                                  const T* saved, const BlockGrads<T>& g, void* workspace,
                                  bool allow_tf32, cudaStream_t stream) {
  using A = typename AccT<T>::type;
  // the three launches of block_backward_mma.cu (float32 on TF32 where allowed, else exact
  // FMAs; float64 on FMAs) where their plan fits
  {
    bool launched = false;
    const char* err = launch_block_backward_mma<T>(d, t, grad_y, saved, g, workspace,
                                                   allow_tf32, stream, &launched);
    if (err != nullptr || launched) return err;
  }
  constexpr int KC = BwdKC<T>::value;
  const BwdLayout L = bwd_layout(d, sizeof(A));
  char* ws = static_cast<char*>(workspace);
  A* G = reinterpret_cast<A*>(ws + L.G);
  A* Apre = reinterpret_cast<A*>(ws + L.Apre);
  A* Bpre = reinterpret_cast<A*>(ws + L.Bpre);
  A* dXS = reinterpret_cast<A*>(ws + L.dXS);
  A* Wp = reinterpret_cast<A*>(ws + L.W);
  A* Bp = reinterpret_cast<A*>(ws + L.Bias);
  A* DW = reinterpret_cast<A*>(ws + L.DW);
  const int64_t P = d.Ho * d.Wo;
  const int64_t tiles_h = (d.Ho + TH - 1) / TH, tiles_w = (d.Wo + TW - 1) / TW;
  const int64_t kchunks = (d.C + KC - 1) / KC;
  const int64_t cblocks = (d.C + 63) / 64, mblocks = (d.Cout + 63) / 64;
  const int64_t pblocks = (P + 63) / 64;
  const int nwhich = d.projection ? 3 : 2;
  const int64_t lim = 0x7fffffffLL;
  if (d.B * tiles_h * tiles_w > lim || kchunks > 65535 || mblocks * cblocks > lim ||
      d.B * pblocks > lim || cblocks > 65535 || d.B * d.C > lim)
    return "block_backward: the input is too large for the CUDA kernels' grids";
  cudaError_t e;
#define MSF_CHECK_LAUNCH()                    \
  e = cudaGetLastError();                     \
  if (e != cudaSuccess) return cudaGetErrorString(e)

  auto gk = gz_kernel<T>;
  MSF_LAUNCH(gk, grid_for(d.B * d.Cout * P, 1 << 20), NT, 0, stream, d, grad_y, saved, G);
  MSF_CHECK_LAUNCH();

  const size_t rsmem = recompute_smem_elems<A, KC>(d.stride) * sizeof(A);
  auto rk = recompute_kernel<T, KC>;
  e = cudaFuncSetAttribute(rk, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(rsmem));
  if (e != cudaSuccess) return cudaGetErrorString(e);
  const dim3 rgrid(static_cast<unsigned>(d.B * tiles_h * tiles_w), static_cast<unsigned>(kchunks));
  MSF_LAUNCH(rk, rgrid, NT, rsmem, stream, d, t, Apre, Bpre, static_cast<int>(tiles_w),
             static_cast<int>(tiles_h * tiles_w));
  MSF_CHECK_LAUNCH();

  auto wk = wgrad_kernel<T>;
  const dim3 wgrid(static_cast<unsigned>(mblocks * cblocks), 1, static_cast<unsigned>(nwhich * L.S));
  MSF_LAUNCH(wk, wgrid, NT, 0, stream, d, t.x, G, Apre, Bpre, Wp, Bp, static_cast<int>(L.S),
             static_cast<int>(cblocks));
  MSF_CHECK_LAUNCH();

  auto ak = dact_kernel<T>;
  const dim3 agrid(static_cast<unsigned>(d.B * pblocks), static_cast<unsigned>(cblocks),
                   static_cast<unsigned>(nwhich));
  MSF_LAUNCH(ak, agrid, NT, 0, stream, d, t, G, Apre, Bpre, dXS, pblocks);
  MSF_CHECK_LAUNCH();

  auto dk = dw_kernel<T>;
  MSF_LAUNCH(dk, static_cast<unsigned>(d.B * d.C), NT, 0, stream, d, t, G, Apre, Bpre, dXS, g.dx, DW);
  MSF_CHECK_LAUNCH();

  const int64_t nred = d.C * NDW + 2 * d.N * d.C + (d.projection ? d.Cout * d.C + d.Cout : 0) +
                       2 * d.N;
  auto redk = reduce_kernel<T>;
  MSF_LAUNCH(redk, grid_for(nred, 4096), NT, 0, stream, d, Wp, Bp, DW, static_cast<int>(L.S), g);
  MSF_CHECK_LAUNCH();
#undef MSF_CHECK_LAUNCH
  return nullptr;
}

template const char* launch_block_backward<float>(const BlockDesc&, const BlockTensors<float>&,
                                                  const float*, const float*,
                                                  const BlockGrads<float>&, void*, bool, cudaStream_t);
template const char* launch_block_backward<double>(const BlockDesc&, const BlockTensors<double>&,
                                                   const double*, const double*,
                                                   const BlockGrads<double>&, void*, bool, cudaStream_t);
template const char* launch_block_backward<__half>(const BlockDesc&, const BlockTensors<__half>&,
                                                   const __half*, const __half*,
                                                   const BlockGrads<__half>&, void*, bool, cudaStream_t);
template const char* launch_block_backward<__nv_bfloat16>(
    const BlockDesc&, const BlockTensors<__nv_bfloat16>&, const __nv_bfloat16*,
    const __nv_bfloat16*, const BlockGrads<__nv_bfloat16>&, void*, bool, cudaStream_t);

}  // namespace cuda
}  // namespace msfused
