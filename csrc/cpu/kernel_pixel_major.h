// The pixel-major CPU path (C >= kPixelMajorMinC).
#pragma once
#include "cpu/kernel_grad_gemms.h"
#include "cpu/kernel_tiles.h"

MSFUSED_KERNEL_BEGIN

// ---- pixel-major path ("channels inner"), used when C >= kPixelMajorMinC -----------------
// The same algorithm with every buffer laid out [pixel][channel]: the depthwise loops run
// over contiguous channel vectors (register-blocked), which is what narrow images (14x14,
// 28x28) with many channels need; the planar path above vectorises along rows and suits
// few channels. The packed matrix is A (P x Ktot), row p = [a | xs | b]. Every GEMM here
// is a plain row-major C = A B (Runtime::sbrgemm: oneDNN's JIT micro-kernel for float).
// Depthwise weights are read tap-major (wt[tap * C + c]); their gradients accumulate
// tap-major too. Tile scratch is thread-local and reused across calls (no page faults).


// xb[(k * (W + 2) + w + 1) * C + c] = x[bi, c, hb + k, w] (zero outside the image), widened
// to the compute type T when x is 16-bit storage.
template <typename T, typename I>
void load_x_band_pm(const BlockDesc& d, const I* x, int64_t bi, int64_t hb, int64_t nrows,
                    T* xb) {
  const int64_t C = d.C, W = d.W, RW = (W + 2) * C;
  for (int64_t k = 0; k < nrows; ++k) {
    const int64_t h = hb + k;
    T* row = xb + k * RW;
    if (h < 0 || h >= d.H) {
      zero_n(row, RW);
      continue;
    }
    zero_n(row, C);
    zero_n(row + (W + 1) * C, C);
    if (d.channels_last && std::is_same_v<T, I>) {
      memcpy(row + C, x + ((bi * d.H + h) * W) * C, sizeof(T) * W * C);
    } else if (d.channels_last) {
      constexpr int VN = Vec<T>::n;
      const I* src = x + ((bi * d.H + h) * W) * C;
      int64_t e = 0;
      for (; e + VN <= W * C; e += VN) vstore(row + C + e, vload_as<T>(src + e));
      for (; e < W * C; ++e) row[C + e] = load_as<T>(src + e);
    }
  }
  if (d.channels_last) return;
  // NCHW: the in-image rows [k0, k1) of each channel plane are one contiguous run of L
  // pixels; blocks of VN channels x VN pixels of it are transposed in registers (the last
  // block of either overlapping the one before), pixel m going to band row k0 + m / W,
  // column m % W. Each block's VN planes are read front to back: a row at a time across
  // all C planes left C streams to the prefetchers and a third of the blocks cut by the
  // row's end.
  const int64_t k0 = hb < 0 ? -hb : 0, k1 = hb + nrows > d.H ? d.H - hb : nrows;
  if (k1 <= k0) return;
  const I* base = x + (bi * C * d.H + hb + k0) * W;
  const int64_t lds = d.H * W, L = (k1 - k0) * W;
  T* dbase = xb + k0 * RW + C;
#if MSFUSED_REG_TRANSPOSE
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  if (C >= VN && L >= VN) {
    for (int64_t cb = 0; cb < C; cb += VN) {
      const int64_t c0 = cb + VN <= C ? cb : C - VN;
      for (int64_t mb = 0; mb < L; mb += VN) {
        const int64_t m0 = mb + VN <= L ? mb : L - VN;
        V r[VN];
#pragma GCC unroll 16
        for (int i = 0; i < VN; ++i) r[i] = vload_as<T>(base + (c0 + i) * lds + m0);
        transpose_regs<T>(r);
        int64_t kq = m0 / W, wq = m0 - kq * W;
#pragma GCC unroll 16
        for (int j = 0; j < VN; ++j) {
          vstore(dbase + kq * RW + wq * C + c0, r[j]);
          if (++wq == W) wq = 0, ++kq;
        }
      }
    }
    return;
  }
#endif
  for (int64_t k = k0; k < k1; ++k)
    transpose_ld<T>(base + (k - k0) * W, lds, C, W, dbase + (k - k0) * RW, C);
}

// One input row of a 3x3 depthwise conv feeding four neighbouring output pixels: pixel k
// takes tap column tj from input column S * k + tj at r + column * C. Each input vector is
// loaded once and used by every sum it feeds, in tap order (tj = 0, 1, 2) for each sum.
template <int S, typename T>
inline void dw_taps4(const T* r, int64_t C, VecT<T> k0, VecT<T> k1, VecT<T> k2, VecT<T>& a0,
                     VecT<T>& a1, VecT<T>& a2, VecT<T>& a3) {
  VecT<T> x;
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

// The part of dw_row_pm's row outside its 4-pixel blocks of channel vectors: pixels
// [w, Wo) one at a time, then the channels past the last whole vector for every pixel.
template <int S, int ACT, typename T, typename O>
void dw_row_tail_pm(const T* in, int64_t rs, int64_t C, int64_t Wo, const T* wt,
                    const T* bias, O* post, T* pre, int64_t ps, const T* init, int64_t w) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  const int64_t Cv = C / VN * VN;
  for (; w < Wo; ++w) {
    const T* r = in + S * w * C;
    for (int64_t c0 = 0; c0 < Cv; c0 += VN) {
      const T* wc = wt + c0;
      const T* rc = r + c0;
      V a = init ? vload(init + w * ps + c0) : (bias ? vload(bias + c0) : V{});
      a += vload(wc) * vload(rc);
      a += vload(wc + C) * vload(rc + C);
      a += vload(wc + 2 * C) * vload(rc + 2 * C);
      a += vload(wc + 3 * C) * vload(rc + rs);
      a += vload(wc + 4 * C) * vload(rc + rs + C);
      a += vload(wc + 5 * C) * vload(rc + rs + 2 * C);
      a += vload(wc + 6 * C) * vload(rc + 2 * rs);
      a += vload(wc + 7 * C) * vload(rc + 2 * rs + C);
      a += vload(wc + 8 * C) * vload(rc + 2 * rs + 2 * C);
      dw_store<ACT>(a, post + w * ps + c0, pre ? pre + w * ps + c0 : nullptr);
    }
  }
  for (int64_t c0 = Cv; c0 < C; ++c0)
    for (int64_t w = 0; w < Wo; ++w) {
      const T* p0 = in + S * w * C + c0;
      T acc = init ? init[w * ps + c0] : (bias ? bias[c0] : T(0));
      for (int ti = 0; ti < 3; ++ti)
        for (int tj = 0; tj < 3; ++tj) acc += wt[(ti * 3 + tj) * C + c0] * p0[ti * rs + tj * C];
      if (pre) pre[w * ps + c0] = acc;
      store_as(post + w * ps + c0, act_f<ACT>(acc));
    }
}

// One output row of a 3x3 depthwise conv over all channels, pixel-major: output column w
// takes tap (ti, tj) from in[ti * rs + (S * w + tj) * C + c]; post[w * ps + c] = act(z) and,
// when pre is given, pre[w * ps + c] = z, z = bias + the nine taps in row-major tap order.
// Register blocks of 4 pixels x one vector of channels keep four sums in registers, so an
// input vector loaded once serves up to three sums. Pixel blocks are the outer loop and
// channel vectors the inner one, so every load walks memory forward: with channels
// outside, a power-of-two C put a row's pixels 4 C bytes apart, all in a few L1 sets (at
// C = 128 floats 8 of 64), and the inputs came from L2. The nine weight vectors are
// reloaded per block from the tap-major table, which stays in L1.
// When init is given, sums start from init[w * ps + c] instead of the bias (init may be post).
// post may be 16-bit storage (O = bf16_t: act(z) rounded on the store); pre is always T.
template <int S, int ACT, typename T, typename O>
void dw_row_pm(const T* in, int64_t rs, int64_t C, int64_t Wo, const T* wt, const T* bias,
               O* post, T* pre, int64_t ps, const T* init = nullptr) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  const int64_t Cv = C / VN * VN;
  int64_t w = 0;
  for (; w + 4 <= Wo; w += 4) {
    const T* r = in + S * w * C;
    O* po = post + w * ps;
    T* pr = pre ? pre + w * ps : nullptr;
    const T* ip = init ? init + w * ps : nullptr;
    int64_t c0 = 0;
#if MSFUSED_VEC_BYTES >= 64
    // Two channel vectors at a time where there are 32 vector registers (AVX-512): eight
    // independent sums. Four chains of dependent FMAs keep only one of two FMA pipes busy
    // at four cycles' latency; each sum's taps are added in the same order as below.
    for (; c0 + 2 * VN <= Cv; c0 += 2 * VN) {
      const T* wc = wt + c0;
      const T* wd = wc + VN;
      V a0, a1, a2, a3, e0, e1, e2, e3;
      if (ip) {
        a0 = vload(ip + c0);          e0 = vload(ip + c0 + VN);
        a1 = vload(ip + ps + c0);     e1 = vload(ip + ps + c0 + VN);
        a2 = vload(ip + 2 * ps + c0); e2 = vload(ip + 2 * ps + c0 + VN);
        a3 = vload(ip + 3 * ps + c0); e3 = vload(ip + 3 * ps + c0 + VN);
      } else {
        a0 = a1 = a2 = a3 = bias ? vload(bias + c0) : V{};
        e0 = e1 = e2 = e3 = bias ? vload(bias + c0 + VN) : V{};
      }
      for (int ti = 0; ti < 3; ++ti) {
        const T* rr = r + ti * rs + c0;
        const T* wa = wc + 3 * ti * C;
        const T* wb = wd + 3 * ti * C;
        dw_taps4<S>(rr, C, vload(wa), vload(wa + C), vload(wa + 2 * C), a0, a1, a2, a3);
        dw_taps4<S>(rr + VN, C, vload(wb), vload(wb + C), vload(wb + 2 * C), e0, e1, e2, e3);
      }
      dw_store<ACT>(a0, po + c0, pr ? pr + c0 : nullptr);
      dw_store<ACT>(a1, po + ps + c0, pr ? pr + ps + c0 : nullptr);
      dw_store<ACT>(a2, po + 2 * ps + c0, pr ? pr + 2 * ps + c0 : nullptr);
      dw_store<ACT>(a3, po + 3 * ps + c0, pr ? pr + 3 * ps + c0 : nullptr);
      dw_store<ACT>(e0, po + c0 + VN, pr ? pr + c0 + VN : nullptr);
      dw_store<ACT>(e1, po + ps + c0 + VN, pr ? pr + ps + c0 + VN : nullptr);
      dw_store<ACT>(e2, po + 2 * ps + c0 + VN, pr ? pr + 2 * ps + c0 + VN : nullptr);
      dw_store<ACT>(e3, po + 3 * ps + c0 + VN, pr ? pr + 3 * ps + c0 + VN : nullptr);
    }
#endif
    for (; c0 < Cv; c0 += VN) {
      const T* wc = wt + c0;
      V a0, a1, a2, a3;
      if (ip) {
        a0 = vload(ip + c0);
        a1 = vload(ip + ps + c0);
        a2 = vload(ip + 2 * ps + c0);
        a3 = vload(ip + 3 * ps + c0);
      } else {
        a0 = a1 = a2 = a3 = bias ? vload(bias + c0) : V{};
      }
      dw_taps4<S>(r + c0, C, vload(wc), vload(wc + C), vload(wc + 2 * C), a0, a1, a2, a3);
      dw_taps4<S>(r + rs + c0, C, vload(wc + 3 * C), vload(wc + 4 * C), vload(wc + 5 * C),
                  a0, a1, a2, a3);
      dw_taps4<S>(r + 2 * rs + c0, C, vload(wc + 6 * C), vload(wc + 7 * C), vload(wc + 8 * C),
                  a0, a1, a2, a3);
      dw_store<ACT>(a0, po + c0, pr ? pr + c0 : nullptr);
      dw_store<ACT>(a1, po + ps + c0, pr ? pr + ps + c0 : nullptr);
      dw_store<ACT>(a2, po + 2 * ps + c0, pr ? pr + 2 * ps + c0 : nullptr);
      dw_store<ACT>(a3, po + 3 * ps + c0, pr ? pr + 3 * ps + c0 : nullptr);
    }
  }
  dw_row_tail_pm<S, ACT>(in, rs, C, Wo, wt, bias, post, pre, ps, init, w);
}

// Two output rows of a stride-1 3x3 depthwise conv at once, rows o and o + 1 over input
// rows in .. in + 3 rs, the second row's post and pre at + orow; with init, the sums start
// from init (the second row's at + iorow) instead of the bias, as in dw_row_pm (init may be
// post). Each of the four input rows is loaded once for both rows (a single row loads three
// input rows per output row: 33 loads per 8 outputs here against 54 in dw_row_pm's
// blocks), the nine weight vectors once per block; 8 sums in registers. Every sum takes its
// taps in dw_row_pm's order, so the results are its bits. Used where there are 32 vector
// registers (kTwoRows: the AVX-512 build); with 16 the weights and sums do not fit.
constexpr bool kTwoRows = MSFUSED_VEC_BYTES >= 64;

template <typename T>
inline void dw_taps4_rows2(const T* r, int64_t C, VecT<T> k0, VecT<T> k1, VecT<T> k2,
                           VecT<T>& a0, VecT<T>& a1, VecT<T>& a2, VecT<T>& a3, VecT<T> j0,
                           VecT<T> j1, VecT<T> j2, VecT<T>& e0, VecT<T>& e1, VecT<T>& e2,
                           VecT<T>& e3) {
  VecT<T> x;
  x = vload(r);         a0 += k0 * x;                               e0 += j0 * x;
  x = vload(r + C);     a0 += k1 * x; a1 += k0 * x;                 e0 += j1 * x; e1 += j0 * x;
  x = vload(r + 2 * C); a0 += k2 * x; a1 += k1 * x; a2 += k0 * x;   e0 += j2 * x; e1 += j1 * x;
                                                                     e2 += j0 * x;
  x = vload(r + 3 * C); a1 += k2 * x; a2 += k1 * x; a3 += k0 * x;   e1 += j2 * x; e2 += j1 * x;
                                                                     e3 += j0 * x;
  x = vload(r + 4 * C); a2 += k2 * x; a3 += k1 * x;                 e2 += j2 * x; e3 += j1 * x;
  x = vload(r + 5 * C); a3 += k2 * x;                               e3 += j2 * x;
}

// dw_row2_pm's last Wo % 4 pixels: NP (< 4) pixels x 2 rows x one channel vector, each of
// the 4 input rows loaded once for both rows (dw_row_tail_pm, one pixel and row at a time,
// loads 18 vectors per output). Every sum takes its taps in dw_row_pm's order: the same bits.
template <int NP, int ACT, typename T, typename O>
inline void dw_tail2_pm(const T* rc, int64_t rs, int64_t C, const T* wc, const T* bias, O* po,
                        T* pr, int64_t ps, int64_t orow, const T* ip, int64_t iorow) {
  typedef typename Vec<T>::type V;
  V wk[9];
  for (int k = 0; k < 9; ++k) wk[k] = vload(wc + k * C);
  V a[NP], e[NP];
  for (int k = 0; k < NP; ++k) {
    a[k] = ip ? vload(ip + k * ps) : bias ? vload(bias) : V{};
    e[k] = ip ? vload(ip + iorow + k * ps) : bias ? vload(bias) : V{};
  }
  for (int ti = 0; ti < 4; ++ti)  // input row ti: tap row ti of row o, ti - 1 of row o + 1
    for (int j = 0; j < NP + 2; ++j) {
      const V x = vload(rc + ti * rs + j * C);
      for (int tj = 0; tj < 3; ++tj) {
        const int k = j - tj;  // the pixel that column j feeds through tap column tj
        if (k < 0 || k >= NP) continue;
        if (ti < 3) a[k] += wk[3 * ti + tj] * x;
        if (ti > 0) e[k] += wk[3 * (ti - 1) + tj] * x;
      }
    }
  for (int k = 0; k < NP; ++k) {
    dw_store<ACT>(a[k], po + k * ps, pr ? pr + k * ps : nullptr);
    dw_store<ACT>(e[k], po + orow + k * ps, pr ? pr + orow + k * ps : nullptr);
  }
}

template <int ACT, typename T, typename O>
void dw_row2_pm(const T* in, int64_t rs, int64_t C, int64_t Wo, const T* wt, const T* bias,
                O* post, T* pre, int64_t ps, int64_t orow, const T* init = nullptr,
                int64_t iorow = 0) {
  typedef typename Vec<T>::type V;
  constexpr int VN = Vec<T>::n;
  const int64_t Cv = C / VN * VN;
  int64_t w = 0;
  for (; w + 4 <= Wo; w += 4) {
    const T* r = in + w * C;
    O* po = post + w * ps;
    T* pr = pre ? pre + w * ps : nullptr;
    for (int64_t c0 = 0; c0 < Cv; c0 += VN) {
      const T* wc = wt + c0;
      const V w0 = vload(wc), w1 = vload(wc + C), w2 = vload(wc + 2 * C);
      const V w3 = vload(wc + 3 * C), w4 = vload(wc + 4 * C), w5 = vload(wc + 5 * C);
      const V w6 = vload(wc + 6 * C), w7 = vload(wc + 7 * C), w8 = vload(wc + 8 * C);
      V a0, a1, a2, a3, e0, e1, e2, e3;
      if (init) {
        const T* i0 = init + w * ps + c0;
        const T* i1 = i0 + iorow;
        a0 = vload(i0); a1 = vload(i0 + ps); a2 = vload(i0 + 2 * ps); a3 = vload(i0 + 3 * ps);
        e0 = vload(i1); e1 = vload(i1 + ps); e2 = vload(i1 + 2 * ps); e3 = vload(i1 + 3 * ps);
      } else {
        a0 = a1 = a2 = a3 = e0 = e1 = e2 = e3 = bias ? vload(bias + c0) : V{};
      }
      const T* rc = r + c0;
      dw_taps4<1>(rc, C, w0, w1, w2, a0, a1, a2, a3);  // input row 0: row o only
      dw_taps4_rows2(rc + rs, C, w3, w4, w5, a0, a1, a2, a3, w0, w1, w2, e0, e1, e2, e3);
      dw_taps4_rows2(rc + 2 * rs, C, w6, w7, w8, a0, a1, a2, a3, w3, w4, w5, e0, e1, e2, e3);
      dw_taps4<1>(rc + 3 * rs, C, w6, w7, w8, e0, e1, e2, e3);  // input row 3: row o + 1
      dw_store<ACT>(a0, po + c0, pr ? pr + c0 : nullptr);
      dw_store<ACT>(a1, po + ps + c0, pr ? pr + ps + c0 : nullptr);
      dw_store<ACT>(a2, po + 2 * ps + c0, pr ? pr + 2 * ps + c0 : nullptr);
      dw_store<ACT>(a3, po + 3 * ps + c0, pr ? pr + 3 * ps + c0 : nullptr);
      O* qo = po + orow;
      T* qr = pr ? pr + orow : nullptr;
      dw_store<ACT>(e0, qo + c0, qr ? qr + c0 : nullptr);
      dw_store<ACT>(e1, qo + ps + c0, qr ? qr + ps + c0 : nullptr);
      dw_store<ACT>(e2, qo + 2 * ps + c0, qr ? qr + 2 * ps + c0 : nullptr);
      dw_store<ACT>(e3, qo + 3 * ps + c0, qr ? qr + 3 * ps + c0 : nullptr);
    }
  }
  auto tail = [&](auto np) {
    constexpr int NP = decltype(np)::value;
    for (int64_t c0 = 0; c0 < Cv; c0 += VN)
      dw_tail2_pm<NP, ACT>(in + w * C + c0, rs, C, wt + c0, bias ? bias + c0 : nullptr,
                           post + w * ps + c0, pre ? pre + w * ps + c0 : nullptr, ps, orow,
                           init ? init + w * ps + c0 : nullptr, iorow);
    w += NP;
  };
  if (Wo - w == 3) tail(std::integral_constant<int, 3>{});
  if (Wo - w == 2) tail(std::integral_constant<int, 2>{});
  if (Wo - w == 1) tail(std::integral_constant<int, 1>{});
  // the channels past the last whole vector (w = Wo: no pixels left)
  dw_row_tail_pm<1, ACT>(in, rs, C, Wo, wt, bias, post, pre, ps, init, w);
  dw_row_tail_pm<1, ACT>(in + rs, rs, C, Wo, wt, bias, post + orow, pre ? pre + orow : nullptr,
                         ps, init ? init + iorow : nullptr, w);
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

// The depthwise part of one tile, pixel-major: the b1 band (R + 2 rows, zero-padded
// columns), then rows of A. pre_ab (when act' reads the pre-activation) gets pre-activations in A's layout.
// A may be 16-bit storage (O = bf16_t: the GEMM's operand, rounded once); b1 stays in T.
template <typename T, int S, int ACT, typename O>
void tile_dw_pm(const BlockDesc& d, const Plan& pl, const BlockTensors<T>& t, const T* wt,
                const TileGeom& g, const T* xb, T* b1b, O* A, T* pre_ab) {
  const int64_t C = d.C, Wo = d.Wo, XR = (d.W + 2) * C, BR = (Wo + 2) * C, K = pl.Ktot;
  const T* wat = wt;
  const T* wbt = wt + 9 * C;
  const T* wct = wt + 18 * C;
  constexpr bool two = kTwoRows && S == 1;  // rows two at a time (dw_row2_pm), same bits
  for (int64_t k = 0; k < g.R + 2;) {
    const int64_t q = g.r0 - 1 + k;
    T* brow = b1b + k * BR;
    if (q < 0 || q >= d.Ho) {
      zero_n(brow, BR);
      ++k;
      continue;
    }
    const int64_t n = two && k + 1 < g.R + 2 && q + 1 < d.Ho ? 2 : 1;
    for (int64_t j = 0; j < n; ++j) {
      zero_n(brow + j * BR, C);
      zero_n(brow + j * BR + (Wo + 1) * C, C);
    }
    if constexpr (two)
      if (n == 2) {
        dw_row2_pm<ACT>(xb + k * XR, XR, C, Wo, wbt, t.bb, brow + C, (T*)nullptr, C, BR);
        k += n;
        continue;
      }
    dw_row_pm<S, ACT>(xb + S * k * XR, XR, C, Wo, wbt, t.bb, brow + C, (T*)nullptr, C);
    ++k;
  }
  for (int64_t i = 0; i < g.R;) {  // a rows
    O* arow = A + i * Wo * K;
    T* prow = pre_ab ? pre_ab + i * Wo * K : nullptr;
    if constexpr (two)
      if (i + 1 < g.R) {
        dw_row2_pm<ACT>(xb + (i + 1) * XR, XR, C, Wo, wat, t.ba, arow, prow, K, Wo * K);
        i += 2;
        continue;
      }
    dw_row_pm<S, ACT>(xb + S * (i + 1) * XR, XR, C, Wo, wat, t.ba, arow, prow, K);
    ++i;
  }
  for (int64_t i = 0; i < g.R && pl.Cs; ++i) {  // the projection's x columns
    O* arow = A + i * Wo * K;
    for (int64_t w = 0; w < Wo; ++w) {
      const T* xs = xb + (S * (i + 1) + 1) * XR + (S * w + 1) * C;
      if constexpr (std::is_same_v<T, O>)
        copy_n(arow + w * K + C, xs, C);
      else  // x was 16-bit storage: exact
        round_to(xs, C, arow + w * K + C);
    }
  }
  for (int64_t i = 0; i < g.R;) {  // b rows
    O* arow = A + i * Wo * K;
    T* prow = pre_ab ? pre_ab + i * Wo * K : nullptr;
    if constexpr (two)
      if (i + 1 < g.R) {
        dw_row2_pm<ACT>(b1b + i * BR, BR, C, Wo, wct, t.bc, arow + K - C,
                        prow ? prow + K - C : nullptr, K, Wo * K);
        i += 2;
        continue;
      }
    dw_row_pm<1, ACT>(b1b + i * BR, BR, C, Wo, wct, t.bc, arow + K - C,
                      prow ? prow + K - C : nullptr, K);
    ++i;
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

// x, y and pre are I: T, or bfloat16 storage (bf16_t; t.x is then unused), widened on
// load and rounded once in the epilogue.
template <typename T, int S, int ACT, typename I>
void forward_pm(const Runtime& rt, const BlockDesc& d, const Plan& pl, const BlockTensors<T>& t,
                const I* x, const T* wp, const T* bias, I* y, I* pre_out) {
  const int64_t HoWo = d.Ho * d.Wo, C = d.C;
  Buf<T> wt(27 * C), wT(packed_weight_elems(d, pl));
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
    load_x_band_pm(d, x, g.bi, S * (g.r0 - 1) - 1, S * (g.R + 1) + 3, xb);
    tile_dw_pm<T, S, ACT>(d, pl, t, wt.p, g, xb, b1b, A, nullptr);
    tile_pointwise_pm(rt, d, pl, wT.p, A, g.P, ybuf);
    const int64_t off = d.channels_last ? (g.bi * HoWo + g.r0 * d.Wo) * d.Cout
                                        : g.bi * d.Cout * HoWo + g.r0 * d.Wo;
    epilogue<T, ACT>(d, ybuf, d.Cout, 1, y + off, identity ? x + off : nullptr,
                        pre_out ? pre_out + off : nullptr, bias, g.P);
  };
  par_for(rt, pl.ntiles, task);
  rt.brgemm_release();
}

// dw_grad_tile's partials (below; same arguments, same result up to the sums' order) with
// each channel vector's 9 tap sums and its bias sum in registers: over a strip of pixels of
// every row of the tile, each tap row's 3-column window sliding along the strip, so a pixel
// costs 1 gradient load and 3 (XS = 1) or 6 (XS = 2) input loads for 9 FMAs, and the
// partials are read and written once per strip. 9 sums + 9 window + 1 gradient + 1 bias =
// 20 vectors: only with 32 registers. The strip bounds what must stay in L1 between an input
// row's three uses (consecutive output rows); strips of 8, 12, 16 or whole rows measured
// alike within the noise (benchmarks/NOTES.md 39), 16 at most and equal widths kept (each
// strip reloads its first two columns per row).
template <int XS, typename T>
void dw_grad_strips(const T* g0, int64_t grs, int64_t gs, int64_t R, int64_t Wo, const T* x0,
                    int64_t xrs, int64_t trs, int64_t C, T* part, T* bpart) {
  typedef typename Vec<T>::type V;
  constexpr int VB = Vec<T>::n;
  const int64_t Cv = C - C % VB;
  const int64_t SW = ceil_div(Wo, ceil_div(Wo, 16));  // equal strips of at most 16
  for (int64_t w0 = 0; w0 < Wo; w0 += SW) {
    const int64_t nw = w0 + SW <= Wo ? SW : Wo - w0;
    for (int64_t c = 0; c < Cv; c += VB) {
      V s0{}, s1{}, s2{}, s3{}, s4{}, s5{}, s6{}, s7{}, s8{}, sb{};
      for (int64_t i = 0; i < R; ++i) {
        const T* gp = g0 + i * grs + w0 * gs + c;
        const T* xp = x0 + i * xrs + XS * w0 * C + c;  // column XS w0 of tap row 0
        // window of tap row ti: u (column tj = 0), v (tj = 1) of the current pixel
        V u0 = vload(xp), v0 = vload(xp + C);
        V u1 = vload(xp + trs), v1 = vload(xp + trs + C);
        V u2 = vload(xp + 2 * trs), v2 = vload(xp + 2 * trs + C);
        for (int64_t w = 0; w < nw; ++w) {
          const V gv = vload(gp + w * gs);
          const T* xc = xp + (XS * w + 2) * C;  // column tj = 2
          const V r0 = vload(xc), r1 = vload(xc + trs), r2 = vload(xc + 2 * trs);
          sb += gv;
          s0 += gv * u0; s1 += gv * v0; s2 += gv * r0;
          s3 += gv * u1; s4 += gv * v1; s5 += gv * r1;
          s6 += gv * u2; s7 += gv * v2; s8 += gv * r2;
          if constexpr (XS == 1) {
            u0 = v0; v0 = r0; u1 = v1; v1 = r1; u2 = v2; v2 = r2;
          } else {  // the next pixel's columns 2 w + 2 (= r) and 2 w + 3
            u0 = r0; u1 = r1; u2 = r2;
            if (w + 1 < nw) {
              v0 = vload(xc + C); v1 = vload(xc + trs + C); v2 = vload(xc + 2 * trs + C);
            }
          }
        }
      }
      T* pp = part + c;
      vstore(pp, vload(pp) + s0);             vstore(pp + C, vload(pp + C) + s1);
      vstore(pp + 2 * C, vload(pp + 2 * C) + s2); vstore(pp + 3 * C, vload(pp + 3 * C) + s3);
      vstore(pp + 4 * C, vload(pp + 4 * C) + s4); vstore(pp + 5 * C, vload(pp + 5 * C) + s5);
      vstore(pp + 6 * C, vload(pp + 6 * C) + s6); vstore(pp + 7 * C, vload(pp + 7 * C) + s7);
      vstore(pp + 8 * C, vload(pp + 8 * C) + s8);
      vstore(bpart + c, vload(bpart + c) + sb);
    }
  }
  if (Cv == C) return;
  for (int64_t i = 0; i < R; ++i)  // the last C % VB channels, one pixel at a time
    for (int64_t w = 0; w < Wo; ++w) {
      const T* gp = g0 + i * grs + w * gs;
      const T* xw = x0 + i * xrs + XS * w * C;
      for (int64_t c = Cv; c < C; ++c) {
        const T gv = gp[c];
        bpart[c] += gv;
        for (int ti = 0; ti < 3; ++ti)
          for (int tj = 0; tj < 3; ++tj)
            part[(ti * 3 + tj) * C + c] += gv * xw[ti * trs + tj * C + c];
      }
    }
}

// Depthwise weight/bias gradient of one tile: for each tap,
//   part[tap * C + c] += sum over the tile's pixels of g[p][c] * src_tap(p)[c],
//   bpart[c] += sum of g[p][c].
// Pixel (i, w) has g at g0 + i * grs + w * gs and tap (ti, tj) at
// x0 + i * xrs + (XS * w + tj) * C + ti * trs (XS: the conv's stride along the row).
// Blocks of 4 pixels of a row outside, channel vectors inside, so every load walks memory
// forward: a channel-outer loop strides C elements from pixel to pixel, which puts a
// power-of-two C's pixels in a few L1 sets (as in dw_row_pm) and its reads came from L2.
// The 4 pixels' windows overlap (3 XS + 3 columns a row, not 12 loads) and their products
// of a tap go into part with one load and one store; part (9 C) and bpart stay in L1.
// With 32 vector registers (the AVX-512 build) the sums go to registers instead: see
// dw_grad_strips above.
constexpr bool kGradSumsInRegs = MSFUSED_VEC_BYTES >= 64;

template <int XS, typename T>
void dw_grad_tile(const T* g0, int64_t grs, int64_t gs, int64_t R, int64_t Wo, const T* x0,
                  int64_t xrs, int64_t trs, int64_t C, T* part, T* bpart) {
  if constexpr (kGradSumsInRegs) {
    dw_grad_strips<XS>(g0, grs, gs, R, Wo, x0, xrs, trs, C, part, bpart);
    return;
  }
  typedef typename Vec<T>::type V;
  constexpr int VB = Vec<T>::n;
  constexpr int NCOL = 3 * XS + 3;
  const int64_t Cv = C - C % VB;
  for (int64_t i = 0; i < R; ++i) {
    const T* gr = g0 + i * grs;
    const T* xr = x0 + i * xrs;
    int64_t w = 0;
    for (; w + 4 <= Wo; w += 4) {
      const T* gp = gr + w * gs;
      const T* xw = xr + XS * w * C;
      for (int64_t c = 0; c < Cv; c += VB) {
        const V ga = vload(gp + c), gb = vload(gp + gs + c), gc = vload(gp + 2 * gs + c),
                gd = vload(gp + 3 * gs + c);
        vstore(bpart + c, vload(bpart + c) + ((ga + gb) + (gc + gd)));
        for (int ti = 0; ti < 3; ++ti) {
          const T* xp = xw + ti * trs + c;
          V col[NCOL];
          for (int j = 0; j < NCOL; ++j) col[j] = vload(xp + j * C);
          for (int tj = 0; tj < 3; ++tj) {
            T* pp = part + (ti * 3 + tj) * C + c;
            V acc = vload(pp);
            acc += ga * col[tj];
            acc += gb * col[XS + tj];
            acc += gc * col[2 * XS + tj];
            acc += gd * col[3 * XS + tj];
            vstore(pp, acc);
          }
        }
      }
      for (int64_t c = Cv; c < C; ++c)
        for (int k = 0; k < 4; ++k) {
          const T gv = gp[k * gs + c];
          bpart[c] += gv;
          for (int ti = 0; ti < 3; ++ti)
            for (int tj = 0; tj < 3; ++tj)
              part[(ti * 3 + tj) * C + c] += gv * xw[ti * trs + (XS * k + tj) * C + c];
        }
    }
    for (; w < Wo; ++w) {  // the row's last pixels, one at a time
      const T* gp = gr + w * gs;
      const T* xw = xr + XS * w * C;
      int64_t c = 0;
      for (; c < Cv; c += VB) {
        const V gv = vload(gp + c);
        vstore(bpart + c, vload(bpart + c) + gv);
        for (int ti = 0; ti < 3; ++ti)
          for (int tj = 0; tj < 3; ++tj) {
            T* pp = part + (ti * 3 + tj) * C + c;
            vstore(pp, vload(pp) + gv * vload(xw + ti * trs + tj * C + c));
          }
      }
      for (; c < C; ++c) {
        const T gv = gp[c];
        bpart[c] += gv;
        for (int ti = 0; ti < 3; ++ti)
          for (int tj = 0; tj < 3; ++tj)
            part[(ti * 3 + tj) * C + c] += gv * xw[ti * trs + tj * C + c];
      }
    }
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
// SA + bi * istride (istride 0: one image's scratch, reused). x, dy and saved may be 16-bit
// storage (I = bf16_t, widened on load); dx is T (t.x is not read: x is passed apart).
template <typename T, int S, int ACT, typename I>
void pass1_tiles_pm(const Runtime& rt, const BlockDesc& d, const Plan& pl,
                    const BlockTensors<T>& t, const I* x, const T* wt, const I* gy,
                    const I* saved, const T* wp, const bf16_t* wpv, T* dx, T* SA, T* SB,
                    int64_t istride, T* part, int64_t t0, int64_t t1, T* b1img) {
  const int64_t HoWo = d.Ho * d.Wo, C = d.C, Wo = d.Wo, Cout = d.Cout, K = pl.Ktot;
  const int64_t XR = (d.W + 2) * C, BR = (Wo + 2) * C;
  const PartLayout L(d, pl);
  const bool identity = d.residual && !d.projection;
  const bool need_pre = kNeedsPreact<ACT>;  // the activation's gradient reads pre
  {
    const int64_t Pmax = pl.R * Wo;
    T* A = tls_buf<T>(0, K * Pmax);
    T* xb = tls_buf<T>(1, (S * (pl.R + 1) + 3) * XR);
    T* b1b = tls_buf<T>(2, (pl.R + 2) * BR);
    T* dA = tls_buf<T>(3, K * Pmax);
    T* G = tls_buf<T>(4, Cout * Pmax);    // planar (Cout x P)
    T* Gpm = tls_buf<T>(5, Cout * Pmax);  // pixel-major (P x Cout)
    T* preAB = need_pre ? tls_buf<T>(6, K * Pmax) : nullptr;
    for (int64_t tile = t0; tile < t1; ++tile) {
      const TileGeom g = tile_geom(d, pl, tile);
      const int64_t P = g.P;
      const int64_t off = d.channels_last ? (g.bi * HoWo + g.r0 * Wo) * Cout
                                          : g.bi * Cout * HoWo + g.r0 * Wo;
      T* SAi = SA + g.bi * istride;
      T* SBi = SB + g.bi * istride;
      // gz in both layouts: planar feeds dW = gz A, pixel-major feeds dA = gz^T W. With the
      // bfloat16 GEMMs and channels_last the planar one is never written in float:
      // tile_grad_gemms_bf16 transposes gz into its rounded operand itself.
      const bool bf16_gemms = std::is_same_v<T, float> && wpv != nullptr;
      const bool g_planar = !(bf16_gemms && d.channels_last);
      if (d.channels_last) {
        tile_gz<T, ACT>(d, gy, saved, off, P, Gpm, part + L.bo, dx, identity);
        if (g_planar) transpose(Gpm, P, Cout, G);
      } else {
        tile_gz<T, ACT>(d, gy, saved, off, P, G, part + L.bo, dx, identity);
        transpose(G, Cout, P, Gpm);
      }
      load_x_band_pm(d, x, g.bi, S * (g.r0 - 1) - 1, S * (g.R + 1) + 3, xb);
      tile_dw_pm<T, S, ACT>(d, pl, t, wt, g, xb, b1b, A, preAB);
      if (b1img)  // keep the tile's own b1 rows for pass 2 (act'(b1) without recomputing)
        for (int64_t k = 1; k <= g.R; ++k)
          memcpy(b1img + (g.r0 + k - 1) * Wo * C, b1b + k * BR + C, sizeof(T) * Wo * C);
      if constexpr (std::is_same_v<T, float>)
        if (bf16_gemms)
          tile_grad_gemms_bf16(rt, d, pl, g_planar ? G : nullptr, Gpm, A, P, wpv, part + L.pw,
                               dA);
      if (!bf16_gemms) tile_grad_gemms<T>(rt, d, pl, G, Gpm, A, P, wp, part + L.pw, dA);
      for (int64_t i = 0; i < g.R; ++i)
        for (int64_t w = 0; w < Wo; ++w) {
          const int64_t p = i * Wo + w;
          T* da = dA + p * K;
          T* db = da + K - C;
          const T* a = A + p * K;
          const T* b = a + K - C;
          const T* pa = need_pre ? preAB + p * K : a;
          const T* pb = need_pre ? preAB + p * K + K - C : b;
          const int64_t spix = (g.r0 + i + 1) * (Wo + 2) + w + 1;
          act_grad<ACT>(da, a, pa, SAi + spix * C, C);
          act_grad<ACT>(db, b, pb, SBi + spix * C, C);
          if (pl.Cs && (d.channels_last || S == 2)) {  // projection: dx at (s r, s w)
            const T* dxs = da + C;
            const int64_t h = S * (g.r0 + i), wi = S * w;
            if (d.channels_last) {
              copy_n(dx + ((g.bi * d.H + h) * d.W + wi) * C, dxs, C);
            } else {
              T* o = dx + (g.bi * C * d.H + h) * d.W + wi;
              for (int64_t c = 0; c < C; ++c) o[c * d.H * d.W] = dxs[c];
            }
          }
        }
      // NCHW at stride 1: the projection's dx rows from the tile's rows of dA, transposed
      // (element by element, the stores strided by H W took 5% of paper-u2's backward)
      if (pl.Cs && !d.channels_last && S == 1)
        for (int64_t i = 0; i < g.R; ++i)
          transpose_ld<T>(dA + i * Wo * K + C, K, Wo, C,
                          dx + (g.bi * C * d.H + g.r0 + i) * d.W, d.H * d.W);
      // zero borders of the padded scratch that this tile owns
      const int64_t SR = (Wo + 2) * C;
      const int64_t srow0 = (g.r0 + 1) * SR;  // first row of the tile
      for (int64_t i = 0; i < g.R; ++i) {
        zero_n(SAi + srow0 + i * SR, C);
        zero_n(SBi + srow0 + i * SR, C);
        zero_n(SAi + srow0 + i * SR + (Wo + 1) * C, C);
        zero_n(SBi + srow0 + i * SR + (Wo + 1) * C, C);
      }
      if (g.r0 == 0) {
        zero_n(SAi + srow0 - SR, SR);
        zero_n(SBi + srow0 - SR, SR);
      }
      if (g.r0 + g.R == d.Ho) {
        zero_n(SAi + srow0 + g.R * SR, SR);
        zero_n(SBi + srow0 + g.R * SR, SR);
      }
      // depthwise weight grads (tap-major partials): dwa from x, dwc from the b1 band, with
      // the branch gradients read back from the scratch rows just written (still in cache)
      dw_grad_tile<S>(SAi + srow0 + C, SR, C, g.R, Wo, xb + S * XR, S * XR, XR, C,
                      part + L.wa, part + L.ba);
      dw_grad_tile<1>(SBi + srow0 + C, SR, C, g.R, Wo, b1b, BR, BR, C, part + L.wc, part + L.bc);
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
  constexpr bool two = kTwoRows;  // rows two at a time (dw_row2_pm), the same bits
  // db1 = conv(db, rot wc) over db rows q - 1 .. q + 1 (padded scratch rows q .. q + 2)
  for (int64_t k = 0; k < g.R + 2;) {
    const int64_t q = g.r0 - 1 + k;
    T* row = d1 + k * SR;
    if (q < 0 || q >= Ho) {
      zero_n(row, SR);
      ++k;
      continue;
    }
    const int64_t n = two && k + 1 < g.R + 2 && q + 1 < Ho ? 2 : 1;
    for (int64_t j = 0; j < n; ++j) {
      zero_n(row + j * SR, C);
      zero_n(row + j * SR + (Wo + 1) * C, C);
    }
    if constexpr (two)
      if (n == 2) {
        dw_row2_pm<kActNone>(sb + (q - 1) * SR - C, SR, C, Wo, wtr + 18 * C,
                             (const T*)nullptr, row + C, (T*)nullptr, C, SR);
        k += n;
        continue;
      }
    dw_row_pm<1, kActNone>(sb + (q - 1) * SR - C, SR, C, Wo, wtr + 18 * C, (const T*)nullptr,
                           row + C, (T*)nullptr, C);
    ++k;
  }
  if (ACT != kActNone)  // times act'(b1)
    for (int64_t k = 0; k < g.R + 2; ++k) {
      const int64_t q = g.r0 - 1 + k;
      if (q < 0 || q >= Ho) continue;
      T* row = d1 + k * SR;
      const T* b1 = post;
      if (b1img)  // b1 row q as pass 1 computed it (relu, relu6)
        b1 = b1img + q * b1rs;
      else
        dw_row_pm<1, ACT>(xb + k * XR, XR, C, Wo, wbt, t.bb, post,
                          kNeedsPreact<ACT> ? pre : nullptr, C);
      act_grad<ACT>(row + C, b1, pre, row + C, Wo * C);
    }
  dw_grad_tile<1>(d1 + SR + C, SR, C, g.R, Wo, xb + XR, XR, XR, C, part + L.wb, part + L.bb);
  T* tmp = post;  // two rows of Wo x C
  const int64_t HW = d.H * d.W;
  for (int64_t i = 0; i < g.R;) {
    const int64_t h = g.r0 + i;
    const int64_t n = two && i + 1 < g.R ? 2 : 1;
    T* out = d.channels_last ? dx + ((g.bi * d.H + h) * d.W) * C : tmp;
    // dx rows h (, h + 1): conv(da, rot wa) over rows h - 1 .. h + 1, then conv(db1, rot
    // wb) on top
    const int64_t orow = d.channels_last ? d.W * C : Wo * C;  // out's next row
    if (n == 2) {
      if constexpr (two) {
        dw_row2_pm<kActNone>(sa + (h - 1) * SR - C, SR, C, Wo, wtr, (const T*)nullptr, tmp,
                             (T*)nullptr, C, Wo * C, d.channels_last ? (const T*)out : nullptr,
                             orow);
        dw_row2_pm<kActNone>(d1 + i * SR, SR, C, Wo, wtr + 9 * C, (const T*)nullptr, out,
                             (T*)nullptr, C, orow, (const T*)tmp, Wo * C);
      }
    } else {
      dw_row_pm<1, kActNone>(sa + (h - 1) * SR - C, SR, C, Wo, wtr, (const T*)nullptr, tmp,
                             (T*)nullptr, C, d.channels_last ? (const T*)out : nullptr);
      dw_row_pm<1, kActNone>(d1 + i * SR, SR, C, Wo, wtr + 9 * C, (const T*)nullptr, out,
                             (T*)nullptr, C, (const T*)tmp);
    }
    if (!d.channels_last)
      for (int64_t j = 0; j < n; ++j)
        add_transposed(tmp + j * Wo * C, C, Wo, C, dx + (g.bi * C * d.H + h + j) * d.W, HW);
    i += n;
  }
}

// Tiles [t0, t1), after pass 1 has run on them and on the tiles beside them (same scratch
// addressing and storage types as pass1_tiles_pm).
template <typename T, int S, int ACT, typename I>
void pass2_tiles_pm(const BlockDesc& d, const Plan& pl, const BlockTensors<T>& t, const I* x,
                    const T* wt, const T* wtr, T* dx, const T* SA, const T* SB, int64_t istride,
                    T* part, int64_t t0, int64_t t1, const T* b1img, int64_t b1rs,
                    const T* xband) {
  const int64_t C = d.C, Wo = d.Wo, Ho = d.Ho, W = d.W, XR = (W + 2) * C;
  const PartLayout L(d, pl);
  const T* wat = wt;
  const T* wbt = wt + 9 * C;
  const T* wct = wt + 18 * C;
  {
    T* xb = tls_buf<T>(8, (S * (pl.R + 1) + 3) * XR);
    T* d1 = tls_buf<T>(9, (pl.R + 2) * (Wo + 2) * C);
    T* pre = tls_buf<T>(10, Wo * C);
    T* post = tls_buf<T>(11, 2 * Wo * C);  // two rows: pass2_tile_s1's tmp
    T* acc = tls_buf<T>(12, C);
    for (int64_t tile = t0; tile < t1; ++tile) {
      const TileGeom g = tile_geom(d, pl, tile);
      const int64_t q_lo = g.r0 - 1;
      if (xband)  // pass 1's band of this tile, still in its buffer (one band per image)
        xb = const_cast<T*>(xband);
      else
        load_x_band_pm(d, x, g.bi, S * (g.r0 - 1) - 1, S * (g.R + 1) + 3, xb);
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
        // b1 (and its pre-activation when act' reads it) recomputed for this row
        if (ACT != kActNone && q >= 0 && q < Ho)
          dw_row_pm<S, ACT>(xb + S * k * XR, XR, C, Wo, wbt, t.bb, post,
                            kNeedsPreact<ACT> ? pre : nullptr, C);
        for (int64_t w = 0; w < Wo; ++w) {
          T* o = d1 + (k * Wo + w) * C;
          if (q < 0 || q >= Ho) {
            zero_n(o, C);
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
      dw_grad_tile<S>(d1 + Wo * C, Wo * C, C, g.R, Wo, xb + S * XR, S * XR, XR, C, part + L.wb,
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
// x, dy, saved and dx are I: T, or 16-bit storage (bf16_t). The per-image plan sums each
// image's dx in a thread-local T buffer (dx itself for T storage) and rounds it once into
// dx; the two-pass plan sums into dxacc (x's size, T; dx itself for T storage), which the
// caller rounds. The caller zeroes dx (T storage) or dxacc beforehand unless pass 1 writes
// all of it (residual at stride 1).
template <typename T, int S, int ACT, typename I>
void backward_pm(const Runtime& rt, const BlockDesc& d, const Plan& pl, const BlockTensors<T>& t,
                 const I* x, const T* wt, const T* wtr, const I* gy, const I* saved,
                 const T* wp, const bf16_t* wpv, I* dx, T* dxacc, T* SA, T* SB, T* parts) {
  constexpr bool same = std::is_same_v<T, I>;
  const int64_t istride = d.C * (d.Ho + 2) * (d.Wo + 2);
  if (pl.per_image) {
    const int64_t ximg = d.C * d.H * d.W, yimg = d.Cout * d.Ho * d.Wo;
    // pass 1 writes all of dx only with a residual at stride 1
    const bool dx_zero = !(d.residual && d.stride == 1);
    auto task = [&](int64_t chunk) {
      const int64_t i0 = chunk * d.B / pl.nchunks, i1 = (chunk + 1) * d.B / pl.nchunks;
      T* part = parts + chunk * pl.part;
      memset(part, 0, sizeof(T) * pl.part);
      T* sa = tls_buf<T>(14, istride);
      T* sb = tls_buf<T>(15, istride);
      T* dxbuf = same ? nullptr : tls_buf<T>(16, ximg);
      // b1 of the image kept from pass 1 (stride 1, an activation whose act' reads the output).
      // With one band per image, pass 1's own b1 band and x band buffers (tls slots 2 and 1)
      // still hold the image when pass 2 runs: read them in place, no copy, no reload.
      const bool keep_b1 = S == 1 && act_saves(ACT) == kSavesOutput;
      const bool one_band = pl.nbands == 1;
      const int64_t BR = (d.Wo + 2) * d.C;
      T* b1copy = keep_b1 && !one_band ? tls_buf<T>(13, d.Ho * d.Wo * d.C) : nullptr;
      const T* b1i = !keep_b1 ? nullptr
                     : one_band ? tls_buf<T>(2, (pl.R + 2) * BR) + BR + d.C : b1copy;
      const int64_t b1rs = one_band ? BR : d.Wo * d.C;
      const T* xband =
          one_band ? tls_buf<T>(1, (S * (pl.R + 1) + 3) * (d.W + 2) * d.C) : nullptr;
      // Each image as a batch of one (both layouts keep an image contiguous): tiles
      // [0, nbands) of image 0 at the image's offset.
      for (int64_t img = i0; img < i1; ++img) {
        const I* xi = x + img * ximg;
        const I* gyi = gy + img * yimg;
        const I* svi = saved ? saved + img * yimg : nullptr;
        T* dxi;
        if constexpr (same)
          dxi = dx + img * ximg;
        else
          dxi = dxbuf;
        if (!same && dx_zero) memset(dxi, 0, sizeof(T) * ximg);
        pass1_tiles_pm<T, S, ACT>(rt, d, pl, t, xi, wt, gyi, svi, wp, wpv, dxi, sa, sb, 0, part,
                                  0, pl.nbands, b1copy);
        pass2_tiles_pm<T, S, ACT>(d, pl, t, xi, wt, wtr, dxi, sa, sb, 0, part, 0, pl.nbands, b1i,
                                  b1rs, xband);
        if constexpr (!same) round_to(dxi, ximg, dx + img * ximg);
      }
      if (wpv) rt.brgemm_release();  // AMX tiles: see forward_pm_bf16
    };
    par_for(rt, pl.nchunks, task);
    rt.brgemm_release();
    return;
  }
  auto task1 = [&](int64_t chunk) {
    const int64_t t0 = chunk * pl.ntiles / pl.nchunks, t1 = (chunk + 1) * pl.ntiles / pl.nchunks;
    T* part = parts + chunk * pl.part;
    memset(part, 0, sizeof(T) * pl.part);
    pass1_tiles_pm<T, S, ACT>(rt, d, pl, t, x, wt, gy, saved, wp, wpv, dxacc, SA, SB, istride,
                              part, t0, t1, (T*)nullptr);
    if (wpv) rt.brgemm_release();  // AMX tiles: see forward_pm_bf16
  };
  par_for(rt, pl.nchunks, task1);
  rt.brgemm_release();
  auto task2 = [&](int64_t chunk) {
    const int64_t t0 = chunk * pl.ntiles / pl.nchunks, t1 = (chunk + 1) * pl.ntiles / pl.nchunks;
    pass2_tiles_pm<T, S, ACT>(d, pl, t, x, wt, wtr, dxacc, SA, SB, istride,
                              parts + chunk * pl.part, t0, t1, (const T*)nullptr, 0,
                              (const T*)nullptr);
  };
  par_for(rt, pl.nchunks, task2);
}


MSFUSED_KERNEL_END
