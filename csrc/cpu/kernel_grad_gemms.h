// The GEMMs of a backward tile (pixel-major pass 1), in the compute type or, for bfloat16
// calls on CPUs with a native bfloat16 GEMM (Runtime::bbrgemm), with bfloat16 operands and
// float32 sums:
//   dW_pointwise (+ projection) += G A      (G: Cout x P, A: P x Ktot)
//   dA                           = Gpm W    (Gpm: P x Cout, W packed N x (C + Cs) per half)
// In the bfloat16 form G, Gpm and A are rounded to bfloat16 per tile (what eager bfloat16
// autograd multiplies: its a, b and output gradients are bfloat16 tensors); the weight
// gradient still accumulates in float32, in the same fixed order, so it stays deterministic.
#pragma once
#include "cpu/kernel_tiles.h"

MSFUSED_KERNEL_BEGIN

// B (K x N, row-major, float) as bfloat16 in the VNNI layout of oneDNN's bfloat16 brgemm:
// rows taken in pairs and interleaved, out[(k / 2) * 2 * ldb + 2 * n + k % 2] = B[k * ldi + n];
// K rounded up to even and the columns N .. ldb - 1 filled with zeros.
inline void pack_vnni(const float* B, int64_t K, int64_t N, int64_t ldi, int64_t ldb,
                      bf16_t* out) {
  const int64_t Kp = ceil_div(K, 2) * 2;
  memset(out, 0, sizeof(bf16_t) * Kp * ldb);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n)
      out[(k / 2) * 2 * ldb + 2 * n + k % 2] = float_to_bf16(B[k * ldi + n]);
}

// The pointwise weights of the backward's dA GEMM as VNNI bfloat16 B operands (N even):
// add, the whole packed W (N x Ktot); concat, each half (N x (C + Cs)) after the other.
inline void pack_grad_weights_vnni(const BlockDesc& d, const Plan& pl, const float* wp,
                                   bf16_t* out) {
  const int64_t N = d.N, kk = d.merge == kAdd ? pl.Ktot : d.C + pl.Cs;
  for (int64_t m = 0; m < (d.merge == kAdd ? 1 : 2); ++m)
    pack_vnni(wp + m * N * kk, N, kk, kk, kk, out + m * N * kk);
}

// Row-major GEMMs of one tile in the compute type (Runtime::sbrgemm for float).
template <typename T>
void tile_grad_gemms(const Runtime& rt, const BlockDesc& d, const Plan& pl, const T* G,
                     const T* Gpm, const T* A, int64_t P, const T* wp, T* dW, T* dA) {
  const int64_t N = d.N, C = d.C, K = pl.Ktot, Cout = d.Cout;
  if (d.merge == kAdd) {
    mm_nn<T>(rt, N, K, P, G, P, A, K, dW, K, true);
    mm_nn<T>(rt, P, K, N, Gpm, Cout, wp, K, dA, K, false);
  } else {
    const int64_t kk = C + pl.Cs;
    mm_nn<T>(rt, N, kk, P, G, P, A, K, dW, kk, true);
    mm_nn<T>(rt, N, kk, P, G + N * P, P, A + C, K, dW + N * kk, kk, true);
    mm_nn<T>(rt, P, kk, N, Gpm, Cout, wp, kk, dA, K, false);
    if (pl.Cs)
      for (int64_t p = 0; p < P; ++p) zero_n(dA + p * K + kk, C);
    mm_nn<T>(rt, P, kk, N, Gpm + N, Cout, wp + N * kk, kk, dA + C, K, pl.Cs > 0);
  }
}

// The same GEMMs with bfloat16 operands (Runtime::bbrgemm). wpv: pack_grad_weights_vnni.
// G may be null: Gb is then transposed from Gpm (channels_last, where pass 1 has G only so).
// The dW GEMM reduces over pixels, so A goes in as a VNNI B operand paired along pixels
// (an odd P padded with a zero pixel, G with a zero column); the dA GEMM reduces over the
// N output channels of a half (N even: the binding's condition).
inline void tile_grad_gemms_bf16(const Runtime& rt, const BlockDesc& d, const Plan& pl,
                                 const float* G, const float* Gpm, const float* A, int64_t P,
                                 const bf16_t* wpv, float* dW, float* dA) {
  constexpr int VN = Vec<float>::n;
  const int64_t N = d.N, C = d.C, K = pl.Ktot, Cout = d.Cout, Pp = ceil_div(P, 2) * 2;
  const int64_t Pmax = ceil_div(pl.R * d.Wo, 2) * 2;
  bf16_t* Gb = tls_buf<bf16_t>(0, Cout * Pmax);   // G rounded, Cout x Pp
  bf16_t* Gpmb = tls_buf<bf16_t>(1, Pmax * Cout); // Gpm rounded, P x Cout
  bf16_t* Av = tls_buf<bf16_t>(2, Pmax * K);      // A rounded, VNNI pairs of pixels
  if (G) {
    for (int64_t co = 0; co < Cout; ++co) round_to(G + co * P, P, Gb + co * Pp);
  } else {  // transposed from Gpm and rounded in one pass (the same bits)
    transpose(Gpm, P, Cout, Gb, Pp);
  }
  if (Pp > P)
    for (int64_t co = 0; co < Cout; ++co) Gb[co * Pp + P] = 0;
  round_to(Gpm, P * Cout, Gpmb);
  // Av[(p / 2) * 2K + 2k + p % 2] = A[p][k]: one 32-bit lane holds pixels p, p + 1 of column k
  for (int64_t p = 0; p < Pp; p += 2) {
    const float* r0 = A + p * K;
    const float* r1 = p + 1 < P ? r0 + K : nullptr;
    bf16_t* o = Av + p * K;
    int64_t k = 0;
#if defined(MSFUSED_HW_BF16) && MSFUSED_VEC_BYTES == 64
    if (r1)
      for (; k + VN <= K; k += VN)  // r0's 16 then r1's 16 words, interleaved
        _mm512_storeu_si512(o + 2 * k,
                            _mm512_permutexvar_epi16(bf16_pair_index(),
                                                     (__m512i)_mm512_cvtne2ps_pbh(
                                                         (__m512)vload(r1 + k), (__m512)vload(r0 + k))));
#else
    typedef uint32_t U __attribute__((vector_size(4 * VN), aligned(4)));
    if (r1)
      for (; k + VN <= K; k += VN)
        *reinterpret_cast<U*>(o + 2 * k) = bf16_bits(vload(r0 + k)) | (bf16_bits(vload(r1 + k)) << 16);
#endif
    for (; k < K; ++k) {
      o[2 * k] = float_to_bf16(r0[k]);
      o[2 * k + 1] = r1 ? float_to_bf16(r1[k]) : bf16_t(0);
    }
  }
  if (d.merge == kAdd) {
    rt.bbrgemm(N, K, Pp, Pp, K, K, true, Gb, Av, dW);
    rt.bbrgemm(P, K, N, Cout, K, K, false, Gpmb, wpv, dA);
  } else {
    const int64_t kk = C + pl.Cs;
    rt.bbrgemm(N, kk, Pp, Pp, K, kk, true, Gb, Av, dW);
    rt.bbrgemm(N, kk, Pp, Pp, K, kk, true, Gb + N * Pp, Av + 2 * C, dW + N * kk);
    rt.bbrgemm(P, kk, N, Cout, kk, K, false, Gpmb, wpv, dA);
    if (pl.Cs)
      for (int64_t p = 0; p < P; ++p) zero_n(dA + p * K + kk, C);
    rt.bbrgemm(P, kk, N, Cout, kk, K, pl.Cs > 0, Gpmb + N, wpv + N * kk, dA + C);
  }
}

MSFUSED_KERNEL_END
