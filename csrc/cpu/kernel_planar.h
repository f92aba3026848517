// The planar CPU path (few channels, C < kPixelMajorMinC): per-channel rows, depthwise
// loops vectorised along image rows; the packed tile matrix A is Ktot x P (channel rows).
#pragma once
#include "cpu/kernel_planar_pointwise.h"
#include "cpu/kernel_tiles.h"

MSFUSED_KERNEL_BEGIN

// ---- one channel of a tile ------------------------------------------------------------

// Width of one row of the per-channel input buffer: stride 1 keeps the zero-padded row
// (W + 2); stride 2 keeps its even columns (Wo + 1) then its odd columns (Wo).
template <int S>
inline int64_t xrow_width(const BlockDesc& d) {
  return S == 1 ? d.W + 2 : 2 * d.Wo + 1;
}

// Pointer p with p[w] = the input under tap column tj of output column w.
template <int S, typename T>
inline const T* tap(const T* row, int tj, int64_t Wo) {
  if (S == 1) return row + tj;
  return tj == 0 ? row : (tj == 1 ? row + (Wo + 1) : row + 1);
}

// Copies input rows [hb, hb + nrows) of channel c of image bi into buf (zeros outside),
// widened to T when x is 16-bit storage (I = bf16_t).
template <int S, typename T, typename I>
void load_x_rows(const BlockDesc& d, const I* x, int64_t bi, int64_t c, int64_t hb,
                 int64_t nrows, T* buf) {
  const int64_t XW = xrow_width<S>(d), W = d.W, Wo = d.Wo;
  const int64_t cstride = d.channels_last ? d.C : 1;
  for (int64_t k = 0; k < nrows; ++k) {
    const int64_t h = hb + k;
    T* row = buf + k * XW;
    if (h < 0 || h >= d.H) {
      memset(row, 0, sizeof(T) * XW);
      continue;
    }
    const I* src = d.channels_last ? x + ((bi * d.H + h) * W) * d.C + c
                                   : x + ((bi * d.C + c) * d.H + h) * W;
    if (S == 1) {
      row[0] = T(0);
      row[W + 1] = T(0);
      if (cstride == 1 && std::is_same_v<T, I>) {
        copy_n(row + 1, reinterpret_cast<const T*>(src), W);  // (T is I here)
      } else {
        for (int64_t w = 0; w < W; ++w) row[1 + w] = load_as<T>(src + w * cstride);
      }
    } else {
      T* E = row;
      T* O = row + Wo + 1;
      E[0] = T(0);  // input column -1
      for (int64_t k2 = 1; k2 <= Wo; ++k2) {
        const int64_t wi = 2 * k2 - 1;
        E[k2] = wi < W ? load_as<T>(src + wi * cstride) : T(0);
      }
      for (int64_t k2 = 0; k2 < Wo; ++k2) O[k2] = load_as<T>(src + 2 * k2 * cstride);
    }
  }
}

// One output row of a depthwise 3x3 conv: z[w] = bias + the 9 taps over buffer rows row0,
// row0 + XW, row0 + 2 XW (summed in tap order); post[w] = act(z[w]), and pre[w] = z[w]
// when pre is not null. One pass with the nine weights in registers: short rows (a 4-wide
// image) are then a handful of instructions rather than nine loops.
template <int S, int ACT, typename T>
inline void dw_row(const T* row0, int64_t XW, const T* w9, T bias, int64_t Wo, T* pre,
                   T* post) {
  const T* __restrict__ q0 = tap<S>(row0, 0, Wo);
  const T* __restrict__ q1 = tap<S>(row0, 1, Wo);
  const T* __restrict__ q2 = tap<S>(row0, 2, Wo);
  const T* __restrict__ q3 = tap<S>(row0 + XW, 0, Wo);
  const T* __restrict__ q4 = tap<S>(row0 + XW, 1, Wo);
  const T* __restrict__ q5 = tap<S>(row0 + XW, 2, Wo);
  const T* __restrict__ q6 = tap<S>(row0 + 2 * XW, 0, Wo);
  const T* __restrict__ q7 = tap<S>(row0 + 2 * XW, 1, Wo);
  const T* __restrict__ q8 = tap<S>(row0 + 2 * XW, 2, Wo);
  const T k0 = w9[0], k1 = w9[1], k2 = w9[2], k3 = w9[3], k4 = w9[4], k5 = w9[5], k6 = w9[6],
          k7 = w9[7], k8 = w9[8];
  auto z = [&](int64_t w) {
    return bias + k0 * q0[w] + k1 * q1[w] + k2 * q2[w] + k3 * q3[w] + k4 * q4[w] +
           k5 * q5[w] + k6 * q6[w] + k7 * q7[w] + k8 * q8[w];
  };
  if (pre) {
    for (int64_t w = 0; w < Wo; ++w) {
      const T v = z(w);
      pre[w] = v;
      post[w] = act_f<ACT>(v);
    }
  } else {
    for (int64_t w = 0; w < Wo; ++w) post[w] = act_f<ACT>(z(w));
  }
}

// The depthwise part of one channel of one tile: rows of A (a, xs, b) and, for the
// backward, the padded b1 band. pre_* (when act' reads the pre-activation; may be null) get
// pre-activations. x is passed apart from t (16-bit storage in the bfloat16 backward).
template <typename T, int S, int ACT, typename I>
void tile_channel(const BlockDesc& d, const Plan& pl, const BlockTensors<T>& t, const I* x,
                  const TileGeom& g, int64_t c, T* xbuf, T* A, T* b1p, T* pre_a, T* pre_b,
                  T* pre_b1) {
  const int64_t Wo = d.Wo, XW = xrow_width<S>(d), P = g.P, R = g.R, BW = Wo + 2;
  const int64_t hb = S * (g.r0 - 1) - 1;
  load_x_rows<S>(d, x, g.bi, c, hb, S * (R + 1) + 3, xbuf);
  const T ba = t.ba ? t.ba[c] : T(0), bb = t.bb ? t.bb[c] : T(0), bc = t.bc ? t.bc[c] : T(0);
  T* arow = A + c * P;
  T* brow = A + (pl.Ktot - d.C + c) * P;
  for (int64_t i = 0; i < R; ++i)
    dw_row<S, ACT>(xbuf + S * (i + 1) * XW, XW, t.wa + 9 * c, ba, Wo,
                   pre_a ? pre_a + c * P + i * Wo : nullptr, arow + i * Wo);
  for (int64_t k = 0; k < R + 2; ++k) {
    const int64_t q = g.r0 - 1 + k;
    T* row = b1p + k * BW;
    T* pre = pre_b1 ? pre_b1 + k * BW : nullptr;
    if (q < 0 || q >= d.Ho) {
      memset(row, 0, sizeof(T) * BW);
      if (pre) memset(pre, 0, sizeof(T) * BW);
      continue;
    }
    row[0] = row[Wo + 1] = T(0);
    if (pre) pre[0] = pre[Wo + 1] = T(0);
    dw_row<S, ACT>(xbuf + S * k * XW, XW, t.wb + 9 * c, bb, Wo, pre ? pre + 1 : nullptr,
                   row + 1);
  }
  for (int64_t i = 0; i < R; ++i)
    dw_row<1, ACT>(b1p + i * BW, BW, t.wc + 9 * c, bc, Wo,
                   pre_b ? pre_b + c * P + i * Wo : nullptr, brow + i * Wo);
  if (pl.Cs) {
    T* xsrow = A + (d.C + c) * P;
    for (int64_t i = 0; i < R; ++i)
      copy_n(xsrow + i * Wo, tap<S>(xbuf + (S * (i + 1) + 1) * XW, 1, Wo), Wo);
  }
}

// The planar forward: per tile, the depthwise rows of every channel into A, then the fused
// pointwise convs and epilogue (wp, bias: pack_weights). x, y and pre are I: T, or bfloat16
// storage (bf16_t; t.x is then unused), widened on load and rounded once on store.
template <typename T, int S, int ACT, typename I>
void forward_planar(const Runtime& rt, const BlockDesc& d, const Plan& pl,
                    const BlockTensors<T>& t, const I* x, const T* wp, const T* bias, I* y,
                    I* pre_out) {
  const int64_t HoWo = d.Ho * d.Wo;
  const bool identity = d.residual && !d.projection;
  Buf<T> wk(packed_weight_elems(d, pl));
  const PointwiseSegs<T> sg = pack_pointwise_segs(d, pl, wp, wk.p);
  auto task = [&](int64_t chunk) {
    const int64_t t0 = chunk * pl.ntiles / pl.nchunks, t1 = (chunk + 1) * pl.ntiles / pl.nchunks;
    const int64_t Pmax = pl.R * d.Wo;
    TlsBuf<T> A(0, pl.Ktot * Pmax), xbuf(1, (S * (pl.R + 1) + 3) * xrow_width<S>(d)),
        b1p(2, (pl.R + 2) * (d.Wo + 2));
    for (int64_t tile = t0; tile < t1; ++tile) {
      const TileGeom g = tile_geom(d, pl, tile);
      for (int64_t c = 0; c < d.C; ++c)
        tile_channel<T, S, ACT>(d, pl, t, x, g, c, xbuf.p, A.p, b1p.p, nullptr, nullptr,
                                nullptr);
      const int64_t off = d.channels_last ? (g.bi * HoWo + g.r0 * d.Wo) * d.Cout
                                          : g.bi * d.Cout * HoWo + g.r0 * d.Wo;
      tile_pointwise_fused<T, ACT>(d, sg, bias, A.p, g.P, y + off,
                                   identity ? x + off : nullptr,
                                   pre_out ? pre_out + off : nullptr);
    }
  };
  par_for(rt, pl.nchunks, task);
}

// sum over R rows of sum_{w < n} g[i * gs + w] * src[i * ss + w]: vector sums across all the
// rows, reduced once (a scalar reduction is what the compiler makes of a plain loop, since
// it may not reorder float sums).
template <typename T>
inline T dot_rows(const T* g, int64_t gs, const T* src, int64_t ss, int64_t R, int64_t n) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  V a{};
  T s = T(0);
  for (int64_t i = 0; i < R; ++i) {
    const T* gi = g + i * gs;
    const T* si = src + i * ss;
    int64_t w = 0;
    for (; w + VN <= n; w += VN) a += vload(gi + w) * vload(si + w);
    for (; w < n; ++w) s += gi[w] * si[w];
  }
  return hsum(a) + s;
}

// sum over R rows of sum_{w < n} g[i * gs + w], in dot_rows' order (for gs == n the order of
// sum_row over the R n elements whenever n is a whole number of vectors).
template <typename T>
inline T sum_rows(const T* g, int64_t gs, int64_t R, int64_t n) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  V a{};
  T s = T(0);
  for (int64_t i = 0; i < R; ++i) {
    const T* gi = g + i * gs;
    int64_t w = 0;
    for (; w + VN <= n; w += VN) a += vload(gi + w);
    for (; w < n; ++w) s += gi[w];
  }
  return hsum(a) + s;
}

template <typename T>
inline T sum_row(const T* g, int64_t n) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  V a{};
  int64_t w = 0;
  for (; w + VN <= n; w += VN) a += vload(g + w);
  T s = hsum(a);
  for (; w < n; ++w) s += g[w];
  return s;
}

// x, dy and saved may be 16-bit storage (I = bf16_t, widened on load); dx is T.
template <typename T, int S, int ACT, typename I>
void backward_pass1(const Runtime& rt, const BlockDesc& d, const Plan& pl,
                    const BlockTensors<T>& t, const I* x, const I* gy, const I* saved,
                    const T* wp, T* dx, T* SA, T* SB, T* parts) {
  const int64_t HoWo = d.Ho * d.Wo, C = d.C, Wo = d.Wo, Cout = d.Cout;
  const int64_t XW = xrow_width<S>(d), BW = Wo + 2;
  const PartLayout L(d, pl);
  const bool identity = d.residual && !d.projection;
  const bool need_pre = kNeedsPreact<ACT>;  // the activation's gradient reads pre
  Buf<T> wk(packed_weight_elems(d, pl)), wo(Cout * pointwise_wo_stride<T>(pl));
  const PointwiseSegs<T> sg = pack_pointwise_segs(d, pl, wp, wk.p);
  pack_pointwise_wo(d, pl, sg, wo.p);
  auto task = [&](int64_t chunk) {
    const int64_t t0 = chunk * pl.ntiles / pl.nchunks, t1 = (chunk + 1) * pl.ntiles / pl.nchunks;
    const int64_t Pmax = pl.R * Wo;
    T* part = parts + chunk * pl.part;
    memset(part, 0, sizeof(T) * pl.part);
    TlsBuf<T> A(0, pl.Ktot * Pmax), dA(1, pl.Ktot * Pmax), G(2, Cout * Pmax),
        xbuf(3, (S * (pl.R + 1) + 3) * XW), b1p(4, C * (pl.R + 2) * BW),
        preA(6, need_pre ? pl.Ktot * Pmax : 1);
    for (int64_t tile = t0; tile < t1; ++tile) {
      const TileGeom g = tile_geom(d, pl, tile);
      const int64_t P = g.P;
      const int64_t off = d.channels_last ? (g.bi * HoWo + g.r0 * Wo) * Cout
                                          : g.bi * Cout * HoWo + g.r0 * Wo;
      // gz = gy * act'(z), in G: Cout x P (NCHW) or P x Cout (NHWC); bias and identity grads
      tile_gz<T, ACT>(d, gy, saved, off, P, G.p, part + L.bo, dx, identity);
      // recompute the branches
      for (int64_t c = 0; c < C; ++c)
        tile_channel<T, S, ACT>(d, pl, t, x, g, c, xbuf.p, A.p, b1p.p + c * (g.R + 2) * BW,
                                need_pre ? preA.p : nullptr,
                                need_pre ? preA.p + (pl.Ktot - C) * P : nullptr, nullptr);
      // pointwise weight gradients and dA = W^T gz, in registers
      tile_pointwise_grads(d, pl, sg, wo.p, G.p, A.p, P, part + L.pw, dA.p);
      // per channel: through the branch activations, depthwise weight grads, scratch
      for (int64_t c = 0; c < C; ++c) {
        T* da = dA.p + c * P;
        T* db = dA.p + (pl.Ktot - C + c) * P;
        const T* a = A.p + c * P;
        const T* b = A.p + (pl.Ktot - C + c) * P;
        const T* pa = need_pre ? preA.p + c * P : a;
        const T* pb = need_pre ? preA.p + (pl.Ktot - C + c) * P : b;
        act_grad<ACT>(da, a, pa, da, P);
        act_grad<ACT>(db, b, pb, db, P);
        T* sa = SA + (g.bi * C + c) * HoWo + g.r0 * Wo;
        T* sb = SB + (g.bi * C + c) * HoWo + g.r0 * Wo;
        memcpy(sa, da, sizeof(T) * P);
        memcpy(sb, db, sizeof(T) * P);
        // dwa, dba: x rows again (cheap), dwc, dbc: from the b1 band
        load_x_rows<S>(d, x, g.bi, c, S * (g.r0 - 1) - 1, S * (g.R + 1) + 3, xbuf.p);
        const T* b1 = b1p.p + c * (g.R + 2) * BW;
        for (int ti = 0; ti < 3; ++ti)
          for (int tj = 0; tj < 3; ++tj) {
            part[L.wa + 9 * c + ti * 3 + tj] +=
                dot_rows(da, Wo, tap<S>(xbuf.p + (S + ti) * XW, tj, Wo), S * XW, g.R, Wo);
            part[L.wc + 9 * c + ti * 3 + tj] += dot_rows(db, Wo, b1 + ti * BW + tj, BW, g.R, Wo);
          }
        part[L.ba + c] += sum_row(da, P);
        part[L.bc + c] += sum_row(db, P);
        // projection: dx at (s r, s w) gets the xs rows of dA (positions owned by this tile)
        if (pl.Cs) {
          const T* dxs = dA.p + (C + c) * P;
          for (int64_t i = 0; i < g.R; ++i)
            for (int64_t w = 0; w < Wo; ++w) {
              const int64_t h = S * (g.r0 + i), wi = S * w;
              const int64_t o = d.channels_last ? ((g.bi * d.H + h) * d.W + wi) * C + c
                                                : ((g.bi * C + c) * d.H + h) * d.W + wi;
              dx[o] = dxs[i * Wo + w];
            }
        }
      }
    }
  };
  par_for(rt, pl.nchunks, task);
}

// Rows [q0, q0 + n) of a planar (Ho x Wo) gradient into padded rows of Wo + 2 (data at
// 1 .. Wo), zero rows outside the image: the transposed depthwise convs below then read
// every tap without bounds checks.
template <typename T>
inline void pad_rows(const T* src, int64_t Ho, int64_t Wo, int64_t q0, int64_t n, T* band) {
  const int64_t PW = Wo + 2;
  for (int64_t k = 0; k < n; ++k) {
    T* row = band + k * PW;
    const int64_t q = q0 + k;
    if (q < 0 || q >= Ho) {
      memset(row, 0, sizeof(T) * PW);
      continue;
    }
    row[0] = row[Wo + 1] = T(0);
    copy_n(row + 1, src + q * Wo, Wo);
  }
}

// One row of db1 = the transposed depthwise conv of db with wc: out[w] sums, in tap order
// (ti, tj), wc[ti][tj] * db[q + 1 - ti][w + 1 - tj]; r0, r1, r2 are the padded db rows
// q + 1, q, q - 1. Each sum in a register over all nine taps (a row summed in memory tap by
// tap waits on its own stores).
template <typename T>
inline void transposed_dw_row(const T* r0, const T* r1, const T* r2, const T* k, int64_t Wo,
                              T* out) {
  const T* __restrict__ a = r0;
  const T* __restrict__ b = r1;
  const T* __restrict__ c = r2;
  T* __restrict__ o = out;
  const T k0 = k[0], k1 = k[1], k2 = k[2], k3 = k[3], k4 = k[4], k5 = k[5], k6 = k[6],
          k7 = k[7], k8 = k[8];
  for (int64_t w = 0; w < Wo; ++w) {
    T acc = T(0);
    acc += k0 * a[w + 2]; acc += k1 * a[w + 1]; acc += k2 * a[w];
    acc += k3 * b[w + 2]; acc += k4 * b[w + 1]; acc += k5 * b[w];
    acc += k6 * c[w + 2]; acc += k7 * c[w + 1]; acc += k8 * c[w];
    o[w] = acc;
  }
}

// One input row of dx before the residual: the transposed depthwise convs of da (with wa)
// and db1 (with wb), as backward_pass2's dxrow (stride 1: zero-padded, stride 2: the
// even/odd split of tap<2>), from the NTI tap rows ti[n] that reach this row (A[n], B[n]:
// the padded da and db1 rows they read). Per element the taps are summed in (ti, tj) order,
// in a register.
template <int S, int NTI, typename T>
inline void dx_row(const int* ti, const T* const* A, const T* const* B, const T* wa,
                   const T* wb, int64_t Wo, T* dxrow) {
  T ka[NTI][3], kb[NTI][3];
  for (int n = 0; n < NTI; ++n)
    for (int tj = 0; tj < 3; ++tj) ka[n][tj] = wa[ti[n] * 3 + tj], kb[n][tj] = wb[ti[n] * 3 + tj];
  const T* const* a = A;
  const T* const* b = B;
  if (S == 1) {
    // dxrow[i] (i = 1 .. Wo: the input columns) gets tap column tj from da column i - tj
    for (int64_t i = 1; i <= Wo; ++i) {
      T acc = T(0);
#pragma GCC unroll 3
      for (int n = 0; n < NTI; ++n) {
        acc += ka[n][0] * a[n][i + 1] + kb[n][0] * b[n][i + 1];
        acc += ka[n][1] * a[n][i] + kb[n][1] * b[n][i];
        acc += ka[n][2] * a[n][i - 1] + kb[n][2] * b[n][i - 1];
      }
      dxrow[i] = acc;
    }
  } else {
    // even split E[k] (k = 0 .. Wo): tap column 0 from column k, tap column 2 from k - 1;
    // odd split O[k] (k < Wo): tap column 1 from column k
    T* E = dxrow;
    T* O = dxrow + Wo + 1;
    for (int64_t k = 0; k <= Wo; ++k) {
      T acc = T(0);
#pragma GCC unroll 3
      for (int n = 0; n < NTI; ++n) {
        acc += ka[n][0] * a[n][k + 1] + kb[n][0] * b[n][k + 1];
        acc += ka[n][2] * a[n][k] + kb[n][2] * b[n][k];
      }
      E[k] = acc;
    }
    for (int64_t k = 0; k < Wo; ++k) {
      T acc = T(0);
#pragma GCC unroll 3
      for (int n = 0; n < NTI; ++n) acc += ka[n][1] * a[n][k + 1] + kb[n][1] * b[n][k + 1];
      O[k] = acc;
    }
  }
}

template <typename T, int S, int ACT, typename I>
void backward_pass2(const Runtime& rt, const BlockDesc& d, const Plan& pl,
                    const BlockTensors<T>& t, const I* x, T* dx, const T* SA, const T* SB,
                    T* parts) {
  const int64_t HoWo = d.Ho * d.Wo, C = d.C, Wo = d.Wo, Ho = d.Ho, W = d.W;
  const int64_t XW = xrow_width<S>(d), PW = Wo + 2;
  const PartLayout L(d, pl);
  // dx rows use padded scatter rows: stride 1 a zero-padded row (W + 2), stride 2 the
  // even/odd split of the input buffer (same indexing as tap<2>).
  const int64_t DXW = xrow_width<S>(d);
  auto task = [&](int64_t chunk) {
    const int64_t t0 = chunk * pl.ntiles / pl.nchunks, t1 = (chunk + 1) * pl.ntiles / pl.nchunks;
    T* part = parts + chunk * pl.part;
    const int64_t RR = pl.R + 2;
    // d1: db1_pre rows, padded; bb / ba: padded db rows q_lo - 1 .. q_lo + R + 2 and da rows
    // q_lo .. q_lo + R + 1
    TlsBuf<T> xbuf(8, (S * (pl.R + 1) + 3) * XW), d1(9, RR * PW), b1post(10, Wo + 2),
        b1pre(11, Wo + 2), dxrow(12, DXW), bb_band(13, (RR + 2) * PW), ba_band(14, RR * PW);
    for (int64_t tile = t0; tile < t1; ++tile) {
      const TileGeom g = tile_geom(d, pl, tile);
      const int64_t q_lo = g.r0 - 1;  // d1 row k holds b1 row q_lo + k
      const int64_t hs = S * g.r0, he = S * (g.r0 + g.R) < d.H ? S * (g.r0 + g.R) : d.H;
      for (int64_t c = 0; c < C; ++c) {
        const T* wa = t.wa + 9 * c;
        const T* wb = t.wb + 9 * c;
        const T* wc = t.wc + 9 * c;
        const T bb = t.bb ? t.bb[c] : T(0);
        const int64_t hb = S * (g.r0 - 1) - 1;
        load_x_rows<S>(d, x, g.bi, c, hb, S * (g.R + 1) + 3, xbuf.p);
        pad_rows(SB + (g.bi * C + c) * HoWo, Ho, Wo, q_lo - 1, g.R + 4, bb_band.p);
        pad_rows(SA + (g.bi * C + c) * HoWo, Ho, Wo, q_lo, g.R + 2, ba_band.p);
        // db1_pre for b1 rows q in [r0 - 1, r0 + R]: transposed depthwise of db with wc,
        // times act'(b1) recomputed from x. Rows outside the image are zero.
        for (int64_t k = 0; k < g.R + 2; ++k) {
          const int64_t q = q_lo + k;
          T* prow = d1.p + k * PW;
          if (q < 0 || q >= Ho) {
            memset(prow, 0, sizeof(T) * PW);
            continue;
          }
          T* row = prow + 1;
          prow[0] = prow[Wo + 1] = T(0);
          // band row u holds db row q_lo - 1 + u: rows q + 1, q, q - 1 are u = k + 2, k + 1, k
          transposed_dw_row(bb_band.p + (k + 2) * PW, bb_band.p + (k + 1) * PW,
                            bb_band.p + k * PW, wc, Wo, row);
          dw_row<S, ACT>(xbuf.p + S * k * XW, XW, wb, bb, Wo,
                         kNeedsPreact<ACT> ? b1pre.p : nullptr, b1post.p);
          act_grad<ACT>(row, b1post.p, b1pre.p, row, Wo);
        }
        // dwb, dbb over the rows this tile owns (k = 1 .. R)
        const T* d1own = d1.p + PW + 1;
        for (int ti = 0; ti < 3; ++ti)
          for (int tj = 0; tj < 3; ++tj)
            part[L.wb + 9 * c + ti * 3 + tj] += dot_rows(
                d1own, PW, tap<S>(xbuf.p + (S + ti) * XW, tj, Wo), S * XW, g.R, Wo);
        part[L.bb + c] += sum_rows(d1own, PW, g.R, Wo);
        // dx rows [hs, he): input row h gets tap row ti from output row q = (h + 1 - ti) / S
        // (padded band row q - q_lo; rows outside the image are zero in both bands)
        for (int64_t h = hs; h < he; ++h) {
          int tis[3];
          const T* A[3];
          const T* B[3];
          int nt = 0;
          for (int ti = 0; ti < 3; ++ti) {
            const int64_t num = h + 1 - ti;
            if (num < 0 || num % S) continue;
            const int64_t k = num / S - q_lo;
            tis[nt] = ti;
            A[nt] = ba_band.p + k * PW;
            B[nt] = d1.p + k * PW;
            ++nt;
          }
          if (nt == 3) dx_row<S, 3>(tis, A, B, wa, wb, Wo, dxrow.p);
          else if (nt == 2) dx_row<S, 2>(tis, A, B, wa, wb, Wo, dxrow.p);
          else dx_row<S, 1>(tis, A, B, wa, wb, Wo, dxrow.p);
          // un-pad / interleave back into dx (which holds the residual/projection part)
          T* out = d.channels_last ? dx + ((g.bi * d.H + h) * W) * C + c
                                   : dx + ((g.bi * C + c) * d.H + h) * W;
          const int64_t cs = d.channels_last ? C : 1;
          if (S == 1) {
            for (int64_t w = 0; w < W; ++w) out[w * cs] += dxrow.p[1 + w];
          } else {
            const T* E = dxrow.p;
            const T* O = dxrow.p + Wo + 1;
            for (int64_t w = 0; w < W; ++w)
              out[w * cs] += (w & 1) ? E[(w + 1) / 2] : O[w / 2];
          }
        }
      }
    }
  };
  par_for(rt, pl.nchunks, task);
}


MSFUSED_KERNEL_END
