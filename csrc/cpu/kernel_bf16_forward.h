// The bfloat16 forward of the pixel-major path (C >= kPixelMajorMinC), for CPUs whose
// oneDNN brgemm computes bfloat16 products natively (AMX tiles or AVX512-BF16 dot products;
// oneDNN picks at run time). Same tiles as forward_pm, with the storage types changed:
//   x is read as bfloat16 into the tile's float32 band (exact), the depthwise convs run in
//   float32 registers (b1 stays float32), a, xs and b are rounded once to bfloat16 as rows
//   of A, the pointwise GEMMs multiply bfloat16 A by bfloat16 weights into float32 sums,
//   and the epilogue (biases, residual, activation) rounds y once.
// Weights arrive as bfloat16 and are widened to float32 once per call (the depthwise taps
// and biases are float32 in the kernels); the pointwise weights go to bfloat16 again in the
// VNNI layout the brgemm reads, which is exact.
#pragma once
#include "cpu/kernel_pixel_major.h"

MSFUSED_KERNEL_BEGIN

// B (K x N, row-major, float) as bfloat16 in the VNNI layout of oneDNN's bfloat16 brgemm:
// rows taken in pairs and interleaved, out[(k / 2) * 2 * ldb + 2 * n + k % 2] = B[k][n];
// K rounded up to even and the columns N .. ldb - 1 filled with zeros.
inline void pack_vnni(const float* B, int64_t K, int64_t N, int64_t ldb, bf16_t* out) {
  const int64_t Kp = ceil_div(K, 2) * 2;
  memset(out, 0, sizeof(bf16_t) * Kp * ldb);
  for (int64_t k = 0; k < K; ++k)
    for (int64_t n = 0; n < N; ++n) out[(k / 2) * 2 * ldb + 2 * n + k % 2] = float_to_bf16(B[k * N + n]);
}

// The weights of a bfloat16 call widened to float32 into one buffer (x is left null).
struct WidenedWeights {
  Buf<float> buf;
  BlockTensors<float> t;
  static int64_t elems(const BlockDesc& d) {
    return 3 * 10 * d.C + 2 * d.N * (d.C + 1) + d.Cout * (d.C + 1);
  }
  WidenedWeights(const BlockDesc& d, const BlockTensors<bf16_t>& b) : buf(elems(d)) {
    float* p = buf.p;
    auto widen = [&p](const bf16_t* src, int64_t n) -> const float* {
      if (!src) return nullptr;
      float* dst = p;
      for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_float(src[i]);
      p += n;
      return dst;
    };
    const int64_t C = d.C, N = d.N;
    t.x = nullptr;
    t.wa = widen(b.wa, 9 * C); t.ba = widen(b.ba, C);
    t.wb = widen(b.wb, 9 * C); t.bb = widen(b.bb, C);
    t.wc = widen(b.wc, 9 * C); t.bc = widen(b.bc, C);
    t.pa = widen(b.pa, N * C); t.qa = widen(b.qa, N);
    t.pb = widen(b.pb, N * C); t.qb = widen(b.qb, N);
    t.ws = widen(b.ws, d.Cout * C); t.bs = widen(b.bs, d.Cout);
  }
};

template <int S, int ACT>
void forward_pm_bf16(const Runtime& rt, const BlockDesc& d, const BlockTensors<bf16_t>& tb,
                     bf16_t* y, bf16_t* pre_out) {
  const Plan pl = make_plan(d, false, rt.num_threads);
  const int64_t HoWo = d.Ho * d.Wo, C = d.C, N = d.N, Cout = d.Cout, K = pl.Ktot;
  const WidenedWeights w(d, tb);
  Buf<float> wp(packed_weight_elems(d, pl)), bias(Cout), wt(27 * C), wT(packed_weight_elems(d, pl));
  pack_weights(d, pl, w.t, wp.p, bias.p);
  pack_dw_tapmajor(d, w.t, wt.p);
  pack_weights_T(d, pl, wp.p, wT.p);
  // One GEMM over all of A (add) or one per output half over its C + Cs columns (concat).
  // B's leading dimension a multiple of 16 columns (zero-padded), which AMX tiles want.
  const int64_t nmat = d.merge == kAdd ? 1 : 2, kk = d.merge == kAdd ? K : C + pl.Cs;
  const int64_t ldb = ceil_div(N, 16) * 16, kpad = ceil_div(kk, 2) * 2;
  Buf<bf16_t> wv(nmat * kpad * ldb);
  for (int64_t m = 0; m < nmat; ++m) pack_vnni(wT.p + m * kk * N, kk, N, ldb, wv.p + m * kpad * ldb);
  const bool identity = d.residual && !d.projection;
  auto task = [&](int64_t tile) {
    const int64_t Pmax = pl.R * d.Wo;
    bf16_t* A = tls_buf<bf16_t>(0, K * Pmax);
    float* xb = tls_buf<float>(1, (S * (pl.R + 1) + 3) * (d.W + 2) * C);
    float* b1b = tls_buf<float>(2, (pl.R + 2) * (d.Wo + 2) * C);
    float* ybuf = tls_buf<float>(3, Pmax * Cout);
    const TileGeom g = tile_geom(d, pl, tile);
    load_x_band_pm(d, tb.x, g.bi, S * (g.r0 - 1) - 1, S * (g.R + 1) + 3, xb);
    tile_dw_pm<float, S, ACT>(d, pl, w.t, wt.p, g, xb, b1b, A, nullptr);
    for (int64_t m = 0; m < nmat; ++m)  // concat: the second half reads A from column C
      rt.bbrgemm(g.P, N, kk, K, ldb, Cout, false, A + m * C, wv.p + m * kpad * ldb, ybuf + m * N);
    const int64_t off = d.channels_last ? (g.bi * HoWo + g.r0 * d.Wo) * Cout
                                        : g.bi * Cout * HoWo + g.r0 * d.Wo;
    epilogue<float, ACT>(d, ybuf, Cout, 1, y + off, identity ? tb.x + off : nullptr,
                         pre_out ? pre_out + off : nullptr, bias.p, g.P);
    // Every thread gives the AMX tiles back after each tile, not just the caller after the
    // loop: PyTorch's brgemm remembers per thread which kernel last configured the tiles
    // and skips reconfiguring, but oneDNN's own AMX primitives (eager bfloat16 convs) release
    // the tiles in between, and a tile instruction without a configuration is SIGILL.
    rt.brgemm_release();
  };
  par_for(rt, pl.ntiles, task);
}

MSFUSED_KERNEL_END
