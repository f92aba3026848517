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

#if defined(__GNUC__) && !defined(__clang__)
#define MSFUSED_REG_TRANSPOSE 1
// r[i][j] -> r[j][i] for a VN x VN block held as VN vectors, in registers (GCC's
// __builtin_shuffle): log2(VN) stages, stage b swapping the off-diagonal b x b blocks of
// every 2b x 2b block. lo: lanes j of row i, or of row i + b (shifted by b) where bit b of j
// is set; hi: the other halves.
// (r is VecT<T>*, not a deduced V*: see VecT.)
template <typename T>
inline void transpose_regs(VecT<T>* r) {
  typedef VecT<T> V;
  constexpr int VN = sizeof(V) / sizeof(T);
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I M __attribute__((vector_size(sizeof(V))));
  constexpr int nst = VN >= 16 ? 4 : VN >= 8 ? 3 : VN >= 4 ? 2 : 1;  // log2(VN)
  M lo[nst], hi[nst];
  for (int st = 0; st < nst; ++st)
    for (int j = 0; j < VN; ++j) {
      const int b = 1 << st;
      lo[st][j] = (j & b) ? I(VN + j - b) : I(j);
      hi[st][j] = (j & b) ? I(VN + j) : I(j + b);
    }
#pragma GCC unroll 4
  for (int st = 0; st < nst; ++st) {
    const int b = 1 << st;
#pragma GCC unroll 16
    for (int i = 0; i < VN; ++i)
      if (!(i & b)) {
        const V a = r[i], c = r[i + b];
        r[i] = __builtin_shuffle(a, c, lo[st]);
        r[i + b] = __builtin_shuffle(a, c, hi[st]);
      }
  }
}
#endif

// dst[j * ldd + i] = src[i * lds + j] for i < n, j < k: widened from I on load to the
// compute type T and stored as O (16-bit storage rounded once on its store: the bits of
// round_to). Blocks of VN x VN elements are transposed in registers, each row loaded and
// each column stored as one vector; where n or k is not a whole number of vectors the last
// block overlaps the one before (its elements stored twice, the same values), and only a
// matrix narrower than a vector goes through zero-filled copies (other compilers: element
// by element). Element by element, the strided stores took most of the backward's pass 1 at
// paper-u2 (its gz tile, 256 x 128 per image) and of the NCHW forward's x band at mnet-56.
template <typename T, typename I, typename O>
void transpose_ld(const I* src, int64_t lds, int64_t n, int64_t k, O* dst, int64_t ldd) {
#if MSFUSED_REG_TRANSPOSE
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  if (n >= VN && k >= VN) {
    for (int64_t ib = 0; ib < n; ib += VN) {
      const int64_t i0 = ib + VN <= n ? ib : n - VN;
      for (int64_t jb = 0; jb < k; jb += VN) {
        const int64_t j0 = jb + VN <= k ? jb : k - VN;
        V r[VN];  // fully unrolled below, so r stays in registers
#pragma GCC unroll 16
        for (int i = 0; i < VN; ++i) r[i] = vload_as<T>(src + (i0 + i) * lds + j0);
        transpose_regs<T>(r);
#pragma GCC unroll 16
        for (int j = 0; j < VN; ++j) vstore_as<T>(dst + (j0 + j) * ldd + i0, r[j]);
      }
    }
    return;
  }
  for (int64_t i0 = 0; i0 < n; i0 += VN) {
    const int ni = n - i0 < VN ? int(n - i0) : VN;
    for (int64_t j0 = 0; j0 < k; j0 += VN) {
      const int nj = k - j0 < VN ? int(k - j0) : VN;
      V r[VN];
      I tin[VN];
      O tout[VN];
      memset(tin, 0, sizeof(tin));
      for (int i = 0; i < VN; ++i) {
        if (i < ni) memcpy(tin, src + (i0 + i) * lds + j0, sizeof(I) * nj);
        else memset(tin, 0, sizeof(tin));
        r[i] = vload_as<T>(tin);
      }
      transpose_regs<T>(r);
      for (int j = 0; j < nj; ++j) {
        if (ni == VN) {
          vstore_as<T>(dst + (j0 + j) * ldd + i0, r[j]);
        } else {
          vstore_as<T>(tout, r[j]);
          memcpy(dst + (j0 + j) * ldd + i0, tout, sizeof(O) * ni);
        }
      }
    }
  }
#else
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < k; ++j) store_as(dst + j * ldd + i, load_as<T>(src + i * lds + j));
#endif
}

// dst[j * ldd + i] += src[i * lds + j] for i < n, j < k (all T): transpose_ld's blocks, added
// to what dst holds. The edges cannot overlap (an element would be added twice): a block cut
// by either edge is loaded through a zero-filled copy and added element by element.
template <typename T>
void add_transposed(const T* src, int64_t lds, int64_t n, int64_t k, T* dst, int64_t ldd) {
#if MSFUSED_REG_TRANSPOSE
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  for (int64_t i0 = 0; i0 < n; i0 += VN) {
    const int ni = n - i0 < VN ? int(n - i0) : VN;
    for (int64_t j0 = 0; j0 < k; j0 += VN) {
      const int nj = k - j0 < VN ? int(k - j0) : VN;
      V r[VN];
      if (ni == VN && nj == VN) {
#pragma GCC unroll 16
        for (int i = 0; i < VN; ++i) r[i] = vload(src + (i0 + i) * lds + j0);
        transpose_regs<T>(r);
#pragma GCC unroll 16
        for (int j = 0; j < VN; ++j) {
          T* o = dst + (j0 + j) * ldd + i0;
          vstore(o, vload(o) + r[j]);
        }
        continue;
      }
      T tmp[VN];
      for (int i = 0; i < VN; ++i) {
        memset(tmp, 0, sizeof(tmp));
        if (i < ni) memcpy(tmp, src + (i0 + i) * lds + j0, sizeof(T) * nj);
        r[i] = vload(tmp);
      }
      transpose_regs<T>(r);
      for (int j = 0; j < nj; ++j) {
        vstore(tmp, r[j]);
        T* o = dst + (j0 + j) * ldd + i0;
        for (int i = 0; i < ni; ++i) o[i] += tmp[i];
      }
    }
  }
#else
  for (int64_t j = 0; j < k; ++j)
    for (int64_t i = 0; i < n; ++i) dst[j * ldd + i] += src[i * lds + j];
#endif
}

// dst (K x N, leading dimension ldd, N by default) = src (N x K)^T, src row-major.
template <typename T, typename O = T>
void transpose(const T* src, int64_t n, int64_t k, O* dst, int64_t ldd = -1) {
  transpose_ld<T>(src, k, n, k, dst, ldd < 0 ? n : ldd);
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
#if MSFUSED_REG_TRANSPOSE
  } else if (!d.channels_last && sp == Cout && sc == 1) {
    // NCHW y from a pixel-major sum: VN pixels x VN channels transposed in registers, then
    // a vector of pixels per channel (element by element, the strided loads took 15% of the
    // NCHW forward at mnet-56). Per block of channels the pixels go front to back, so y and
    // x are VN streams each rather than Cout.
    typedef typename Vec<T>::type V;
    constexpr int VN = Vec<T>::n;
    const int64_t Pv = P - P % VN, Cv = Cout - Cout % VN;
    for (int64_t c0 = 0; c0 < Cv; c0 += VN)
      for (int64_t p0 = 0; p0 < Pv; p0 += VN) {
        V r[VN];
#pragma GCC unroll 16
        for (int i = 0; i < VN; ++i) r[i] = vload(src + (p0 + i) * Cout + c0);
        transpose_regs<T>(r);
#pragma GCC unroll 16
        for (int j = 0; j < VN; ++j) {
          V z = r[j] + bias[c0 + j];
          const int64_t o = (c0 + j) * HoWo + p0;
          if (xres) z += vload_as<T>(xres + o);
          dw_store<ACT>(z, ytile + o, ptile ? ptile + o : nullptr);
        }
      }
    for (int64_t co = Cv; co < Cout; ++co)
      for (int64_t p = 0; p < Pv; ++p) one(p, co);
    for (int64_t co = 0; co < Cout; ++co)
      for (int64_t p = Pv; p < P; ++p) one(p, co);
#endif
  } else if (d.channels_last) {  // loop order follows y's memory order
    for (int64_t p = 0; p < P; ++p)
      for (int64_t co = 0; co < Cout; ++co) one(p, co);
  } else {
    for (int64_t co = 0; co < Cout; ++co)
      for (int64_t p = 0; p < P; ++p) one(p, co);
  }
}

// Sums for the output-bias gradient (tile_gz). A bias gradient is one sum over every output
// pixel, often of terms that nearly cancel, and a float chain down a tile's pixels lost up to
// 1e-5 of such a total where eager PyTorch's cascaded sum keeps about 1e-6 (benchmarks/
// NOTES.md entry 67). So the float sums here run over at most kBiasBlock pixels and go on in
// double from there: a rounding error bounded by the block, for about the cost of the old
// float chain (one double add per channel every kBiasBlock pixels).
constexpr int kBiasBlock = 16;

// acc[c] += sum of the rows o[0 .. n) (row stride ld) at column c, for c < m; n <= kBiasBlock.
template <typename T>
inline void add_column_sums(double* acc, const T* o, int64_t n, int64_t ld, int64_t m) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  int64_t c = 0;
  for (; c + VN <= m; c += VN) {
    V s0 = vload(o + c), s1{};
    int64_t i = 1;
    for (; i + 1 < n; i += 2) {
      s0 += vload(o + i * ld + c);
      s1 += vload(o + (i + 1) * ld + c);
    }
    if (i < n) s0 += vload(o + i * ld + c);
    const V s = s0 + s1;
    for (int j = 0; j < VN; ++j) acc[c + j] += double(s[j]);
  }
  for (; c < m; ++c) {
    T s = o[c];
    for (int64_t i = 1; i < n; ++i) s += o[i * ld + c];
    acc[c] += double(s);
  }
}

// The sum of o[0 .. n): float sums of kBiasBlock vectors per lane, then double.
template <typename T>
inline double sum_blocked(const T* o, int64_t n) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n, BL = kBiasBlock * VN;
  double s = 0;
  int64_t i = 0;
  for (; i + BL <= n; i += BL) {
    V a0{}, a1{};
    for (int k = 0; k < BL; k += 2 * VN) {
      a0 += vload(o + i + k);
      a1 += vload(o + i + k + VN);
    }
    const V a = a0 + a1;
    for (int j = 0; j < VN; ++j) s += double(a[j]);
  }
  V a{};
  for (; i + VN <= n; i += VN) a += vload(o + i);
  for (int j = 0; j < VN; ++j) s += double(a[j]);
  for (; i < n; ++i) s += double(o[i]);
  return s;
}

// tls_buf slot of tile_gz's output-bias sums.
constexpr int kBiasSumSlot = 20;

// Output-side start of the backward for one tile: G = dy * act'(z) in dy's layout (Cout x P
// for NCHW, P x Cout for NHWC), the output-bias partial, and the identity-residual part of
// dx (dx has y's shape then; each tile owns its positions).
// dy and saved may be 16-bit storage (I = bf16_t: widened here); G and dx are T.
// The output-bias sums: blocks of pixels in float, then double (add_column_sums), added to
// the partial once per tile.
template <typename T, int ACT, typename I>
void tile_gz(const BlockDesc& d, const I* gy, const I* saved, int64_t off, int64_t P, T* G,
             T* dbias, T* dx, bool identity) {
  const int64_t HoWo = d.Ho * d.Wo, Cout = d.Cout;
  if (d.channels_last) {
    double* acc = tls_buf<double>(kBiasSumSlot, Cout);
    zero_n(acc, Cout);
    for (int64_t p0 = 0; p0 < P; p0 += kBiasBlock) {
      const int64_t pn = P - p0 < kBiasBlock ? P - p0 : kBiasBlock;
      for (int64_t p = p0; p < p0 + pn; ++p) {
        const I* gr = gy + off + p * Cout;
        const I* sr = ACT == kActNone ? nullptr : saved + off + p * Cout;
        T* o = G + p * Cout;
        act_grad_in<ACT>(gr, sr, sr, o, Cout);
        if (identity) copy_n(dx + off + p * Cout, o, Cout);
      }
      add_column_sums(acc, G + p0 * Cout, pn, Cout, Cout);  // the block's rows, still in L1
    }
    for (int64_t co = 0; co < Cout; ++co) dbias[co] += T(acc[co]);
  } else {
    for (int64_t co = 0; co < Cout; ++co) {
      const I* gr = gy + off + co * HoWo;
      const I* sr = ACT == kActNone ? nullptr : saved + off + co * HoWo;
      T* o = G + co * P;
      act_grad_in<ACT>(gr, sr, sr, o, P);
      dbias[co] += T(sum_blocked(o, P));
      if (identity) copy_n(dx + off + co * HoWo, o, P);
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
