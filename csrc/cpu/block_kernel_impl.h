// The fused CPU block kernels. Included once per instruction set by block_kernel_<isa>.cpp
// with MSFUSED_ISA naming the namespace; everything here has internal linkage or lives in
// that namespace, so copies compiled for different instruction sets never mix.
//
// Forward, per tile (one image, a band of R output rows), per channel c:
//   the input rows the tile needs are copied once into a zero-padded row buffer (for
//   stride 2 split into even/odd columns so every tap is a unit-stride load), then
//   a = act(dw(x)), b1 = act(dw(x)) over the band plus one row each side (zero outside the
//   image, as conv2d's padding of b1 requires), b = act(dw(b1)), xs = x[::s, ::s] are
//   written as rows of a packed matrix A = [a; xs; b] (Ktot x P, P = pixels of the tile).
// Then one GEMM per output half (concat) or one GEMM (add) against the packed pointwise
// and projection weights writes the tile of y, and the epilogue adds biases and the
// identity residual and applies the activation. a, b1, b, pa, pb never reach memory.
//
// Backward, two parallel passes over the same tiles plus a fixed-order reduction:
//   pass 1: gz = dy * act'(z); recompute A; dW_pointwise += gz A^T (GEMM); dA = W^T gz (GEMM);
//           da = dA_a * act'(a), db = dA_b * act'(b) to scratch; projection and identity
//           gradients into dx; dwa, dwc partial sums (b1 is at hand in the tile).
//   pass 2: db1 = dwconv^T(db) * act'(b1) over the band plus a row each side (b1
//           recomputed), dwb partial sums, and dx += dwconv^T(da, wa) + dwconv^T(db1, wb)
//           for the input rows the band owns.
//   then: partial weight gradients summed over chunks in chunk order (deterministic).
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu/block_kernel.h"
#include "cpu/tiling.h"

namespace msfused {
namespace cpu {
namespace MSFUSED_ISA {
namespace {

template <typename T>
struct Buf {  // heap scratch of one task; malloc keeps this free of std:: templates
  T* p;
  explicit Buf(int64_t n) : p(static_cast<T*>(malloc(sizeof(T) * (n > 0 ? n : 1)))) {
    if (!p) abort();
  }
  ~Buf() { free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};


// 32-byte vectors through GCC/Clang vector extensions (one AVX2 register; two SSE/NEON
// registers in the baseline build). Register-blocked loops use these explicitly: with plain
// arrays the compiler keeps the accumulators on the stack. aligned(sizeof(T)) makes the
// pointer casts below valid unaligned loads and stores.
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(32), aligned(4)));
  static constexpr int n = 8;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(32), aligned(8)));
  static constexpr int n = 4;
};
template <typename T>
inline typename Vec<T>::type vload(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::type*>(p);
}
template <typename T>
inline void vstore(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::type*>(p) = v;
}

inline float exp_(float v) { return expf(v); }
inline double exp_(double v) { return exp(v); }

// Activations as torch.nn.functional computes them (NaN propagates).
template <int ACT, typename T>
inline T act_f(T v) {
  if (ACT == kActRelu) return v < T(0) ? T(0) : v;
  if (ACT == kActRelu6) return v < T(0) ? T(0) : (v > T(6) ? T(6) : v);
  if (ACT == kActSilu) return v / (T(1) + exp_(-v));
  return v;
}

// Derivative of the activation, from its output (relu, relu6: PyTorch's convention of 0
// at the kinks) or its input (silu).
template <int ACT, typename T>
inline T act_d(T post, T pre) {
  if (ACT == kActRelu) return post > T(0) ? T(1) : T(0);
  if (ACT == kActRelu6) return (post > T(0) && post < T(6)) ? T(1) : T(0);
  if (ACT == kActSilu) {
    T s = T(1) / (T(1) + exp_(-pre));
    return s * (T(1) + pre * (T(1) - s));
  }
  (void)post; (void)pre;
  return T(1);
}

// relu / relu6 on a vector (NaN propagates: comparisons with NaN are false); other
// activations are applied by the scalar act_f.
template <int ACT, typename T>
inline typename Vec<T>::type act_v(typename Vec<T>::type v) {
  typedef typename Vec<T>::type V;
  const V z{};
  if (ACT == kActRelu) return v < z ? z : v;
  if (ACT == kActRelu6) {
    const V six = z + T(6);
    return v < z ? z : (v > six ? six : v);
  }
  return v;
}

// Stores one pixel's channel vector: pre (if asked) gets z, post gets act(z).
template <int ACT, typename V, typename T>
inline void dw_store(V z, T* post, T* pre) {
  if (pre) vstore(pre, z);
  vstore(post, act_v<ACT, T>(z));
  if (ACT == kActSilu)
    for (int j = 0; j < Vec<T>::n; ++j) post[j] = act_f<ACT>(post[j]);
}

// out[i] = g[i] * act'(i) for n elements (out may be g). relu and relu6 use PyTorch's select
// form (threshold_backward / hardtanh_backward: the gradient where the unit is active, else
// 0), branch-free and vectorised: the masks are data-dependent, so a branch mispredicts.
// post and pre are the activation's output and input (pre is read for silu only; neither
// for none).
template <int ACT, typename T>
inline void act_grad(const T* g, const T* post, const T* pre, T* out, int64_t n) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  if (ACT == kActNone) {
    if (out != g) memcpy(out, g, sizeof(T) * n);
    return;
  }
  if (ACT == kActSilu) {
    for (int64_t i = 0; i < n; ++i) out[i] = g[i] * act_d<ACT>(post[i], pre[i]);
    return;
  }
  const V z{};
  const V six = z + T(6);
  int64_t i = 0;
  for (; i + VN <= n; i += VN) {
    const V gv = vload(g + i), pv = vload(post + i);
    if (ACT == kActRelu)
      vstore(out + i, pv > z ? gv : z);
    else
      vstore(out + i, (pv > z) & (pv < six) ? gv : z);
  }
  for (; i < n; ++i) {
    const bool on = ACT == kActRelu ? post[i] > T(0) : (post[i] > T(0) && post[i] < T(6));
    out[i] = on ? g[i] : T(0);
  }
}

template <typename T>
inline void gemm(const Runtime& rt, char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha,
                 const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);
template <>
inline void gemm<float>(const Runtime& rt, char ta, char tb, int64_t m, int64_t n, int64_t k,
                        float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                        float beta, float* c, int64_t ldc) {
  rt.sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <>
inline void gemm<double>(const Runtime& rt, char ta, char tb, int64_t m, int64_t n, int64_t k,
                         double alpha, const double* a, int64_t lda, const double* b,
                         int64_t ldb, double beta, double* c, int64_t ldc) {
  rt.dgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major GEMM: C (m x n, ldc) = alpha * op(A) op(B) + beta * C, where op(A) is m x k and
// A is stored row-major (k x m when ta == 'T'). Mapped onto column-major BLAS as
// C^T = op(B)^T op(A)^T.
template <typename T>
inline void gemm_rm(const Runtime& rt, char ta, char tb, int64_t m, int64_t n, int64_t k,
                    T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                    int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  gemm<T>(rt, tb, ta, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
}

template <typename F>
inline void par_for(const Runtime& rt, int64_t n, F& f) {
  rt.parallel_for(n, 1, &f, [](void* ctx, int64_t b, int64_t e) {
    F& fn = *static_cast<F*>(ctx);
    for (int64_t i = b; i < e; ++i) fn(i);
  });
}

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

// Copies input rows [hb, hb + nrows) of channel c of image bi into buf (zeros outside).
template <int S, typename T>
void load_x_rows(const BlockDesc& d, const T* x, int64_t bi, int64_t c, int64_t hb,
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
    const T* src = d.channels_last ? x + ((bi * d.H + h) * W) * d.C + c
                                   : x + ((bi * d.C + c) * d.H + h) * W;
    if (S == 1) {
      row[0] = T(0);
      row[W + 1] = T(0);
      if (cstride == 1) {
        memcpy(row + 1, src, sizeof(T) * W);
      } else {
        for (int64_t w = 0; w < W; ++w) row[1 + w] = src[w * cstride];
      }
    } else {
      T* E = row;
      T* O = row + Wo + 1;
      E[0] = T(0);  // input column -1
      for (int64_t k2 = 1; k2 <= Wo; ++k2) {
        const int64_t wi = 2 * k2 - 1;
        E[k2] = wi < W ? src[wi * cstride] : T(0);
      }
      for (int64_t k2 = 0; k2 < Wo; ++k2) O[k2] = src[2 * k2 * cstride];
    }
  }
}

// pre[w] = bias + sum of the 9 taps over rows row0, row0 + XW, row0 + 2 XW of the buffer.
template <int S, typename T>
inline void dw_row(const T* row0, int64_t XW, const T* w9, T bias, int64_t Wo, T* pre) {
  for (int64_t w = 0; w < Wo; ++w) pre[w] = bias;
  for (int ti = 0; ti < 3; ++ti) {
    const T* r = row0 + ti * XW;
    for (int tj = 0; tj < 3; ++tj) {
      const T wt = w9[ti * 3 + tj];
      const T* src = tap<S>(r, tj, Wo);
      for (int64_t w = 0; w < Wo; ++w) pre[w] += wt * src[w];
    }
  }
}

template <int ACT, typename T>
inline void act_row(const T* pre, T* post, int64_t n) {
  for (int64_t w = 0; w < n; ++w) post[w] = act_f<ACT>(pre[w]);
}

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

// The depthwise part of one channel of one tile: rows of A (a, xs, b) and, for the
// backward, the padded b1 band. pre_* (silu only, may be null) get pre-activations.
template <typename T, int S, int ACT>
void tile_channel(const BlockDesc& d, const Plan& pl, const BlockTensors<T>& t,
                  const TileGeom& g, int64_t c, T* xbuf, T* A, T* b1p, T* pre_a, T* pre_b,
                  T* pre_b1, T* tmp) {
  const int64_t Wo = d.Wo, XW = xrow_width<S>(d), P = g.P, R = g.R, BW = Wo + 2;
  const int64_t hb = S * (g.r0 - 1) - 1;
  load_x_rows<S>(d, t.x, g.bi, c, hb, S * (R + 1) + 3, xbuf);
  const T ba = t.ba ? t.ba[c] : T(0), bb = t.bb ? t.bb[c] : T(0), bc = t.bc ? t.bc[c] : T(0);
  T* arow = A + c * P;
  T* brow = A + (pl.Ktot - d.C + c) * P;
  for (int64_t i = 0; i < R; ++i) {
    T* pre = pre_a ? pre_a + c * P + i * Wo : tmp;
    dw_row<S>(xbuf + S * (i + 1) * XW, XW, t.wa + 9 * c, ba, Wo, pre);
    act_row<ACT>(pre, arow + i * Wo, Wo);
  }
  for (int64_t k = 0; k < R + 2; ++k) {
    const int64_t q = g.r0 - 1 + k;
    T* row = b1p + k * BW;
    T* pre = pre_b1 ? pre_b1 + k * BW : tmp;
    if (q < 0 || q >= d.Ho) {
      memset(row, 0, sizeof(T) * BW);
      if (pre_b1) memset(pre, 0, sizeof(T) * BW);
      continue;
    }
    row[0] = row[Wo + 1] = T(0);
    if (pre_b1) {
      pre[0] = pre[Wo + 1] = T(0);
      pre += 1;
    }
    dw_row<S>(xbuf + S * k * XW, XW, t.wb + 9 * c, bb, Wo, pre);
    act_row<ACT>(pre, row + 1, Wo);
  }
  for (int64_t i = 0; i < R; ++i) {
    T* pre = pre_b ? pre_b + c * P + i * Wo : tmp;
    dw_row<1>(b1p + i * BW, BW, t.wc + 9 * c, bc, Wo, pre);
    act_row<ACT>(pre, brow + i * Wo, Wo);
  }
  if (pl.Cs) {
    T* xsrow = A + (d.C + c) * P;
    for (int64_t i = 0; i < R; ++i)
      memcpy(xsrow + i * Wo, tap<S>(xbuf + (S * (i + 1) + 1) * XW, 1, Wo), sizeof(T) * Wo);
  }
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

// Pointwise part of the forward for one tile: Y (tile of y) = Wpacked . A, in y's layout.
template <typename T>
void tile_pointwise(const Runtime& rt, const BlockDesc& d, const Plan& pl, const T* wp,
                    const T* A, int64_t P, T* ytile, int64_t ldy) {
  const int64_t N = d.N, C = d.C;
  // NCHW: y tile is Cout x P (row stride ldy = Ho*Wo): Y = W A.
  // NHWC: y tile is P x Cout (row stride Cout):        Y = A^T W^T.
  auto mm = [&](const T* w, int64_t ldw, int64_t K, const T* a, T* out) {
    if (d.channels_last)
      gemm_rm<T>(rt, 'T', 'T', P, N, K, T(1), a, P, w, ldw, T(0), out, ldy);
    else
      gemm_rm<T>(rt, 'N', 'N', N, P, K, T(1), w, ldw, a, P, T(0), out, ldy);
  };
  if (d.merge == kAdd) {
    mm(wp, pl.Ktot, pl.Ktot, A, ytile);
  } else {
    const int64_t K = C + pl.Cs;
    const int64_t half = d.channels_last ? N : N * ldy;
    mm(wp, K, K, A, ytile);
    mm(wp + N * K, K, K, A + C * P, ytile + half);
  }
}

// Epilogue of a tile: z = (pointwise/projection sum) + output bias (+ identity residual,
// x having y's shape and layout then); y = act(z), pre = z if asked. The sum is read at
// src[p * sp + co * sc]: the tile of y itself (planar path, in place) or a pixel-major
// buffer (pixel-major path).
template <typename T, int ACT>
void epilogue(const BlockDesc& d, const T* src, int64_t sp, int64_t sc, T* ytile,
              const T* xres, T* ptile, const T* bias, int64_t P) {
  const int64_t HoWo = d.Ho * d.Wo, Cout = d.Cout;
  // y's own strides for pixel p, channel co
  const int64_t yp = d.channels_last ? Cout : 1, yc = d.channels_last ? 1 : HoWo;
  auto one = [&](int64_t p, int64_t co) {
    T z = src[p * sp + co * sc] + bias[co];
    const int64_t o = p * yp + co * yc;
    if (xres) z += xres[o];
    if (ptile) ptile[o] = z;
    ytile[o] = act_f<ACT>(z);
  };
  if (d.channels_last && sp == Cout && sc == 1) {  // everything P x Cout: channel vectors
    typedef typename Vec<T>::type V;
    constexpr int VN = Vec<T>::n;
    for (int64_t p = 0; p < P; ++p) {
      const T* sr = src + p * Cout;
      T* yr = ytile + p * Cout;
      const T* xr = xres ? xres + p * Cout : nullptr;
      T* pr = ptile ? ptile + p * Cout : nullptr;
      int64_t co = 0;
      for (; co + VN <= Cout; co += VN) {
        V z = vload(sr + co) + vload(bias + co);
        if (xr) z += vload(xr + co);
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
template <typename T, int ACT>
void tile_gz(const BlockDesc& d, const T* gy, const T* saved, int64_t off, int64_t P, T* G,
             T* dbias, T* dx, bool identity) {
  const int64_t HoWo = d.Ho * d.Wo, Cout = d.Cout;
  if (d.channels_last) {
    for (int64_t p = 0; p < P; ++p) {
      const T* gr = gy + off + p * Cout;
      const T* sr = ACT == kActNone ? nullptr : saved + off + p * Cout;
      T* o = G + p * Cout;
      act_grad<ACT>(gr, sr, sr, o, Cout);
      for (int64_t co = 0; co < Cout; ++co) dbias[co] += o[co];
      if (identity) memcpy(dx + off + p * Cout, o, sizeof(T) * Cout);
    }
  } else {
    for (int64_t co = 0; co < Cout; ++co) {
      const T* gr = gy + off + co * HoWo;
      const T* sr = ACT == kActNone ? nullptr : saved + off + co * HoWo;
      T* o = G + co * P;
      act_grad<ACT>(gr, sr, sr, o, P);
      T s = T(0);
      for (int64_t p = 0; p < P; ++p) s += o[p];
      dbias[co] += s;
      if (identity) memcpy(dx + off + co * HoWo, o, sizeof(T) * P);
    }
  }
}

template <typename T, int S, int ACT>
void forward_pm(const Runtime& rt, const BlockDesc& d, const Plan& pl, const BlockTensors<T>& t,
                const T* wp, const T* bias, T* y, T* pre_out);

template <typename T, int S, int ACT>
void forward_impl(const Runtime& rt, const BlockDesc& d, const BlockTensors<T>& t, T* y,
                  T* pre_out) {
  const Plan pl = make_plan(d);
  const int64_t HoWo = d.Ho * d.Wo;
  const int64_t wp_elems = d.merge == kAdd ? d.N * pl.Ktot : 2 * d.N * (d.C + pl.Cs);
  Buf<T> wp(wp_elems), bias(d.Cout);
  pack_weights(d, pl, t, wp.p, bias.p);
  if (pl.pixel_major) return forward_pm<T, S, ACT>(rt, d, pl, t, wp.p, bias.p, y, pre_out);
  const bool identity = d.residual && !d.projection;
  auto task = [&](int64_t chunk) {
    const int64_t t0 = chunk * pl.ntiles / pl.nchunks, t1 = (chunk + 1) * pl.ntiles / pl.nchunks;
    const int64_t Pmax = pl.R * d.Wo;
    Buf<T> A(pl.Ktot * Pmax), xbuf((S * (pl.R + 1) + 3) * xrow_width<S>(d)),
        b1p((pl.R + 2) * (d.Wo + 2)), tmp(d.Wo + 2);
    for (int64_t tile = t0; tile < t1; ++tile) {
      const TileGeom g = tile_geom(d, pl, tile);
      for (int64_t c = 0; c < d.C; ++c)
        tile_channel<T, S, ACT>(d, pl, t, g, c, xbuf.p, A.p, b1p.p, nullptr, nullptr, nullptr,
                                tmp.p);
      const int64_t off = d.channels_last ? (g.bi * HoWo + g.r0 * d.Wo) * d.Cout
                                          : g.bi * d.Cout * HoWo + g.r0 * d.Wo;
      const int64_t ldy = d.channels_last ? d.Cout : HoWo;
      T* ytile = y + off;
      tile_pointwise(rt, d, pl, wp.p, A.p, g.P, ytile, ldy);
      epilogue<T, ACT>(d, ytile, d.channels_last ? d.Cout : 1, d.channels_last ? 1 : HoWo, ytile,
                       identity ? t.x + off : nullptr, pre_out ? pre_out + off : nullptr,
                       bias.p, g.P);
    }
  };
  par_for(rt, pl.nchunks, task);
}

// ---- backward ---------------------------------------------------------------------------

// Partial gradients of one chunk: [pointwise packed (npw) | out bias (Cout) | dwa dwb dwc
// (9C each) | dba dbb dbc (C each)].
struct PartLayout {
  int64_t pw, bo, wa, wb, wc, ba, bb, bc;
  PartLayout(const BlockDesc& d, const Plan& pl) {
    pw = 0; bo = pl.npw; wa = bo + d.Cout; wb = wa + 9 * d.C; wc = wb + 9 * d.C;
    ba = wc + 9 * d.C; bb = ba + d.C; bc = bb + d.C;
  }
};

// sum_w g[w] * src[w]
template <typename T>
inline T dot_row(const T* g, const T* src, int64_t n) {
  T s = T(0);
  for (int64_t w = 0; w < n; ++w) s += g[w] * src[w];
  return s;
}

template <typename T>
inline T sum_row(const T* g, int64_t n) {
  T s = T(0);
  for (int64_t w = 0; w < n; ++w) s += g[w];
  return s;
}

template <typename T, int S, int ACT>
void backward_pass1(const Runtime& rt, const BlockDesc& d, const Plan& pl,
                    const BlockTensors<T>& t, const T* gy, const T* saved, const T* wp,
                    T* dx, T* SA, T* SB, T* parts) {
  const int64_t HoWo = d.Ho * d.Wo, C = d.C, N = d.N, Wo = d.Wo, Cout = d.Cout;
  const int64_t XW = xrow_width<S>(d), BW = Wo + 2;
  const PartLayout L(d, pl);
  const bool identity = d.residual && !d.projection;
  const bool silu = ACT == kActSilu;
  auto task = [&](int64_t chunk) {
    const int64_t t0 = chunk * pl.ntiles / pl.nchunks, t1 = (chunk + 1) * pl.ntiles / pl.nchunks;
    const int64_t Pmax = pl.R * Wo;
    T* part = parts + chunk * pl.part;
    memset(part, 0, sizeof(T) * pl.part);
    Buf<T> A(pl.Ktot * Pmax), dA(pl.Ktot * Pmax), G(Cout * Pmax),
        xbuf((S * (pl.R + 1) + 3) * XW), b1p(C * (pl.R + 2) * BW), tmp(Wo + 2),
        preA(silu ? pl.Ktot * Pmax : 1);
    for (int64_t tile = t0; tile < t1; ++tile) {
      const TileGeom g = tile_geom(d, pl, tile);
      const int64_t P = g.P;
      const int64_t off = d.channels_last ? (g.bi * HoWo + g.r0 * Wo) * Cout
                                          : g.bi * Cout * HoWo + g.r0 * Wo;
      // gz = gy * act'(z), in G: Cout x P (NCHW) or P x Cout (NHWC); bias and identity grads
      const int64_t ldg = d.channels_last ? Cout : P;
      tile_gz<T, ACT>(d, gy, saved, off, P, G.p, part + L.bo, dx, identity);
      // recompute the branches
      for (int64_t c = 0; c < C; ++c)
        tile_channel<T, S, ACT>(d, pl, t, g, c, xbuf.p, A.p, b1p.p + c * (g.R + 2) * BW,
                                silu ? preA.p : nullptr,
                                silu ? preA.p + (pl.Ktot - C) * P : nullptr, nullptr, tmp.p);
      // pointwise weight gradients and dA = W^T gz
      const char tg = d.channels_last ? 'T' : 'N';  // op(G) = gz rows (N x P)
      auto grows = [&](int64_t n0) { return d.channels_last ? G.p + n0 : G.p + n0 * P; };
      if (d.merge == kAdd) {
        gemm_rm<T>(rt, tg, 'T', N, pl.Ktot, P, T(1), grows(0), ldg, A.p, P, T(1),
                   part + L.pw, pl.Ktot);
        gemm_rm<T>(rt, 'T', tg, pl.Ktot, P, N, T(1), wp, pl.Ktot, grows(0), ldg, T(0), dA.p, P);
      } else {
        const int64_t K = C + pl.Cs;
        gemm_rm<T>(rt, tg, 'T', N, K, P, T(1), grows(0), ldg, A.p, P, T(1), part + L.pw, K);
        gemm_rm<T>(rt, tg, 'T', N, K, P, T(1), grows(N), ldg, A.p + C * P, P, T(1),
                   part + L.pw + N * K, K);
        gemm_rm<T>(rt, 'T', tg, K, P, N, T(1), wp, K, grows(0), ldg, T(0), dA.p, P);
        if (pl.Cs) memset(dA.p + K * P, 0, sizeof(T) * C * P);
        gemm_rm<T>(rt, 'T', tg, K, P, N, T(1), wp + N * K, K, grows(N), ldg,
                   pl.Cs ? T(1) : T(0), dA.p + C * P, P);
      }
      // per channel: through the branch activations, depthwise weight grads, scratch
      for (int64_t c = 0; c < C; ++c) {
        T* da = dA.p + c * P;
        T* db = dA.p + (pl.Ktot - C + c) * P;
        const T* a = A.p + c * P;
        const T* b = A.p + (pl.Ktot - C + c) * P;
        const T* pa = silu ? preA.p + c * P : a;
        const T* pb = silu ? preA.p + (pl.Ktot - C + c) * P : b;
        act_grad<ACT>(da, a, pa, da, P);
        act_grad<ACT>(db, b, pb, db, P);
        T* sa = SA + (g.bi * C + c) * HoWo + g.r0 * Wo;
        T* sb = SB + (g.bi * C + c) * HoWo + g.r0 * Wo;
        memcpy(sa, da, sizeof(T) * P);
        memcpy(sb, db, sizeof(T) * P);
        // dwa, dba: x rows again (cheap), dwc, dbc: from the b1 band
        load_x_rows<S>(d, t.x, g.bi, c, S * (g.r0 - 1) - 1, S * (g.R + 1) + 3, xbuf.p);
        const T* b1 = b1p.p + c * (g.R + 2) * BW;
        for (int ti = 0; ti < 3; ++ti)
          for (int tj = 0; tj < 3; ++tj) {
            T sa_ = T(0), sc_ = T(0);
            for (int64_t i = 0; i < g.R; ++i) {
              sa_ += dot_row(da + i * Wo, tap<S>(xbuf.p + (S * (i + 1) + ti) * XW, tj, Wo), Wo);
              sc_ += dot_row(db + i * Wo, b1 + (i + ti) * BW + tj, Wo);
            }
            part[L.wa + 9 * c + ti * 3 + tj] += sa_;
            part[L.wc + 9 * c + ti * 3 + tj] += sc_;
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

template <typename T, int S, int ACT>
void backward_pass2(const Runtime& rt, const BlockDesc& d, const Plan& pl,
                    const BlockTensors<T>& t, T* dx, const T* SA, const T* SB, T* parts) {
  const int64_t HoWo = d.Ho * d.Wo, C = d.C, Wo = d.Wo, Ho = d.Ho, W = d.W;
  const int64_t XW = xrow_width<S>(d);
  const PartLayout L(d, pl);
  // dx rows use padded scatter rows: stride 1 a zero-padded row (W + 2), stride 2 the
  // even/odd split of the input buffer (same indexing as tap<2>).
  const int64_t DXW = xrow_width<S>(d);
  auto task = [&](int64_t chunk) {
    const int64_t t0 = chunk * pl.ntiles / pl.nchunks, t1 = (chunk + 1) * pl.ntiles / pl.nchunks;
    T* part = parts + chunk * pl.part;
    const int64_t RR = pl.R + 2;
    Buf<T> xbuf((S * (pl.R + 1) + 3) * XW), d1(RR * Wo), b1post(Wo + 2), b1pre(Wo + 2),
        dxrow(DXW), tmp(Wo + 2);
    for (int64_t tile = t0; tile < t1; ++tile) {
      const TileGeom g = tile_geom(d, pl, tile);
      const int64_t q_lo = g.r0 - 1;  // d1 row k holds b1 row q_lo + k
      const int64_t hs = S * g.r0, he = S * (g.r0 + g.R) < d.H ? S * (g.r0 + g.R) : d.H;
      for (int64_t c = 0; c < C; ++c) {
        const T* sa = SA + (g.bi * C + c) * HoWo;
        const T* sb = SB + (g.bi * C + c) * HoWo;
        const T* wa = t.wa + 9 * c;
        const T* wb = t.wb + 9 * c;
        const T* wc = t.wc + 9 * c;
        const T bb = t.bb ? t.bb[c] : T(0);
        const int64_t hb = S * (g.r0 - 1) - 1;
        load_x_rows<S>(d, t.x, g.bi, c, hb, S * (g.R + 1) + 3, xbuf.p);
        // db1_pre for b1 rows q in [r0 - 1, r0 + R]: transposed depthwise of db with wc,
        // times act'(b1) recomputed from x. Rows outside the image are zero.
        for (int64_t k = 0; k < g.R + 2; ++k) {
          const int64_t q = q_lo + k;
          T* row = d1.p + k * Wo;
          if (q < 0 || q >= Ho) {
            memset(row, 0, sizeof(T) * Wo);
            continue;
          }
          for (int64_t w = 0; w < Wo; ++w) row[w] = T(0);
          for (int ti = 0; ti < 3; ++ti) {
            const int64_t r = q + 1 - ti;  // b row fed by b1 row q through tap row ti
            if (r < 0 || r >= Ho) continue;
            const T* src = sb + r * Wo;
            for (int tj = 0; tj < 3; ++tj) {
              const T wt = wc[ti * 3 + tj];
              // row[w'] += wt * db[r][w' + 1 - tj] for 0 <= w' + 1 - tj < Wo
              const int64_t lo = tj - 1 > 0 ? tj - 1 : 0;
              const int64_t hi = Wo + tj - 1 < Wo ? Wo + tj - 1 : Wo;
              for (int64_t w = lo; w < hi; ++w) row[w] += wt * src[w + 1 - tj];
            }
          }
          dw_row<S>(xbuf.p + S * k * XW, XW, wb, bb, Wo, b1pre.p);
          act_row<ACT>(b1pre.p, b1post.p, Wo);
          act_grad<ACT>(row, b1post.p, b1pre.p, row, Wo);
        }
        // dwb, dbb over the rows this tile owns (k = 1 .. R)
        for (int ti = 0; ti < 3; ++ti)
          for (int tj = 0; tj < 3; ++tj) {
            T s = T(0);
            for (int64_t k = 1; k <= g.R; ++k)
              s += dot_row(d1.p + k * Wo, tap<S>(xbuf.p + (S * k + ti) * XW, tj, Wo), Wo);
            part[L.wb + 9 * c + ti * 3 + tj] += s;
          }
        {
          T s = T(0);
          for (int64_t k = 1; k <= g.R; ++k) s += sum_row(d1.p + k * Wo, Wo);
          part[L.bb + c] += s;
        }
        // dx rows [hs, he): input row h gets tap row ti from output row q = (h + 1 - ti) / S
        for (int64_t h = hs; h < he; ++h) {
          for (int64_t i = 0; i < DXW; ++i) dxrow.p[i] = T(0);
          for (int ti = 0; ti < 3; ++ti) {
            const int64_t num = h + 1 - ti;
            if (num < 0 || num % S) continue;
            const int64_t q = num / S;
            if (q >= Ho) continue;
            const T* ga = sa + q * Wo;
            const T* gb = d1.p + (q - q_lo) * Wo;
            for (int tj = 0; tj < 3; ++tj) {
              const T wat = wa[ti * 3 + tj], wbt = wb[ti * 3 + tj];
              T* dst = const_cast<T*>(tap<S>(dxrow.p, tj, Wo));
              for (int64_t w = 0; w < Wo; ++w) dst[w] += wat * ga[w] + wbt * gb[w];
            }
          }
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


// ---- pixel-major path ("channels inner"), used when C >= kPixelMajorMinC -----------------
// The same algorithm with every buffer laid out [pixel][channel]: the depthwise loops run
// over contiguous channel vectors (register-blocked), which is what narrow images (14x14,
// 28x28) with many channels need; the planar path above vectorises along rows and suits
// few channels. The packed matrix is A (P x Ktot), row p = [a | xs | b]. Every GEMM here
// is a plain row-major C = A B (Runtime::sbrgemm: oneDNN's JIT micro-kernel for float).
// Depthwise weights are read tap-major (wt[tap * C + c]); their gradients accumulate
// tap-major too. Tile scratch is thread-local and reused across calls (no page faults).

template <typename T>
T* tls_buf(int slot, int64_t n) {
  // Per-thread scratch, grown on demand and kept for the thread's lifetime (bounded by the
  // largest tile seen), so the hot path never allocates.
  static thread_local void* ptr[16] = {nullptr};
  static thread_local int64_t cap[16] = {0};
  const int64_t bytes = sizeof(T) * (n > 0 ? n : 1);
  if (cap[slot] < bytes) {
    free(ptr[slot]);
    ptr[slot] = malloc(bytes);
    if (!ptr[slot]) abort();
    cap[slot] = bytes;
  }
  return static_cast<T*>(ptr[slot]);
}

template <typename T>
inline void mm_nn(const Runtime& rt, int64_t M, int64_t N, int64_t K, const T* a, int64_t lda,
                  const T* b, int64_t ldb, T* c, int64_t ldc, bool add);
template <>
inline void mm_nn<float>(const Runtime& rt, int64_t M, int64_t N, int64_t K, const float* a,
                         int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                         bool add) {
  if (M > 0 && N > 0) rt.sbrgemm(M, N, K, lda, ldb, ldc, add, a, b, c);
}
template <>
inline void mm_nn<double>(const Runtime& rt, int64_t M, int64_t N, int64_t K, const double* a,
                          int64_t lda, const double* b, int64_t ldb, double* c, int64_t ldc,
                          bool add) {
  gemm_rm<double>(rt, 'N', 'N', M, N, K, 1.0, a, lda, b, ldb, add ? 1.0 : 0.0, c, ldc);
}

// xb[(k * (W + 2) + w + 1) * C + c] = x[bi, c, hb + k, w] (zero outside the image).
template <typename T>
void load_x_band_pm(const BlockDesc& d, const T* x, int64_t bi, int64_t hb, int64_t nrows,
                    T* xb) {
  const int64_t C = d.C, W = d.W, RW = (W + 2) * C;
  for (int64_t k = 0; k < nrows; ++k) {
    const int64_t h = hb + k;
    T* row = xb + k * RW;
    if (h < 0 || h >= d.H) {
      memset(row, 0, sizeof(T) * RW);
      continue;
    }
    memset(row, 0, sizeof(T) * C);
    memset(row + (W + 1) * C, 0, sizeof(T) * C);
    if (d.channels_last) {
      memcpy(row + C, x + ((bi * d.H + h) * W) * C, sizeof(T) * W * C);
    } else {
      for (int64_t c = 0; c < C; ++c) {
        const T* src = x + ((bi * C + c) * d.H + h) * W;
        for (int64_t w = 0; w < W; ++w) row[(w + 1) * C + c] = src[w];
      }
    }
  }
}

// One input row of a 3x3 depthwise conv feeding four neighbouring output pixels: pixel k
// takes tap column tj from input column S * k + tj at r + column * C. Each input vector is
// loaded once and used by every sum it feeds, in tap order (tj = 0, 1, 2) for each sum.
template <int S, typename V, typename T>
inline void dw_taps4(const T* r, int64_t C, V k0, V k1, V k2, V& a0, V& a1, V& a2, V& a3) {
  V x;
  if (S == 1) {
    x = vload(r);         a0 += k0 * x;
    x = vload(r + C);     a0 += k1 * x; a1 += k0 * x;
    x = vload(r + 2 * C); a0 += k2 * x; a1 += k1 * x; a2 += k0 * x;
    x = vload(r + 3 * C); a1 += k2 * x; a2 += k1 * x; a3 += k0 * x;
    x = vload(r + 4 * C); a2 += k2 * x; a3 += k1 * x;
    x = vload(r + 5 * C); a3 += k2 * x;
  } else {
    x = vload(r);         a0 += k0 * x;
    x = vload(r + C);     a0 += k1 * x;
    x = vload(r + 2 * C); a0 += k2 * x; a1 += k0 * x;
    x = vload(r + 3 * C); a1 += k1 * x;
    x = vload(r + 4 * C); a1 += k2 * x; a2 += k0 * x;
    x = vload(r + 5 * C); a2 += k1 * x;
    x = vload(r + 6 * C); a2 += k2 * x; a3 += k0 * x;
    x = vload(r + 7 * C); a3 += k1 * x;
    x = vload(r + 8 * C); a3 += k2 * x;
  }
}

// One output row of a 3x3 depthwise conv over all channels, pixel-major: output column w
// takes tap (ti, tj) from in[ti * rs + (S * w + tj) * C + c]; post[w * ps + c] = act(z) and,
// when pre is given, pre[w * ps + c] = z, z = bias + the nine taps in row-major tap order.
// Register blocks of 4 pixels x one vector of channels keep the nine weights and four sums
// in registers, so an input vector loaded once serves up to three sums (one per pixel in
// the per-pixel form, with a weight load beside every input load).
// When init is given, sums start from init[w * ps + c] instead of the bias (init may be post).
template <int S, int ACT, typename T>
void dw_row_pm(const T* in, int64_t rs, int64_t C, int64_t Wo, const T* wt, const T* bias,
               T* post, T* pre, int64_t ps, const T* init = nullptr) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  int64_t c0 = 0;
  for (; c0 + VN <= C; c0 += VN) {
    const V w0 = vload(wt + c0), w1 = vload(wt + C + c0), w2 = vload(wt + 2 * C + c0);
    const V w3 = vload(wt + 3 * C + c0), w4 = vload(wt + 4 * C + c0), w5 = vload(wt + 5 * C + c0);
    const V w6 = vload(wt + 6 * C + c0), w7 = vload(wt + 7 * C + c0), w8 = vload(wt + 8 * C + c0);
    const V bv = bias ? vload(bias + c0) : V{};
    const T* ic = in + c0;
    int64_t w = 0;
    for (; w + 4 <= Wo; w += 4) {
      V a0 = bv, a1 = bv, a2 = bv, a3 = bv;
      if (init) {
        const T* ip = init + w * ps + c0;
        a0 = vload(ip);
        a1 = vload(ip + ps);
        a2 = vload(ip + 2 * ps);
        a3 = vload(ip + 3 * ps);
      }
      const T* r = ic + S * w * C;
      dw_taps4<S>(r, C, w0, w1, w2, a0, a1, a2, a3);
      dw_taps4<S>(r + rs, C, w3, w4, w5, a0, a1, a2, a3);
      dw_taps4<S>(r + 2 * rs, C, w6, w7, w8, a0, a1, a2, a3);
      T* po = post + w * ps + c0;
      T* pr = pre ? pre + w * ps + c0 : nullptr;
      dw_store<ACT>(a0, po, pr);
      dw_store<ACT>(a1, po + ps, pr ? pr + ps : nullptr);
      dw_store<ACT>(a2, po + 2 * ps, pr ? pr + 2 * ps : nullptr);
      dw_store<ACT>(a3, po + 3 * ps, pr ? pr + 3 * ps : nullptr);
    }
    for (; w < Wo; ++w) {
      const T* r = ic + S * w * C;
      V a = init ? vload(init + w * ps + c0) : bv;
      a += w0 * vload(r);
      a += w1 * vload(r + C);
      a += w2 * vload(r + 2 * C);
      a += w3 * vload(r + rs);
      a += w4 * vload(r + rs + C);
      a += w5 * vload(r + rs + 2 * C);
      a += w6 * vload(r + 2 * rs);
      a += w7 * vload(r + 2 * rs + C);
      a += w8 * vload(r + 2 * rs + 2 * C);
      dw_store<ACT>(a, post + w * ps + c0, pre ? pre + w * ps + c0 : nullptr);
    }
  }
  for (; c0 < C; ++c0)
    for (int64_t w = 0; w < Wo; ++w) {
      const T* p0 = in + S * w * C + c0;
      T acc = init ? init[w * ps + c0] : (bias ? bias[c0] : T(0));
      for (int ti = 0; ti < 3; ++ti)
        for (int tj = 0; tj < 3; ++tj) acc += wt[(ti * 3 + tj) * C + c0] * p0[ti * rs + tj * C];
      if (pre) pre[w * ps + c0] = acc;
      post[w * ps + c0] = act_f<ACT>(acc);
    }
}

// Depthwise weights tap-major: wt[(k * 9 + tap) * C + c] for k = a, b, c.
template <typename T>
void pack_dw_tapmajor(const BlockDesc& d, const BlockTensors<T>& t, T* wt) {
  const int64_t C = d.C;
  const T* ws[3] = {t.wa, t.wb, t.wc};
  for (int k = 0; k < 3; ++k)
    for (int tap = 0; tap < 9; ++tap)
      for (int64_t c = 0; c < C; ++c) wt[(k * 9 + tap) * C + c] = ws[k][c * 9 + tap];
}

// dst (K x N) = src (N x K)^T, both row-major; 16 x 16 blocks keep both sides in cache.
template <typename T>
void transpose(const T* src, int64_t n, int64_t k, T* dst) {
  for (int64_t i0 = 0; i0 < n; i0 += 16)
    for (int64_t j0 = 0; j0 < k; j0 += 16) {
      const int64_t i1 = i0 + 16 < n ? i0 + 16 : n, j1 = j0 + 16 < k ? j0 + 16 : k;
      for (int64_t i = i0; i < i1; ++i)
        for (int64_t j = j0; j < j1; ++j) dst[j * n + i] = src[i * k + j];
    }
}

// The depthwise part of one tile, pixel-major: the b1 band (R + 2 rows, zero-padded
// columns), then rows of A. pre_ab (silu backward) gets pre-activations in A's layout.
template <typename T, int S, int ACT>
void tile_dw_pm(const BlockDesc& d, const Plan& pl, const BlockTensors<T>& t, const T* wt,
                const TileGeom& g, const T* xb, T* b1b, T* A, T* pre_ab) {
  const int64_t C = d.C, Wo = d.Wo, XR = (d.W + 2) * C, BR = (Wo + 2) * C, K = pl.Ktot;
  const T* wat = wt;
  const T* wbt = wt + 9 * C;
  const T* wct = wt + 18 * C;
  for (int64_t k = 0; k < g.R + 2; ++k) {
    const int64_t q = g.r0 - 1 + k;
    T* brow = b1b + k * BR;
    if (q < 0 || q >= d.Ho) {
      memset(brow, 0, sizeof(T) * BR);
      continue;
    }
    memset(brow, 0, sizeof(T) * C);
    memset(brow + (Wo + 1) * C, 0, sizeof(T) * C);
    dw_row_pm<S, ACT>(xb + S * k * XR, XR, C, Wo, wbt, t.bb, brow + C, (T*)nullptr, C);
  }
  for (int64_t i = 0; i < g.R; ++i) {
    T* arow = A + i * Wo * K;
    T* prow = pre_ab ? pre_ab + i * Wo * K : nullptr;
    dw_row_pm<S, ACT>(xb + S * (i + 1) * XR, XR, C, Wo, wat, t.ba, arow, prow, K);
    if (pl.Cs)
      for (int64_t w = 0; w < Wo; ++w)
        memcpy(arow + w * K + C, xb + (S * (i + 1) + 1) * XR + (S * w + 1) * C, sizeof(T) * C);
    dw_row_pm<1, ACT>(b1b + i * BR, BR, C, Wo, wct, t.bc, arow + K - C,
                      prow ? prow + K - C : nullptr, K);
  }
}

// Ybuf (P x Cout) = A W^T, with W^T packed (K x N) per half.
template <typename T>
void tile_pointwise_pm(const Runtime& rt, const BlockDesc& d, const Plan& pl, const T* wT,
                       const T* A, int64_t P, T* ybuf) {
  const int64_t N = d.N, C = d.C, K = pl.Ktot, Cout = d.Cout;
  if (d.merge == kAdd) {
    mm_nn<T>(rt, P, N, K, A, K, wT, N, ybuf, Cout, false);
  } else {
    const int64_t kk = C + pl.Cs;
    mm_nn<T>(rt, P, N, kk, A, K, wT, N, ybuf, Cout, false);
    mm_nn<T>(rt, P, N, kk, A + C, K, wT + kk * N, N, ybuf + N, Cout, false);
  }
}

// Transposed packed pointwise weights for the forward: add [Pa | Ws | Pb]^T (Ktot x N);
// concat W1^T then W2^T (each (C + Cs) x N).
template <typename T>
void pack_weights_T(const BlockDesc& d, const Plan& pl, const T* wp, T* wT) {
  if (d.merge == kAdd) {
    transpose(wp, d.N, pl.Ktot, wT);
  } else {
    const int64_t kk = d.C + pl.Cs;
    transpose(wp, d.N, kk, wT);
    transpose(wp + d.N * kk, d.N, kk, wT + kk * d.N);
  }
}

template <typename T, int S, int ACT>
void forward_pm(const Runtime& rt, const BlockDesc& d, const Plan& pl, const BlockTensors<T>& t,
                const T* wp, const T* bias, T* y, T* pre_out) {
  const int64_t HoWo = d.Ho * d.Wo, C = d.C;
  const int64_t wp_elems = d.merge == kAdd ? d.N * pl.Ktot : 2 * d.N * (d.C + pl.Cs);
  Buf<T> wt(27 * C), wT(wp_elems);
  pack_dw_tapmajor(d, t, wt.p);
  pack_weights_T(d, pl, wp, wT.p);
  const bool identity = d.residual && !d.projection;
  auto task = [&](int64_t tile) {
    const int64_t Pmax = pl.R * d.Wo;
    T* A = tls_buf<T>(0, pl.Ktot * Pmax);
    T* xb = tls_buf<T>(1, (S * (pl.R + 1) + 3) * (d.W + 2) * C);
    T* b1b = tls_buf<T>(2, (pl.R + 2) * (d.Wo + 2) * C);
    T* ybuf = tls_buf<T>(3, Pmax * d.Cout);
    const TileGeom g = tile_geom(d, pl, tile);
    load_x_band_pm(d, t.x, g.bi, S * (g.r0 - 1) - 1, S * (g.R + 1) + 3, xb);
    tile_dw_pm<T, S, ACT>(d, pl, t, wt.p, g, xb, b1b, A, nullptr);
    tile_pointwise_pm(rt, d, pl, wT.p, A, g.P, ybuf);
    const int64_t off = d.channels_last ? (g.bi * HoWo + g.r0 * d.Wo) * d.Cout
                                        : g.bi * d.Cout * HoWo + g.r0 * d.Wo;
    epilogue<T, ACT>(d, ybuf, d.Cout, 1, y + off, identity ? t.x + off : nullptr,
                        pre_out ? pre_out + off : nullptr, bias, g.P);
  };
  par_for(rt, pl.ntiles, task);
  rt.brgemm_release();
}


// Depthwise weight/bias gradient of one tile, register-blocked: for each tap,
//   part[tap * C + c] += sum over the tile's pixels of g[p][c] * src_tap(p)[c],
//   bpart[c] += sum of g[p][c].
// Pixel (i, w) has g at g0 + i * grs + w * gs and tap (ti, tj) at
// x0 + i * xrs + w * xcs + ti * trs + tj * C. Blocks of VB channels keep nine tap sums in
// registers across all pixels, so every multiply-add costs one load.
template <typename T>
void dw_grad_tile(const T* g0, int64_t grs, int64_t gs, int64_t R, int64_t Wo, const T* x0, int64_t xrs,
                  int64_t xcs, int64_t trs, int64_t C, T* part, T* bpart) {
  typedef typename Vec<T>::type V;
  constexpr int VB = Vec<T>::n;
  int64_t c0 = 0;
  for (; c0 + VB <= C; c0 += VB) {
    V a0{}, a1{}, a2{}, a3{}, a4{}, a5{}, a6{}, a7{}, a8{}, ab{};
    for (int64_t i = 0; i < R; ++i)
      for (int64_t w = 0; w < Wo; ++w) {
        const V g = vload(g0 + i * grs + w * gs + c0);
        const T* xp = x0 + i * xrs + w * xcs + c0;
        ab += g;
        a0 += g * vload(xp);
        a1 += g * vload(xp + C);
        a2 += g * vload(xp + 2 * C);
        a3 += g * vload(xp + trs);
        a4 += g * vload(xp + trs + C);
        a5 += g * vload(xp + trs + 2 * C);
        a6 += g * vload(xp + 2 * trs);
        a7 += g * vload(xp + 2 * trs + C);
        a8 += g * vload(xp + 2 * trs + 2 * C);
      }
    const V acc[9] = {a0, a1, a2, a3, a4, a5, a6, a7, a8};
    for (int tap = 0; tap < 9; ++tap) vstore(part + tap * C + c0, vload(part + tap * C + c0) + acc[tap]);
    vstore(bpart + c0, vload(bpart + c0) + ab);
  }
  for (; c0 < C; ++c0) {
    T acc[9] = {};
    T accb = T(0);
    for (int64_t i = 0; i < R; ++i)
      for (int64_t w = 0; w < Wo; ++w) {
        const T gv = g0[i * grs + w * gs + c0];
        const T* xp = x0 + i * xrs + w * xcs + c0;
        accb += gv;
        for (int ti = 0; ti < 3; ++ti)
          for (int tj = 0; tj < 3; ++tj) acc[ti * 3 + tj] += gv * xp[ti * trs + tj * C];
      }
    for (int tap = 0; tap < 9; ++tap) part[tap * C + c0] += acc[tap];
    bpart[c0] += accb;
  }
}

// out[c] = sum_{i < n} w[i][c] * s[i][c], register-blocked over channels (n <= 18 taps).
template <typename T>
inline void tap_sum(int n, const T* const* w, const T* const* s, int64_t C, T* out) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  int64_t c0 = 0;
  for (; c0 + 2 * VN <= C; c0 += 2 * VN) {
    V a0{}, a1{};
    for (int i = 0; i < n; ++i) {
      a0 += vload(w[i] + c0) * vload(s[i] + c0);
      a1 += vload(w[i] + c0 + VN) * vload(s[i] + c0 + VN);
    }
    vstore(out + c0, a0);
    vstore(out + c0 + VN, a1);
  }
  for (; c0 < C; ++c0) {
    T acc = T(0);
    for (int i = 0; i < n; ++i) acc += w[i][c0] * s[i][c0];
    out[c0] = acc;
  }
}

// Pass 1, pixel-major. SA/SB are zero-padded [B][Ho + 2][Wo + 2][C] (pixel (r, w) at padded
// (r + 1, w + 1)): pass 2 then runs the transposed depthwise convs as plain 3x3 rows
// (dw_row_pm) with no border cases. Each tile writes its own rows' border columns, the top
// and bottom tiles the border rows. dw partials tap-major.
// Tiles [t0, t1) into the partial gradients `part`; image bi's padded scratch starts at
// SA + bi * istride (istride 0: one image's scratch, reused).
template <typename T, int S, int ACT>
void pass1_tiles_pm(const Runtime& rt, const BlockDesc& d, const Plan& pl,
                    const BlockTensors<T>& t, const T* wt, const T* gy, const T* saved,
                    const T* wp, T* dx, T* SA, T* SB, int64_t istride, T* part, int64_t t0,
                    int64_t t1, T* b1img) {
  const int64_t HoWo = d.Ho * d.Wo, C = d.C, N = d.N, Wo = d.Wo, Cout = d.Cout, K = pl.Ktot;
  const int64_t XR = (d.W + 2) * C, BR = (Wo + 2) * C;
  const PartLayout L(d, pl);
  const bool identity = d.residual && !d.projection;
  const bool silu = ACT == kActSilu;
  {
    const int64_t Pmax = pl.R * Wo;
    T* A = tls_buf<T>(0, K * Pmax);
    T* xb = tls_buf<T>(1, (S * (pl.R + 1) + 3) * XR);
    T* b1b = tls_buf<T>(2, (pl.R + 2) * BR);
    T* dA = tls_buf<T>(3, K * Pmax);
    T* G = tls_buf<T>(4, Cout * Pmax);    // planar (Cout x P)
    T* Gpm = tls_buf<T>(5, Cout * Pmax);  // pixel-major (P x Cout)
    T* preAB = silu ? tls_buf<T>(6, K * Pmax) : nullptr;
    for (int64_t tile = t0; tile < t1; ++tile) {
      const TileGeom g = tile_geom(d, pl, tile);
      const int64_t P = g.P;
      const int64_t off = d.channels_last ? (g.bi * HoWo + g.r0 * Wo) * Cout
                                          : g.bi * Cout * HoWo + g.r0 * Wo;
      T* SAi = SA + g.bi * istride;
      T* SBi = SB + g.bi * istride;
      // gz in both layouts: planar feeds dW = gz A, pixel-major feeds dA = gz^T W
      if (d.channels_last) {
        tile_gz<T, ACT>(d, gy, saved, off, P, Gpm, part + L.bo, dx, identity);
        transpose(Gpm, P, Cout, G);
      } else {
        tile_gz<T, ACT>(d, gy, saved, off, P, G, part + L.bo, dx, identity);
        transpose(G, Cout, P, Gpm);
      }
      load_x_band_pm(d, t.x, g.bi, S * (g.r0 - 1) - 1, S * (g.R + 1) + 3, xb);
      tile_dw_pm<T, S, ACT>(d, pl, t, wt, g, xb, b1b, A, preAB);
      if (b1img)  // keep the tile's own b1 rows for pass 2 (act'(b1) without recomputing)
        for (int64_t k = 1; k <= g.R; ++k)
          memcpy(b1img + (g.r0 + k - 1) * Wo * C, b1b + k * BR + C, sizeof(T) * Wo * C);
      if (d.merge == kAdd) {
        mm_nn<T>(rt, N, K, P, G, P, A, K, part + L.pw, K, true);
        mm_nn<T>(rt, P, K, N, Gpm, Cout, wp, K, dA, K, false);
      } else {
        const int64_t kk = C + pl.Cs;
        mm_nn<T>(rt, N, kk, P, G, P, A, K, part + L.pw, kk, true);
        mm_nn<T>(rt, N, kk, P, G + N * P, P, A + C, K, part + L.pw + N * kk, kk, true);
        mm_nn<T>(rt, P, kk, N, Gpm, Cout, wp, kk, dA, K, false);
        if (pl.Cs)
          for (int64_t p = 0; p < P; ++p) memset(dA + p * K + kk, 0, sizeof(T) * C);
        mm_nn<T>(rt, P, kk, N, Gpm + N, Cout, wp + N * kk, kk, dA + C, K, pl.Cs > 0);
      }
      for (int64_t i = 0; i < g.R; ++i)
        for (int64_t w = 0; w < Wo; ++w) {
          const int64_t p = i * Wo + w;
          T* da = dA + p * K;
          T* db = da + K - C;
          const T* a = A + p * K;
          const T* b = a + K - C;
          const T* pa = silu ? preAB + p * K : a;
          const T* pb = silu ? preAB + p * K + K - C : b;
          const int64_t spix = (g.r0 + i + 1) * (Wo + 2) + w + 1;
          act_grad<ACT>(da, a, pa, SAi + spix * C, C);
          act_grad<ACT>(db, b, pb, SBi + spix * C, C);
          if (pl.Cs) {  // projection: dx at (s r, s w), owned by this tile
            const T* dxs = da + C;
            const int64_t h = S * (g.r0 + i), wi = S * w;
            if (d.channels_last) {
              memcpy(dx + ((g.bi * d.H + h) * d.W + wi) * C, dxs, sizeof(T) * C);
            } else {
              T* o = dx + (g.bi * C * d.H + h) * d.W + wi;
              for (int64_t c = 0; c < C; ++c) o[c * d.H * d.W] = dxs[c];
            }
          }
        }
      // zero borders of the padded scratch that this tile owns
      const int64_t SR = (Wo + 2) * C;
      const int64_t srow0 = (g.r0 + 1) * SR;  // first row of the tile
      for (int64_t i = 0; i < g.R; ++i) {
        memset(SAi + srow0 + i * SR, 0, sizeof(T) * C);
        memset(SBi + srow0 + i * SR, 0, sizeof(T) * C);
        memset(SAi + srow0 + i * SR + (Wo + 1) * C, 0, sizeof(T) * C);
        memset(SBi + srow0 + i * SR + (Wo + 1) * C, 0, sizeof(T) * C);
      }
      if (g.r0 == 0) {
        memset(SAi + srow0 - SR, 0, sizeof(T) * SR);
        memset(SBi + srow0 - SR, 0, sizeof(T) * SR);
      }
      if (g.r0 + g.R == d.Ho) {
        memset(SAi + srow0 + g.R * SR, 0, sizeof(T) * SR);
        memset(SBi + srow0 + g.R * SR, 0, sizeof(T) * SR);
      }
      // depthwise weight grads (tap-major partials): dwa from x, dwc from the b1 band, with
      // the branch gradients read back from the scratch rows just written (still in cache)
      dw_grad_tile(SAi + srow0 + C, SR, C, g.R, Wo, xb + S * XR, S * XR, S * C, XR, C,
                   part + L.wa, part + L.ba);
      dw_grad_tile(SBi + srow0 + C, SR, C, g.R, Wo, b1b, BR, C, BR, C, part + L.wc, part + L.bc);
    }
  }
}

// Pass 2 of one tile at stride 1, where both transposed depthwise convs are 3x3 convs with
// the kernel rotated by 180 degrees (wtr) over the zero-padded scratch: db1 rows over the
// band plus one row each side, times act'(b1) recomputed from x, then dwb, dbb, and dx rows
// += conv(da, rot wa) + conv(db1, rot wb). sa, sb point at pixel (0, 0) of the image's
// padded scratch; d1 holds R + 2 zero-padded rows.
template <typename T, int ACT>
void pass2_tile_s1(const BlockDesc& d, const BlockTensors<T>& t, const T* wt, const T* wtr,
                   const TileGeom& g, const T* xb, const T* sa, const T* sb, T* d1, T* pre,
                   T* post, T* dx, T* part, const PartLayout& L, const T* b1img,
                   int64_t b1rs) {
  const int64_t C = d.C, Wo = d.Wo, Ho = d.Ho, XR = (d.W + 2) * C, SR = (Wo + 2) * C;
  const T* wbt = wt + 9 * C;
  for (int64_t k = 0; k < g.R + 2; ++k) {
    const int64_t q = g.r0 - 1 + k;
    T* row = d1 + k * SR;
    if (q < 0 || q >= Ho) {
      memset(row, 0, sizeof(T) * SR);
      continue;
    }
    memset(row, 0, sizeof(T) * C);
    memset(row + (Wo + 1) * C, 0, sizeof(T) * C);
    // db1 = conv(db, rot wc) over db rows q - 1 .. q + 1 (padded scratch rows q .. q + 2)
    dw_row_pm<1, kActNone>(sb + (q - 1) * SR - C, SR, C, Wo, wtr + 18 * C, (const T*)nullptr,
                           row + C, (T*)nullptr, C);
    if (ACT != kActNone) {
      const T* b1 = post;
      if (b1img)  // b1 row q as pass 1 computed it (relu, relu6)
        b1 = b1img + q * b1rs;
      else
        dw_row_pm<1, ACT>(xb + k * XR, XR, C, Wo, wbt, t.bb, post,
                          ACT == kActSilu ? pre : nullptr, C);
      act_grad<ACT>(row + C, b1, pre, row + C, Wo * C);
    }
  }
  dw_grad_tile(d1 + SR + C, SR, C, g.R, Wo, xb + XR, XR, C, XR, C, part + L.wb, part + L.bb);
  T* tmp = post;  // Wo x C
  for (int64_t i = 0; i < g.R; ++i) {
    const int64_t h = g.r0 + i;
    T* out = d.channels_last ? dx + ((g.bi * d.H + h) * d.W) * C : tmp;
    // dx row h: conv(da, rot wa) over rows h - 1 .. h + 1, then conv(db1, rot wb) on top
    dw_row_pm<1, kActNone>(sa + (h - 1) * SR - C, SR, C, Wo, wtr, (const T*)nullptr, tmp,
                           (T*)nullptr, C, d.channels_last ? (const T*)out : nullptr);
    dw_row_pm<1, kActNone>(d1 + i * SR, SR, C, Wo, wtr + 9 * C, (const T*)nullptr, out,
                           (T*)nullptr, C, (const T*)tmp);
    if (!d.channels_last) {
      T* o = dx + (g.bi * C * d.H + h) * d.W;
      const int64_t HW = d.H * d.W;
      for (int64_t c = 0; c < C; ++c)
        for (int64_t w = 0; w < Wo; ++w) o[c * HW + w] += tmp[w * C + c];
    }
  }
}

// Tiles [t0, t1), after pass 1 has run on them and on the tiles beside them (same scratch
// addressing as pass1_tiles_pm).
template <typename T, int S, int ACT>
void pass2_tiles_pm(const BlockDesc& d, const Plan& pl, const BlockTensors<T>& t, const T* wt,
                    const T* wtr, T* dx, const T* SA, const T* SB, int64_t istride, T* part,
                    int64_t t0, int64_t t1, const T* b1img, int64_t b1rs, const T* xband) {
  const int64_t C = d.C, Wo = d.Wo, Ho = d.Ho, W = d.W, XR = (W + 2) * C;
  const PartLayout L(d, pl);
  const T* wat = wt;
  const T* wbt = wt + 9 * C;
  const T* wct = wt + 18 * C;
  {
    T* xb = tls_buf<T>(8, (S * (pl.R + 1) + 3) * XR);
    T* d1 = tls_buf<T>(9, (pl.R + 2) * (Wo + 2) * C);
    T* pre = tls_buf<T>(10, Wo * C);
    T* post = tls_buf<T>(11, Wo * C);
    T* acc = tls_buf<T>(12, C);
    for (int64_t tile = t0; tile < t1; ++tile) {
      const TileGeom g = tile_geom(d, pl, tile);
      const int64_t q_lo = g.r0 - 1;
      if (xband)  // pass 1's band of this tile, still in its buffer (one band per image)
        xb = const_cast<T*>(xband);
      else
        load_x_band_pm(d, t.x, g.bi, S * (g.r0 - 1) - 1, S * (g.R + 1) + 3, xb);
      // padded scratch of image bi, pointing at pixel (0, 0)
      const T* sbi = SB + g.bi * istride + (Wo + 2) * C + C;
      const T* sai = SA + g.bi * istride + (Wo + 2) * C + C;
      if (S == 1) {
        pass2_tile_s1<T, ACT>(d, t, wt, wtr, g, xb, sai, sbi, d1, pre, post, dx, part, L, b1img,
                              b1rs);
        continue;
      }
      // db1_pre over b1 rows [r0 - 1, r0 + R]
      const T* tw[18];
      const T* ts[18];
      for (int64_t k = 0; k < g.R + 2; ++k) {
        const int64_t q = q_lo + k;
        // b1 (and its pre-activation for silu) recomputed for this row
        if (ACT != kActNone && q >= 0 && q < Ho)
          dw_row_pm<S, ACT>(xb + S * k * XR, XR, C, Wo, wbt, t.bb, post,
                            ACT == kActSilu ? pre : nullptr, C);
        for (int64_t w = 0; w < Wo; ++w) {
          T* o = d1 + (k * Wo + w) * C;
          if (q < 0 || q >= Ho) {
            memset(o, 0, sizeof(T) * C);
            continue;
          }
          int n = 0;
          for (int ti = 0; ti < 3; ++ti) {
            const int64_t r = q + 1 - ti;
            if (r < 0 || r >= Ho) continue;
            for (int tj = 0; tj < 3; ++tj) {
              const int64_t ws = w + 1 - tj;
              if (ws < 0 || ws >= Wo) continue;
              tw[n] = wct + (ti * 3 + tj) * C;
              ts[n++] = sbi + (r * (Wo + 2) + ws) * C;
            }
          }
          tap_sum(n, tw, ts, C, o);
          act_grad<ACT>(o, post + w * C, pre + w * C, o, C);
        }
      }
      // dwb, dbb over owned rows k = 1..R (tap-major)
      dw_grad_tile(d1 + Wo * C, Wo * C, C, g.R, Wo, xb + S * XR, S * XR, S * C, XR, C, part + L.wb,
                   part + L.bb);
      // dx rows [hs, he): gather from da (wa) and db1 (wb) at stride S
      const int64_t hs = S * g.r0, he = S * (g.r0 + g.R) < d.H ? S * (g.r0 + g.R) : d.H;
      for (int64_t h = hs; h < he; ++h)
        for (int64_t wi = 0; wi < W; ++wi) {
          int n = 0;
          for (int ti = 0; ti < 3; ++ti) {
            const int64_t num = h + 1 - ti;
            if (num < 0 || num % S) continue;
            const int64_t q = num / S;
            if (q >= Ho) continue;
            for (int tj = 0; tj < 3; ++tj) {
              const int64_t nw = wi + 1 - tj;
              if (nw < 0 || nw % S) continue;
              const int64_t w = nw / S;
              if (w >= Wo) continue;
              tw[n] = wat + (ti * 3 + tj) * C;
              ts[n++] = sai + (q * (Wo + 2) + w) * C;
              tw[n] = wbt + (ti * 3 + tj) * C;
              ts[n++] = d1 + ((q - q_lo) * Wo + w) * C;
            }
          }
          tap_sum(n, tw, ts, C, acc);
          if (d.channels_last) {
            T* o = dx + ((g.bi * d.H + h) * W + wi) * C;
            for (int64_t c = 0; c < C; ++c) o[c] += acc[c];
          } else {
            T* o = dx + (g.bi * C * d.H + h) * W + wi;
            for (int64_t c = 0; c < C; ++c) o[c * d.H * W] += acc[c];
          }
        }
    }
  }
}

// The pixel-major backward. Per-image plan (pl.per_image): a chunk is a run of whole images;
// for each image, pass 1 over its bands then pass 2, with the branch-gradient scratch one
// image large, thread-local and reused (cache-resident, never page-faulted). Otherwise two
// parallel passes over all tiles with the scratch for the whole batch (SA, SB).
template <typename T, int S, int ACT>
void backward_pm(const Runtime& rt, const BlockDesc& d, const Plan& pl, const BlockTensors<T>& t,
                 const T* wt, const T* wtr, const T* gy, const T* saved, const T* wp, T* dx,
                 T* SA, T* SB, T* parts) {
  const int64_t istride = d.C * (d.Ho + 2) * (d.Wo + 2);
  if (pl.per_image) {
    auto task = [&](int64_t chunk) {
      const int64_t i0 = chunk * d.B / pl.nchunks, i1 = (chunk + 1) * d.B / pl.nchunks;
      T* part = parts + chunk * pl.part;
      memset(part, 0, sizeof(T) * pl.part);
      T* sa = tls_buf<T>(14, istride);
      T* sb = tls_buf<T>(15, istride);
      // b1 of the image kept from pass 1 (stride 1, relu/relu6: act' reads the output only).
      // With one band per image, pass 1's own b1 band and x band buffers (tls slots 2 and 1)
      // still hold the image when pass 2 runs: read them in place, no copy, no reload.
      const bool keep_b1 = S == 1 && (ACT == kActRelu || ACT == kActRelu6);
      const bool one_band = pl.nbands == 1;
      const int64_t BR = (d.Wo + 2) * d.C;
      T* b1copy = keep_b1 && !one_band ? tls_buf<T>(13, d.Ho * d.Wo * d.C) : nullptr;
      const T* b1i = !keep_b1 ? nullptr
                     : one_band ? tls_buf<T>(2, (pl.R + 2) * BR) + BR + d.C : b1copy;
      const int64_t b1rs = one_band ? BR : d.Wo * d.C;
      const T* xband =
          one_band ? tls_buf<T>(1, (S * (pl.R + 1) + 3) * (d.W + 2) * d.C) : nullptr;
      for (int64_t img = i0; img < i1; ++img) {
        const int64_t t0 = img * pl.nbands, t1 = t0 + pl.nbands;
        pass1_tiles_pm<T, S, ACT>(rt, d, pl, t, wt, gy, saved, wp, dx, sa, sb, 0, part, t0, t1,
                                  b1copy);
        pass2_tiles_pm<T, S, ACT>(d, pl, t, wt, wtr, dx, sa, sb, 0, part, t0, t1, b1i, b1rs,
                                  xband);
      }
    };
    par_for(rt, pl.nchunks, task);
    rt.brgemm_release();
    return;
  }
  auto task1 = [&](int64_t chunk) {
    const int64_t t0 = chunk * pl.ntiles / pl.nchunks, t1 = (chunk + 1) * pl.ntiles / pl.nchunks;
    T* part = parts + chunk * pl.part;
    memset(part, 0, sizeof(T) * pl.part);
    pass1_tiles_pm<T, S, ACT>(rt, d, pl, t, wt, gy, saved, wp, dx, SA, SB, istride, part, t0, t1,
                              (T*)nullptr);
  };
  par_for(rt, pl.nchunks, task1);
  rt.brgemm_release();
  auto task2 = [&](int64_t chunk) {
    const int64_t t0 = chunk * pl.ntiles / pl.nchunks, t1 = (chunk + 1) * pl.ntiles / pl.nchunks;
    pass2_tiles_pm<T, S, ACT>(d, pl, t, wt, wtr, dx, SA, SB, istride, parts + chunk * pl.part,
                              t0, t1, (const T*)nullptr, 0, (const T*)nullptr);
  };
  par_for(rt, pl.nchunks, task2);
}

template <typename T, int S, int ACT>
void backward_impl(const Runtime& rt, const BlockDesc& d, const BlockTensors<T>& t,
                   const T* gy, const T* saved, const BlockGrads<T>& g, T* scratch) {
  const Plan pl = make_plan(d, true);
  const int64_t C = d.C, N = d.N, Cs = pl.Cs, Cout = d.Cout;
  const int64_t xsz = d.B * C * d.H * d.W, ssz = d.B * C * d.Ho * d.Wo;
  T* SA = scratch;
  T* SB = scratch + ssz;
  T* parts = scratch + 2 * ssz;
  const int64_t wp_elems = d.merge == kAdd ? N * pl.Ktot : 2 * N * (C + Cs);
  Buf<T> wp(wp_elems), bias(Cout);
  pack_weights(d, pl, t, wp.p, bias.p);
  // With a residual at stride 1, pass 1 writes every element of dx (the identity or
  // projection part) before pass 2 adds to it; otherwise start from zero.
  if (!(d.residual && d.stride == 1)) memset(g.dx, 0, sizeof(T) * xsz);
  if (pl.pixel_major) {
    Buf<T> wt(27 * C), wtr(27 * C);
    pack_dw_tapmajor(d, t, wt.p);
    for (int k = 0; k < 3; ++k)  // kernels rotated by 180 degrees: tap t <- tap 8 - t
      for (int tap = 0; tap < 9; ++tap)
        memcpy(wtr.p + (k * 9 + tap) * C, wt.p + (k * 9 + 8 - tap) * C, sizeof(T) * C);
    // padded scratch per branch for the whole batch, or none (per-image plan)
    const int64_t pad = pl.per_image ? 0 : d.B * C * (d.Ho + 2) * (d.Wo + 2);
    parts = scratch + 2 * pad;
    backward_pm<T, S, ACT>(rt, d, pl, t, wt.p, wtr.p, gy, saved, wp.p, g.dx, scratch,
                           scratch + pad, parts);
  } else {
    backward_pass1<T, S, ACT>(rt, d, pl, t, gy, saved, wp.p, g.dx, SA, SB, parts);
    backward_pass2<T, S, ACT>(rt, d, pl, t, g.dx, SA, SB, parts);
  }
  // Fixed-order reduction of the chunks' partials into parts[0 .. part).
  auto red = [&](int64_t blk) {
    const int64_t e0 = blk * 256, e1 = e0 + 256 < pl.part ? e0 + 256 : pl.part;
    for (int64_t k = 1; k < pl.nchunks; ++k) {
      const T* src = parts + k * pl.part;
      for (int64_t e = e0; e < e1; ++e) parts[e] += src[e];
    }
  };
  par_for(rt, ceil_div(pl.part, 256), red);
  const PartLayout L(d, pl);
  const T* pw = parts + L.pw;
  for (int64_t n = 0; n < N; ++n) {
    if (d.merge == kAdd) {
      const T* row = pw + n * pl.Ktot;
      memcpy(g.dpa + n * C, row, sizeof(T) * C);
      if (Cs) memcpy(g.dws + n * C, row + C, sizeof(T) * C);
      memcpy(g.dpb + n * C, row + C + Cs, sizeof(T) * C);
    } else {
      const int64_t K = C + Cs;
      const T* r1 = pw + n * K;
      const T* r2 = pw + (N + n) * K;
      memcpy(g.dpa + n * C, r1, sizeof(T) * C);
      if (Cs) memcpy(g.dws + n * C, r1 + C, sizeof(T) * C);
      if (Cs) memcpy(g.dws + (N + n) * C, r2, sizeof(T) * C);
      memcpy(g.dpb + n * C, r2 + Cs, sizeof(T) * C);
    }
  }
  const T* bo = parts + L.bo;
  for (int64_t n = 0; n < N; ++n) {
    g.dqa[n] = bo[n];
    g.dqb[n] = d.merge == kAdd ? bo[n] : bo[N + n];
  }
  if (g.dbs) memcpy(g.dbs, bo, sizeof(T) * Cout);
  if (pl.pixel_major) {  // tap-major partials -> (C, 1, 3, 3)
    for (int64_t c = 0; c < C; ++c)
      for (int tap = 0; tap < 9; ++tap) {
        g.dwa[c * 9 + tap] = parts[L.wa + tap * C + c];
        g.dwb[c * 9 + tap] = parts[L.wb + tap * C + c];
        g.dwc[c * 9 + tap] = parts[L.wc + tap * C + c];
      }
  } else {
    memcpy(g.dwa, parts + L.wa, sizeof(T) * 9 * C);
    memcpy(g.dwb, parts + L.wb, sizeof(T) * 9 * C);
    memcpy(g.dwc, parts + L.wc, sizeof(T) * 9 * C);
  }
  memcpy(g.dba, parts + L.ba, sizeof(T) * C);
  memcpy(g.dbb, parts + L.bb, sizeof(T) * C);
  memcpy(g.dbc, parts + L.bc, sizeof(T) * C);
}

// Compile-time stride and activation: the inner loops then have no branches to hoist.
template <typename T, template <typename, int, int> class Fn, typename... Args>
void dispatch(const BlockDesc& d, Args&&... args) {
#define MSFUSED_CASE(S, A) \
  if (d.stride == S && d.act == A) return Fn<T, S, A>::run(args...);
  MSFUSED_CASE(1, kActNone) MSFUSED_CASE(1, kActRelu) MSFUSED_CASE(1, kActRelu6)
  MSFUSED_CASE(1, kActSilu) MSFUSED_CASE(2, kActNone) MSFUSED_CASE(2, kActRelu)
  MSFUSED_CASE(2, kActRelu6) MSFUSED_CASE(2, kActSilu)
#undef MSFUSED_CASE
  abort();  // unreachable: the binding checked stride and act
}

template <typename T, int S, int A>
struct FwdFn {
  static void run(const Runtime& rt, const BlockDesc& d, const BlockTensors<T>& t, T* y, T* pre) {
    forward_impl<T, S, A>(rt, d, t, y, pre);
  }
};
template <typename T, int S, int A>
struct BwdFn {
  static void run(const Runtime& rt, const BlockDesc& d, const BlockTensors<T>& t, const T* gy,
                  const T* saved, const BlockGrads<T>& g, T* scratch) {
    backward_impl<T, S, A>(rt, d, t, gy, saved, g, scratch);
  }
};

}  // namespace

template <typename T>
void block_forward(const Runtime& rt, const BlockDesc& d, const BlockTensors<T>& t, T* y,
                   T* pre) {
  dispatch<T, FwdFn>(d, rt, d, t, y, pre);
}

template <typename T>
void block_backward(const Runtime& rt, const BlockDesc& d, const BlockTensors<T>& t,
                    const T* grad_y, const T* saved, const BlockGrads<T>& g, T* scratch) {
  dispatch<T, BwdFn>(d, rt, d, t, grad_y, saved, g, scratch);
}

template void block_forward<float>(const Runtime&, const BlockDesc&, const BlockTensors<float>&,
                                   float*, float*);
template void block_forward<double>(const Runtime&, const BlockDesc&,
                                    const BlockTensors<double>&, double*, double*);
template void block_backward<float>(const Runtime&, const BlockDesc&,
                                    const BlockTensors<float>&, const float*, const float*,
                                    const BlockGrads<float>&, float*);
template void block_backward<double>(const Runtime&, const BlockDesc&,
                                     const BlockTensors<double>&, const double*, const double*,
                                     const BlockGrads<double>&, double*);

}  // namespace MSFUSED_ISA
}  // namespace cpu
}  // namespace msfused
