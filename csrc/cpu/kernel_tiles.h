// Pieces both CPU paths (planar and pixel-major) share: tile geometry, the packed pointwise
// weights, the forward epilogue, the output-side start of the backward (gz) and the layout
// of a chunk's partial weight gradients.
#pragma once
#include "cpu/kernel_simd.h"
#include "cpu/tiling.h"

MSFUSED_KERNEL_BEGIN

struct TileGeom {
  int64_t bi, r0, R, P;  // image, first output row, rows, pixels (R * Wo)
};

inline TileGeom tile_geom(const BlockDesc& d, const Plan& pl, int64_t tile) {
  TileGeom g;
  g.bi = tile / pl.nbands;
  g.r0 = (tile % pl.nbands) * pl.R;
  g.R = pl.R < d.Ho - g.r0 ? pl.R : d.Ho - g.r0;
  g.P = g.R * d.Wo;
  return g;
}

// Packed pointwise weights, row-major. add: [Pa | Ws | Pb] (N x Ktot). concat: W1 =
// [Pa | Ws[:N]] and W2 = [Ws[N:] | Pb] (each N x (C + Cs)), stored one after the other.
// Also the summed output bias (qa / qb by half or both, plus bs).
template <typename T>
void pack_weights(const BlockDesc& d, const Plan& pl, const BlockTensors<T>& t, T* wp,
                  T* bias) {
  const int64_t C = d.C, N = d.N, Cs = pl.Cs;
  if (d.merge == kAdd) {
    for (int64_t n = 0; n < N; ++n) {
      T* row = wp + n * pl.Ktot;
      memcpy(row, t.pa + n * C, sizeof(T) * C);
      if (Cs) memcpy(row + C, t.ws + n * C, sizeof(T) * C);
      memcpy(row + C + Cs, t.pb + n * C, sizeof(T) * C);
      bias[n] = (t.qa ? t.qa[n] : T(0)) + (t.qb ? t.qb[n] : T(0));
    }
  } else {
    const int64_t K = C + Cs;
    for (int64_t n = 0; n < N; ++n) {
      T* r1 = wp + n * K;
      T* r2 = wp + (N + n) * K;
      memcpy(r1, t.pa + n * C, sizeof(T) * C);
      if (Cs) memcpy(r1 + C, t.ws + n * C, sizeof(T) * C);
      if (Cs) memcpy(r2, t.ws + (N + n) * C, sizeof(T) * C);
      memcpy(r2 + Cs, t.pb + n * C, sizeof(T) * C);
      bias[n] = t.qa ? t.qa[n] : T(0);
      bias[N + n] = t.qb ? t.qb[n] : T(0);
    }
  }
  if (d.projection && t.bs)
    for (int64_t co = 0; co < d.Cout; ++co) bias[co] += t.bs[co];
}

// Epilogue of a tile: z = (pointwise/projection sum) + output bias (+ identity residual,
// x having y's shape and layout then); y = act(z), pre = z if asked. The sum is read at
// src[p * sp + co * sc]: the tile of y itself (planar path, in place) or a pixel-major
// buffer (pixel-major path). y, x and pre may be 16-bit storage (O = bf16_t): x widened,
// y and pre rounded once here.
template <typename T, int ACT, typename O>
void epilogue(const BlockDesc& d, const T* src, int64_t sp, int64_t sc, O* ytile,
              const O* xres, O* ptile, const T* bias, int64_t P) {
  const int64_t HoWo = d.Ho * d.Wo, Cout = d.Cout;
  // y's own strides for pixel p, channel co
  const int64_t yp = d.channels_last ? Cout : 1, yc = d.channels_last ? 1 : HoWo;
  auto one = [&](int64_t p, int64_t co) {
    T z = src[p * sp + co * sc] + bias[co];
    const int64_t o = p * yp + co * yc;
    if (xres) z += load_as<T>(xres + o);
    if (ptile) store_as(ptile + o, z);
    store_as(ytile + o, act_f<ACT>(z));
  };
  if (d.channels_last && sp == Cout && sc == 1) {  // everything P x Cout: channel vectors
    typedef typename Vec<T>::type V;
    constexpr int VN = Vec<T>::n;
    for (int64_t p = 0; p < P; ++p) {
      const T* sr = src + p * Cout;
      O* yr = ytile + p * Cout;
      const O* xr = xres ? xres + p * Cout : nullptr;
      O* pr = ptile ? ptile + p * Cout : nullptr;
      int64_t co = 0;
      for (; co + VN <= Cout; co += VN) {
        V z = vload(sr + co) + vload(bias + co);
        if (xr) z += vload_as<T>(xr + co);
        dw_store<ACT>(z, yr + co, pr ? pr + co : nullptr);
      }
      for (; co < Cout; ++co) one(p, co);
    }
  } else if (d.channels_last) {  // loop order follows y's memory order
    for (int64_t p = 0; p < P; ++p)
      for (int64_t co = 0; co < Cout; ++co) one(p, co);
  } else {
    for (int64_t co = 0; co < Cout; ++co)
      for (int64_t p = 0; p < P; ++p) one(p, co);
  }
}

// Output-side start of the backward for one tile: G = dy * act'(z) in dy's layout (Cout x P
// for NCHW, P x Cout for NHWC), the output-bias partial, and the identity-residual part of
// dx (dx has y's shape then; each tile owns its positions).
// dy and saved may be 16-bit storage (I = bf16_t: widened here); G and dx are T.
template <typename T, int ACT, typename I>
void tile_gz(const BlockDesc& d, const I* gy, const I* saved, int64_t off, int64_t P, T* G,
             T* dbias, T* dx, bool identity) {
  const int64_t HoWo = d.Ho * d.Wo, Cout = d.Cout;
  if (d.channels_last) {
    for (int64_t p = 0; p < P; ++p) {
      const I* gr = gy + off + p * Cout;
      const I* sr = ACT == kActNone ? nullptr : saved + off + p * Cout;
      T* o = G + p * Cout;
      act_grad_in<ACT>(gr, sr, sr, o, Cout);
      constexpr int VN = Vec<T>::n;
      int64_t co = 0;
      for (; co + VN <= Cout; co += VN) vstore(dbias + co, vload(dbias + co) + vload(o + co));
      for (; co < Cout; ++co) dbias[co] += o[co];
      if (identity) memcpy(dx + off + p * Cout, o, sizeof(T) * Cout);
    }
  } else {
    for (int64_t co = 0; co < Cout; ++co) {
      const I* gr = gy + off + co * HoWo;
      const I* sr = ACT == kActNone ? nullptr : saved + off + co * HoWo;
      T* o = G + co * P;
      act_grad_in<ACT>(gr, sr, sr, o, P);
      typedef typename Vec<T>::type V;
      constexpr int VN = Vec<T>::n;
      V a{};
      int64_t p = 0;
      for (; p + VN <= P; p += VN) a += vload(o + p);
      T s = hsum(a);
      for (; p < P; ++p) s += o[p];
      dbias[co] += s;
      if (identity) memcpy(dx + off + co * HoWo, o, sizeof(T) * P);
    }
  }
}

// Partial gradients of one chunk: [pointwise packed (npw) | out bias (Cout) | dwa dwb dwc
// (9C each) | dba dbb dbc (C each)].
struct PartLayout {
  int64_t pw, bo, wa, wb, wc, ba, bb, bc;
  PartLayout(const BlockDesc& d, const Plan& pl) {
    pw = 0; bo = pl.npw; wa = bo + d.Cout; wb = wa + 9 * d.C; wc = wb + 9 * d.C;
    ba = wc + 9 * d.C; bb = ba + d.C; bc = bb + d.C;
  }
};


MSFUSED_KERNEL_END
