// The planar path's pointwise convs (and projection) in registers: the forward with its
// epilogue, and the backward's data and weight gradients. Their GEMMs are tiny in K
// (2C + Cs <= 21 rows of A, C < kPixelMajorMinC) and wide in the output (Cout channels per
// pixel): a BLAS call there costs more in its own passes over the operands (scaling the
// output, packing, small-matrix paths) than the few multiply-adds per element it computes
// (MKL's small-GEMM path took a third of paper-u1's backward; the forward's BLAS call and
// epilogue made three passes over y).
#pragma once
#include "cpu/kernel_tiles.h"

MSFUSED_KERNEL_BEGIN

// The register block every loop below is made of: acc[x][y] += s(k, x) * (vector y of v(k))
// for k = 0 .. K-1, X scalars times Y vectors, X Y independent sums (eight or more keep two
// FMA pipes busy through their latency; one chain of K dependent FMAs per pixel left them
// idle, NOTES 40). Each sum runs over k in order, whatever X and Y, so the blocking never
// changes the bits.
template <int X, int Y, typename V, typename FS, typename FV>
inline void outer_sum(V (&acc)[X][Y], int64_t K, FS s, FV v) {
  constexpr int VN = sizeof(V) / sizeof(acc[0][0][0]);
  for (int64_t k = 0; k < K; ++k) {
    const auto* vk = v(k);
    V vv[Y];
#pragma GCC unroll 4
    for (int y = 0; y < Y; ++y) vv[y] = vload(vk + y * VN);
#pragma GCC unroll 8
    for (int x = 0; x < X; ++x) {
      const auto u = s(k, x);
#pragma GCC unroll 4
      for (int y = 0; y < Y; ++y) acc[x][y] += u * vv[y];
    }
  }
}


// One weight segment per GEMM: output channels [co0, co0 + n) take rows [k0, k0 + K) of A;
// w is K x n row-major (k-major: a row of A meets a contiguous vector of output channels).
// add: one segment over all of A; concat: [a; xs] -> the first N channels, [xs; b] -> the
// last N.
template <typename T>
struct PointwiseSegs {
  int nseg;
  int64_t co0[2], k0[2], K[2], n;
  const T* w[2];
};

// wk (Ktot x N per segment, packed_weight_elems(d, pl) elements) from pack_weights' wp.
template <typename T>
PointwiseSegs<T> pack_pointwise_segs(const BlockDesc& d, const Plan& pl, const T* wp, T* wk) {
  PointwiseSegs<T> sg;
  sg.n = d.N;
  sg.nseg = d.merge == kAdd ? 1 : 2;
  const int64_t K = d.merge == kAdd ? pl.Ktot : d.C + pl.Cs;
  for (int s = 0; s < sg.nseg; ++s) {
    sg.co0[s] = s * d.N;
    sg.k0[s] = s * d.C;
    sg.K[s] = K;
    T* w = wk + s * K * d.N;
    for (int64_t k = 0; k < K; ++k)
      for (int64_t n = 0; n < d.N; ++n) w[k * d.N + n] = wp[(s * d.N + n) * K + k];
    sg.w[s] = w;
  }
  return sg;
}

// z (bias and the tile GEMM already summed) + residual, pre-activation, activation, store.
template <int ACT, typename V, typename O>
inline void pointwise_out(V z, const O* xres, O* pre, O* y) {
  typedef std::remove_cv_t<std::remove_reference_t<decltype(z[0])>> T;
  if (xres) z += vload_as<T>(xres);
  dw_store<ACT>(z, y, pre);
}
template <int ACT, typename T, typename O>
inline void pointwise_out1(T z, const O* xres, O* pre, O* y) {
  if (xres) z += load_as<T>(xres);
  if (pre) store_as(pre, z);
  store_as(y, act_f<ACT>(z));
}

// ---- forward ----------------------------------------------------------------------------

// y tile = act(W A + bias [+ x]) for one tile of P pixels, summed in registers from K
// broadcasts of A, the epilogue applied in the same registers and y written once in its
// own storage type. A: Ktot x P (channel rows).
// ytile, xres (identity residual or null), ptile (pre-activation or null) point at the
// tile's first element of y's layout: channels_last P x Cout, NCHW Cout rows of stride HoWo.
template <typename T, int ACT, typename O>
void tile_pointwise_fused(const BlockDesc& d, const PointwiseSegs<T>& sg, const T* bias,
                          const T* A, int64_t P, O* ytile, const O* xres, O* ptile) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  const int64_t n = sg.n, Cout = d.Cout, HoWo = d.Ho * d.Wo;
  for (int s = 0; s < sg.nseg; ++s) {
    const T* w = sg.w[s];
    const T* As = A + sg.k0[s] * P;
    const int64_t K = sg.K[s], co0 = sg.co0[s];
    // the epilogue of one vector / one element at offset o of the tile
    auto out = [&](int64_t o, V z) {
      pointwise_out<ACT>(z, xres ? xres + o : nullptr, ptile ? ptile + o : nullptr, ytile + o);
    };
    auto out1 = [&](int64_t o, T z) {
      pointwise_out1<ACT>(z, xres ? xres + o : nullptr, ptile ? ptile + o : nullptr, ytile + o);
    };
    if (d.channels_last) {
      // PB pixels x NC vectors of output channels from c: per row of A, PB broadcasts and
      // NC weight loads feed PB NC multiply-adds into as many independent sums (8 in flight
      // cover two FMA pipes' latency)
      auto block = [&](auto pb, auto nc, int64_t p, int64_t c) {
        constexpr int PB = decltype(pb)::value, NC = decltype(nc)::value;
        V acc[PB][NC];
#pragma GCC unroll 8
        for (int j = 0; j < PB; ++j)
#pragma GCC unroll 4
          for (int v = 0; v < NC; ++v) acc[j][v] = vload(bias + co0 + c + v * VN);
        outer_sum(acc, K, [&](int64_t k, int j) { return As[k * P + p + j]; },
                  [&](int64_t k) { return w + k * n + c; });
#pragma GCC unroll 8
        for (int j = 0; j < PB; ++j)
#pragma GCC unroll 4
          for (int v = 0; v < NC; ++v) out((p + j) * Cout + co0 + c + v * VN, acc[j][v]);
      };
      auto cols = [&](auto pb, auto nc, int64_t c) {
        constexpr int PB = decltype(pb)::value;
        int64_t p = 0;
        for (; p + PB <= P; p += PB) block(pb, nc, p, c);
        for (; p < P; ++p) block(std::integral_constant<int, 1>{}, nc, p, c);
      };
      int64_t c = 0;
      for (; c + 4 * VN <= n; c += 4 * VN)
        cols(std::integral_constant<int, 2>{}, std::integral_constant<int, 4>{}, c);
      for (; c + 2 * VN <= n; c += 2 * VN)
        cols(std::integral_constant<int, 4>{}, std::integral_constant<int, 2>{}, c);
      for (; c + VN <= n; c += VN)
        cols(std::integral_constant<int, 8>{}, std::integral_constant<int, 1>{}, c);
      for (; c < n; ++c)
        for (int64_t p = 0; p < P; ++p) {
          T z = bias[co0 + c];
          for (int64_t k = 0; k < K; ++k) z += As[k * P + p] * w[k * n + c];
          out1(p * Cout + co0 + c, z);
        }
    } else {
      // output channels in pairs x 4 vectors of pixels: per row of A two weight broadcasts
      // and four loads of A feed eight multiply-adds
      int64_t c = 0;
      for (; c + 2 <= n; c += 2) {
        const int64_t r0 = (co0 + c) * HoWo, r1 = r0 + HoWo;
        const T bz0 = bias[co0 + c], bz1 = bias[co0 + c + 1];
        int64_t p = 0;
        for (; p + 4 * VN <= P; p += 4 * VN) {
          V a0 = V{} + bz0, a1 = a0, a2 = a0, a3 = a0;
          V e0 = V{} + bz1, e1 = e0, e2 = e0, e3 = e0;
          for (int64_t k = 0; k < K; ++k) {
            const T* ar = As + k * P + p;
            const V x0 = vload(ar), x1 = vload(ar + VN), x2 = vload(ar + 2 * VN),
                    x3 = vload(ar + 3 * VN);
            const T u = w[k * n + c], v = w[k * n + c + 1];
            a0 += u * x0; a1 += u * x1; a2 += u * x2; a3 += u * x3;
            e0 += v * x0; e1 += v * x1; e2 += v * x2; e3 += v * x3;
          }
          out(r0 + p, a0); out(r0 + p + VN, a1); out(r0 + p + 2 * VN, a2); out(r0 + p + 3 * VN, a3);
          out(r1 + p, e0); out(r1 + p + VN, e1); out(r1 + p + 2 * VN, e2); out(r1 + p + 3 * VN, e3);
        }
        for (; p + VN <= P; p += VN) {
          V a0 = V{} + bz0, e0 = V{} + bz1;
          for (int64_t k = 0; k < K; ++k) {
            const V x0 = vload(As + k * P + p);
            a0 += w[k * n + c] * x0;
            e0 += w[k * n + c + 1] * x0;
          }
          out(r0 + p, a0);
          out(r1 + p, e0);
        }
        for (; p < P; ++p)
          for (int j = 0; j < 2; ++j) {
            T z = bias[co0 + c + j];
            for (int64_t k = 0; k < K; ++k) z += As[k * P + p] * w[k * n + c + j];
            out1((co0 + c + j) * HoWo + p, z);
          }
      }
      for (; c < n; ++c) {
        const int64_t r0 = (co0 + c) * HoWo;
        int64_t p = 0;
        for (; p + VN <= P; p += VN) {
          V a0 = V{} + bias[co0 + c];
          for (int64_t k = 0; k < K; ++k) a0 += w[k * n + c] * vload(As + k * P + p);
          out(r0 + p, a0);
        }
        for (; p < P; ++p) {
          T z = bias[co0 + c];
          for (int64_t k = 0; k < K; ++k) z += As[k * P + p] * w[k * n + c];
          out1(r0 + p, z);
        }
      }
    }
  }
}

// ---- backward ---------------------------------------------------------------------------
// With G = dy * act'(z) for a tile (P x Cout channels_last, Cout x P NCHW): the weight
// gradients dW_s += G_s A_s^T per segment and the data gradient dA = W^T G (Ktot x P).

// Row stride of pack_pointwise_wo's matrix: Ktot rounded up to whole vectors.
template <typename T>
inline int64_t pointwise_wo_stride(const Plan& pl) {
  return ceil_div(pl.Ktot, Vec<T>::n) * Vec<T>::n;
}

// The weights output-channel-major for dA: wo[co * kp + k] = the weight of A row k in output
// channel co, zero where co's segment does not read row k (Cout x kp elements).
template <typename T>
void pack_pointwise_wo(const BlockDesc& d, const Plan& pl, const PointwiseSegs<T>& sg, T* wo) {
  const int64_t kp = pointwise_wo_stride<T>(pl);
  memset(wo, 0, sizeof(T) * d.Cout * kp);
  for (int s = 0; s < sg.nseg; ++s)
    for (int64_t k = 0; k < sg.K[s]; ++k)
      for (int64_t n = 0; n < sg.n; ++n)
        wo[(sg.co0[s] + n) * kp + sg.k0[s] + k] = sg.w[s][k * sg.n + n];
}

// channels_last dA for Ktot rows of A (at most NV vectors; wo and dA start at the first),
// PB pixels from pixel p: a vector over the rows per pixel, summed over the output channels
// from one broadcast of G each (in channel order, so the bits do not depend on PB); the
// lanes then go to dA's rows. PB pixels give PB x NV independent sums: one pixel's chain
// of Cout dependent multiply-adds alone would leave the FMA units idle for their latency.
template <typename T, int NV, int PB>
inline void dA_cl_pixels(const T* G, int64_t Cout, const T* wo, int64_t kp, int64_t Ktot,
                         int64_t P, int64_t p, T* dA) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  const T* g = G + p * Cout;
  V acc[PB][NV] = {};
  outer_sum(acc, Cout, [&](int64_t co, int j) { return g[j * Cout + co]; },
            [&](int64_t co) { return wo + co * kp; });
  T t[PB][NV * VN];
#pragma GCC unroll 16
  for (int j = 0; j < PB; ++j)
#pragma GCC unroll 4
    for (int v = 0; v < NV; ++v) vstore(t[j] + v * VN, acc[j][v]);
  for (int64_t k = 0; k < Ktot; ++k)
#pragma GCC unroll 16
    for (int j = 0; j < PB; ++j) dA[k * P + p + j] = t[j][k];
}

// Eight sums in flight (two FMA pipes x four cycles of latency), then single pixels.
template <typename T, int NV>
void tile_dA_cl(const T* G, int64_t Cout, const T* wo, int64_t kp, int64_t Ktot, int64_t P,
                T* dA) {
  constexpr int PB = NV == 1 ? 8 : 4;
  int64_t p = 0;
  for (; p + PB <= P; p += PB) dA_cl_pixels<T, NV, PB>(G, Cout, wo, kp, Ktot, P, p, dA);
  for (; p < P; ++p) dA_cl_pixels<T, NV, 1>(G, Cout, wo, kp, Ktot, P, p, dA);
}

// NCHW dA for rows [k, k + KR) x PV vectors of pixels from p: one weight broadcast per row
// and one load of G per vector feed KR PV independent sums over the output channels (in
// channel order, as every block size sums).
template <typename T, int KR, int PV>
inline void dA_nchw_block(const T* G, int64_t Cout, const T* wo, int64_t kp, int64_t P,
                          int64_t k, int64_t p, T* dA) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  V acc[KR][PV] = {};
  outer_sum(acc, Cout, [&](int64_t co, int r) { return wo[co * kp + k + r]; },
            [&](int64_t co) { return G + co * P + p; });
#pragma GCC unroll 4
  for (int r = 0; r < KR; ++r)
#pragma GCC unroll 4
    for (int v = 0; v < PV; ++v) vstore(dA + (k + r) * P + p + v * VN, acc[r][v]);
}

// NCHW dA: rows of A in blocks of 3 (then 2, 1) x 3 vectors of pixels (then 1), the last
// P % VN pixels one at a time.
template <typename T>
void tile_dA_nchw(const T* G, int64_t Cout, const T* wo, int64_t kp, int64_t Ktot, int64_t P,
                  T* dA) {
  constexpr int VN = Vec<T>::n;
  auto rows = [&](auto kr, int64_t k) {
    constexpr int KR = decltype(kr)::value;
    int64_t p = 0;
    for (; p + 3 * VN <= P; p += 3 * VN) dA_nchw_block<T, KR, 3>(G, Cout, wo, kp, P, k, p, dA);
    for (; p + VN <= P; p += VN) dA_nchw_block<T, KR, 1>(G, Cout, wo, kp, P, k, p, dA);
    for (; p < P; ++p)
      for (int r = 0; r < KR; ++r) {
        T a = T(0);
        for (int64_t co = 0; co < Cout; ++co) a += wo[co * kp + k + r] * G[co * P + p];
        dA[(k + r) * P + p] = a;
      }
  };
  int64_t k = 0;
  for (; k + 3 <= Ktot; k += 3) rows(std::integral_constant<int, 3>{}, k);
  if (Ktot - k == 2) rows(std::integral_constant<int, 2>{}, k);
  else if (Ktot - k == 1) rows(std::integral_constant<int, 1>{}, k);
}

// channels_last dW for output channels [c, c + 2 VN) x rows [k, k + KB) of segment A rows
// As: 2 KB sums in registers over the tile's pixels (one load of G per pixel feeds 2 KB
// multiply-adds), added to out once.
template <typename T, int KB>
inline void dW_cl_block(const T* G, int64_t Cout, int64_t gc, const T* As, int64_t P,
                        int64_t K, int64_t c, int64_t k, T* out) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  V acc[KB][2] = {};
  const T* r = As + k * P;
  outer_sum(acc, P, [&](int64_t p, int j) { return r[j * P + p]; },
            [&](int64_t p) { return G + p * Cout + gc; });
#pragma GCC unroll 4
  for (int j = 0; j < KB; ++j) {
    T t[2][VN];
    vstore(t[0], acc[j][0]);
    vstore(t[1], acc[j][1]);
    for (int i = 0; i < 2 * VN; ++i) out[(c + i) * K + k + j] += t[i / VN][i % VN];
  }
}

// channels_last dW: blocks of 2 vectors of output channels x up to 4 rows of A, the rows'
// remainder as one block of 1-3 (never fewer than 2 sums in flight per row).
template <typename T>
void tile_dW_cl(const PointwiseSegs<T>& sg, const T* G, int64_t Cout, const T* A, int64_t P,
                T* pw) {
  constexpr int VN = Vec<T>::n;
  const int64_t n = sg.n;
  for (int s = 0; s < sg.nseg; ++s) {
    const int64_t K = sg.K[s], co0 = sg.co0[s];
    const T* As = A + sg.k0[s] * P;
    T* out = pw + s * n * K;
    int64_t c = 0;
    for (; c + 2 * VN <= n; c += 2 * VN) {
      int64_t k = 0;
      for (; k + 4 <= K; k += 4) dW_cl_block<T, 4>(G, Cout, co0 + c, As, P, K, c, k, out);
      if (K - k == 3) dW_cl_block<T, 3>(G, Cout, co0 + c, As, P, K, c, k, out);
      else if (K - k == 2) dW_cl_block<T, 2>(G, Cout, co0 + c, As, P, K, c, k, out);
      else if (K - k == 1) dW_cl_block<T, 1>(G, Cout, co0 + c, As, P, K, c, k, out);
    }
    for (; c < n; ++c)
      for (int64_t k = 0; k < K; ++k) {
        const T* r = As + k * P;
        T acc = T(0);
        for (int64_t p = 0; p < P; ++p) acc += r[p] * G[p * Cout + co0 + c];
        out[c * K + k] += acc;
      }
  }
}

// NCHW dW: per output channel, 4 rows of A at a time, dot products along the pixels.
template <typename T>
void tile_dW_nchw(const PointwiseSegs<T>& sg, const T* G, const T* A, int64_t P, T* pw) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  const int64_t n = sg.n;
  for (int s = 0; s < sg.nseg; ++s) {
    const int64_t K = sg.K[s];
    const T* As = A + sg.k0[s] * P;
    T* out = pw + s * n * K;
    for (int64_t c = 0; c < n; ++c) {
      const T* g = G + (sg.co0[s] + c) * P;
      int64_t k = 0;
      for (; k + 4 <= K; k += 4) {
        const T* r = As + k * P;
        V a0{}, a1{}, a2{}, a3{};
        int64_t p = 0;
        for (; p + VN <= P; p += VN) {
          const V gv = vload(g + p);
          a0 += gv * vload(r + p); a1 += gv * vload(r + P + p);
          a2 += gv * vload(r + 2 * P + p); a3 += gv * vload(r + 3 * P + p);
        }
        T s0 = hsum(a0), s1 = hsum(a1), s2 = hsum(a2), s3 = hsum(a3);
        for (; p < P; ++p) {
          s0 += g[p] * r[p]; s1 += g[p] * r[P + p];
          s2 += g[p] * r[2 * P + p]; s3 += g[p] * r[3 * P + p];
        }
        out[c * K + k] += s0; out[c * K + k + 1] += s1;
        out[c * K + k + 2] += s2; out[c * K + k + 3] += s3;
      }
      for (; k < K; ++k) {
        const T* r = As + k * P;
        V a0{};
        int64_t p = 0;
        for (; p + VN <= P; p += VN) a0 += vload(g + p) * vload(r + p);
        T s0 = hsum(a0);
        for (; p < P; ++p) s0 += g[p] * r[p];
        out[c * K + k] += s0;
      }
    }
  }
}

// One tile's pointwise gradients: pw (the chunk's packed pointwise partial, pack_weights'
// layout) += G A^T per segment, dA = W^T G.
template <typename T>
void tile_pointwise_grads(const BlockDesc& d, const Plan& pl, const PointwiseSegs<T>& sg,
                          const T* wo, const T* G, const T* A, int64_t P, T* pw, T* dA) {
  constexpr int VN = Vec<T>::n;
  const int64_t kp = pointwise_wo_stride<T>(pl);
  if (d.channels_last) {
    tile_dW_cl(sg, G, d.Cout, A, P, pw);
    // rows of A in runs of up to 3 vectors (more would not stay in registers)
    for (int64_t k0 = 0; k0 < kp; k0 += 3 * VN) {
      const int64_t nv = kp - k0 < 3 * VN ? (kp - k0) / VN : 3;
      const int64_t nk = pl.Ktot - k0 < nv * VN ? pl.Ktot - k0 : nv * VN;
      if (nv == 1) tile_dA_cl<T, 1>(G, d.Cout, wo + k0, kp, nk, P, dA + k0 * P);
      else if (nv == 2) tile_dA_cl<T, 2>(G, d.Cout, wo + k0, kp, nk, P, dA + k0 * P);
      else tile_dA_cl<T, 3>(G, d.Cout, wo + k0, kp, nk, P, dA + k0 * P);
    }
  } else {
    tile_dW_nchw(sg, G, A, P, pw);
    tile_dA_nchw(G, d.Cout, wo, kp, pl.Ktot, P, dA);
  }
}

MSFUSED_KERNEL_END
