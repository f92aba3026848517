// The on-chip part shared by the forward and the backward's recompute: stage a chunk of KC
// channels of x over an output tile plus halo in shared memory and run the depthwise convs.
//
// Output tile: rows [r0, r0 + TH), cols [q0, q0 + TW) of the (Ho, Wo) output of one image.
// b1 is needed on the tile plus a 1-pixel ring: output rows r0-1 .. r0+TH, which read input
// rows s*(r0-1)-1 .. s*(r0+TH)+1, i.e. XR = s*(TH+1)+3 rows starting at ih0 = s*(r0-1)-1
// (same for columns). In that staged tile:
//   b1 at ring position (lr, lc) (output (r0-1+lr, q0-1+lc)) reads rows s*lr + i, cols s*lc + j
//   a  at tile position (lr, lc) (output (r0+lr, q0+lc))     reads rows s*(lr+1) + i, ...
//   the projection input x[s*(r0+lr), s*(q0+lc)] is at row s*(lr+1) + 1, col s*(lc+1) + 1.
#pragma once
#include "common.cuh"

namespace msfused {
namespace cuda {

constexpr int TH = 8, TW = 8, TP = TH * TW;  // output tile
constexpr int RH = TH + 2, RW = TW + 2;      // tile plus ring (b1)
constexpr int NT = 256;                      // threads per CTA

__host__ __device__ inline int stage_rows(int s) { return s * (TH + 1) + 3; }
__host__ __device__ inline int stage_cols(int s) { return s * (TW + 1) + 3; }

// xs[k][rr][cc] = x[b, c0+k, ih0+rr, iw0+cc], zero outside the image and for c0+k >= C.
template <typename T, typename A, int KC>
__device__ __forceinline__ void stage_x(const BlockDesc& d, const T* __restrict__ x, int64_t b,
                                        int64_t c0, int64_t ih0, int64_t iw0, int XR, int XC,
                                        A* __restrict__ xs) {
  const int n = KC * XR * XC;
  for (int idx = threadIdx.x; idx < n; idx += blockDim.x) {
    int k, rr, cc;
    if (d.channels_last) {  // channels fastest: consecutive threads read consecutive memory
      k = idx % KC;
      const int pos = idx / KC;
      rr = pos / XC;
      cc = pos % XC;
    } else {
      cc = idx % XC;
      const int t = idx / XC;
      rr = t % XR;
      k = t / XR;
    }
    const int64_t c = c0 + k, h = ih0 + rr, w = iw0 + cc;
    A v = A(0);
    if (c < d.C && h >= 0 && h < d.H && w >= 0 && w < d.W)
      v = to_acc(x[io_index(d.channels_last, b, c, h, w, d.C, d.H, d.W)]);
    xs[(k * XR + rr) * XC + cc] = v;
  }
}

// Depthwise weights and biases of a chunk: dw[0..KC*9) wa, [KC*9, 2*KC*9) wb,
// [2*KC*9, 3*KC*9) wc, then KC biases each of ba, bb, bc. Zero for c >= C or absent bias.
template <typename T, typename A, int KC>
__device__ __forceinline__ void stage_dw_weights(const BlockDesc& d, const BlockTensors<T>& t,
                                                 int64_t c0, A* __restrict__ dw) {
  for (int idx = threadIdx.x; idx < 3 * KC * 9 + 3 * KC; idx += blockDim.x) {
    A v = A(0);
    if (idx < 3 * KC * 9) {
      const int which = idx / (KC * 9), r = idx % (KC * 9);
      const int64_t c = c0 + r / 9;
      const T* w = which == 0 ? t.wa : (which == 1 ? t.wb : t.wc);
      if (c < d.C) v = to_acc(w[c * 9 + r % 9]);
    } else {
      const int r = idx - 3 * KC * 9;
      const int which = r / KC;
      const int64_t c = c0 + r % KC;
      const T* bias = which == 0 ? t.ba : (which == 1 ? t.bb : t.bc);
      if (bias != nullptr && c < d.C) v = to_acc(bias[c]);
    }
    dw[idx] = v;
  }
}

// b1 over the tile plus ring, activated; exactly zero where the ring leaves the output
// (b1 is zero-padded for the second depthwise conv).
template <typename A, int KC>
__device__ __forceinline__ void compute_b1(const BlockDesc& d, int64_t r0, int64_t q0, int XR,
                                           int XC, const A* __restrict__ xs,
                                           const A* __restrict__ dw, A* __restrict__ b1) {
  const int s = d.stride;
  for (int idx = threadIdx.x; idx < KC * RH * RW; idx += blockDim.x) {
    const int k = idx / (RH * RW), pos = idx % (RH * RW), lr = pos / RW, lc = pos % RW;
    const int64_t oh = r0 - 1 + lr, ow = q0 - 1 + lc;
    A v = A(0);
    if (oh >= 0 && oh < d.Ho && ow >= 0 && ow < d.Wo) {
      const A* src = xs + (k * XR + s * lr) * XC + s * lc;
      v = act_apply(d.act, dw3(src, XC, dw + (KC + k) * 9) + dw[27 * KC + KC + k]);
    }
    b1[idx] = v;
  }
}

// Pre-activation of branch A at tile pixel p of channel k.
template <typename A, int KC>
__device__ __forceinline__ A a_pre_at(int s, int k, int p, int XR, int XC,
                                      const A* __restrict__ xs, const A* __restrict__ dw) {
  const int lr = p / TW, lc = p % TW;
  const A* src = xs + (k * XR + s * (lr + 1)) * XC + s * (lc + 1);
  return dw3(src, XC, dw + k * 9) + dw[27 * KC + k];
}

// Pre-activation of branch B (second conv) at tile pixel p of channel k.
template <typename A, int KC>
__device__ __forceinline__ A b_pre_at(int k, int p, const A* __restrict__ b1,
                                      const A* __restrict__ dw) {
  const int lr = p / TW, lc = p % TW;
  const A* src = b1 + (k * RH + lr) * RW + lc;
  return dw3(src, RW, dw + (2 * KC + k) * 9) + dw[27 * KC + 2 * KC + k];
}

// Strided x (the projection's input) at tile pixel p of channel k.
template <typename A>
__device__ __forceinline__ A xs_at(int s, int k, int p, int XR, int XC, const A* __restrict__ xs) {
  const int lr = p / TW, lc = p % TW;
  return xs[(k * XR + s * (lr + 1) + 1) * XC + s * (lc + 1) + 1];
}

}  // namespace cuda
}  // namespace msfused
