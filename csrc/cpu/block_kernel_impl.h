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
#include <type_traits>

#include "cpu/block_kernel.h"
#include "cpu/kernel_pixel_major.h"
#include "cpu/kernel_planar.h"

namespace msfused {
namespace cpu {
namespace MSFUSED_ISA {
namespace {

// x, y and pre are I: T, or bfloat16 storage (bf16_t: the bfloat16 forward without native
// bfloat16 GEMMs; t.x is then unused), the weights always T.
template <typename T, int S, int ACT, typename I>
void forward_impl(const Runtime& rt, const BlockDesc& d, const BlockTensors<T>& t, const I* x,
                  I* y, I* pre_out) {
  const Plan pl = make_plan(d, false, rt.num_threads);
  Buf<T> wp(packed_weight_elems(d, pl)), bias(d.Cout);
  pack_weights(d, pl, t, wp.p, bias.p);
  if (pl.pixel_major)
    forward_pm<T, S, ACT>(rt, d, pl, t, x, wp.p, bias.p, y, pre_out);
  else
    forward_planar<T, S, ACT>(rt, d, pl, t, x, wp.p, bias.p, y, pre_out);
}

// x, dy, saved and dx are I: T, or bfloat16 storage (bf16_t: the bfloat16 backward; t.x and
// g.dx are then unused), the weights and their gradients always T.
template <typename T, int S, int ACT, typename I>
void backward_impl(const Runtime& rt, const BlockDesc& d, const BlockTensors<T>& t,
                   const I* x, const I* gy, const I* saved, I* dx, const BlockGrads<T>& g,
                   T* scratch) {
  constexpr bool same = std::is_same_v<T, I>;
  const Plan pl = make_plan(d, true);
  const BackwardScratch sl = backward_scratch(d, pl);
  const int64_t C = d.C, N = d.N, Cs = pl.Cs, Cout = d.Cout;
  const int64_t xsz = d.B * C * d.H * d.W;
  T* SA = scratch + sl.sa;
  T* SB = scratch + sl.sb;
  T* parts = scratch + sl.parts;
  Buf<T> wp(packed_weight_elems(d, pl)), bias(Cout);
  pack_weights(d, pl, t, wp.p, bias.p);
  // dx sums in T: in dx itself for T storage; for 16-bit storage in thread-local image
  // buffers (per-image plan, backward_pm) or else in dxf, rounded once at the end.
  const bool per_image_pm = pl.pixel_major && pl.per_image;
  Buf<T> dxf(!same && !per_image_pm ? xsz : 0);
  T* dxacc;
  if constexpr (same)
    dxacc = dx;
  else
    dxacc = dxf.p;
  // With a residual at stride 1, pass 1 writes every element of dx (the identity or
  // projection part) before pass 2 adds to it; otherwise start from zero.
  if ((same || !per_image_pm) && !(d.residual && d.stride == 1))
    memset(dxacc, 0, sizeof(T) * xsz);
  if (pl.pixel_major) {
    Buf<T> wt(27 * C), wtr(27 * C);
    pack_dw_tapmajor(d, t, wt.p);
    for (int k = 0; k < 3; ++k)  // kernels rotated by 180 degrees: tap t <- tap 8 - t
      for (int tap = 0; tap < 9; ++tap)
        memcpy(wtr.p + (k * 9 + tap) * C, wt.p + (k * 9 + 8 - tap) * C, sizeof(T) * C);
    // bfloat16 operands for the tile GEMMs (kernel_grad_gemms.h) when the call's tensors
    // were bfloat16 and the CPU multiplies them natively
    const bool bf16 = std::is_same_v<T, float> && rt.bf16_products;
    Buf<bf16_t> wpv(bf16 ? packed_weight_elems(d, pl) : 0);
    if constexpr (std::is_same_v<T, float>)
      if (bf16) pack_grad_weights_vnni(d, pl, wp.p, wpv.p);
    backward_pm<T, S, ACT>(rt, d, pl, t, x, wt.p, wtr.p, gy, saved, wp.p,
                           bf16 ? wpv.p : nullptr, dx, dxacc, SA, SB, parts);
  } else {
    backward_pass1<T, S, ACT>(rt, d, pl, t, x, gy, saved, wp.p, dxacc, SA, SB, parts);
    backward_pass2<T, S, ACT>(rt, d, pl, t, x, dxacc, SA, SB, parts);
  }
  if constexpr (!same)
    if (!per_image_pm) {
      auto round_dx = [&](int64_t blk) {
        const int64_t e0 = blk * 65536, n = xsz - e0 < 65536 ? xsz - e0 : 65536;
        round_to(dxacc + e0, n, dx + e0);
      };
      par_for(rt, ceil_div(xsz, 65536), round_dx);
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
template <typename F>
void dispatch(const BlockDesc& d, F&& f) {
  dispatch_act(d.act, [&](auto act) {
    if (d.stride == 1)
      f(std::integral_constant<int, 1>{}, act);
    else
      f(std::integral_constant<int, 2>{}, act);
  });
}

}  // namespace

// MSFUSED_BF16_ONLY (block_kernel_avx512bf16.cpp): only the bfloat16-storage entry points.
#ifndef MSFUSED_BF16_ONLY
template <typename T>
void block_forward(const Runtime& rt, const BlockDesc& d, const BlockTensors<T>& t, T* y,
                   T* pre) {
  dispatch(d, [&](auto s, auto act) {
    forward_impl<T, decltype(s)::value, decltype(act)::value>(rt, d, t, t.x, y, pre);
  });
}

#endif

void block_forward_bf16_f32(const Runtime& rt, const BlockDesc& d, const BlockTensors<float>& t,
                            const uint16_t* x, uint16_t* y, uint16_t* pre) {
  dispatch(d, [&](auto s, auto act) {
    forward_impl<float, decltype(s)::value, decltype(act)::value>(rt, d, t, x, y, pre);
  });
}

#ifndef MSFUSED_BF16_ONLY
template <typename T>
void block_backward(const Runtime& rt, const BlockDesc& d, const BlockTensors<T>& t,
                    const T* grad_y, const T* saved, const BlockGrads<T>& g, T* scratch) {
  dispatch(d, [&](auto s, auto act) {
    backward_impl<T, decltype(s)::value, decltype(act)::value>(rt, d, t, t.x, grad_y, saved,
                                                               g.dx, g, scratch);
  });
}

#endif

void block_backward_bf16(const Runtime& rt, const BlockDesc& d, const BlockTensors<float>& t,
                         const uint16_t* x, const uint16_t* grad_y, const uint16_t* saved,
                         const BlockGrads<float>& g, uint16_t* dx, float* scratch) {
  dispatch(d, [&](auto s, auto act) {
    backward_impl<float, decltype(s)::value, decltype(act)::value>(rt, d, t, x, grad_y, saved,
                                                                   dx, g, scratch);
  });
}

#if defined(MSFUSED_HAVE_F16) && !defined(MSFUSED_BF16_ONLY)
// float16 calls: the same kernels on float16 storage (f16_t), as for bfloat16 without
// native bfloat16 GEMMs.
void block_forward_f16_f32(const Runtime& rt, const BlockDesc& d, const BlockTensors<float>& t,
                           const uint16_t* x, uint16_t* y, uint16_t* pre) {
  const f16_t* xh = reinterpret_cast<const f16_t*>(x);
  f16_t* yh = reinterpret_cast<f16_t*>(y);
  f16_t* ph = reinterpret_cast<f16_t*>(pre);
  dispatch(d, [&](auto s, auto act) {
    forward_impl<float, decltype(s)::value, decltype(act)::value>(rt, d, t, xh, yh, ph);
  });
}

void block_backward_f16(const Runtime& rt, const BlockDesc& d, const BlockTensors<float>& t,
                        const uint16_t* x, const uint16_t* grad_y, const uint16_t* saved,
                        const BlockGrads<float>& g, uint16_t* dx, float* scratch) {
  auto h = [](const uint16_t* p) { return reinterpret_cast<const f16_t*>(p); };
  dispatch(d, [&](auto s, auto act) {
    backward_impl<float, decltype(s)::value, decltype(act)::value>(
        rt, d, t, h(x), h(grad_y), h(saved), reinterpret_cast<f16_t*>(dx), g, scratch);
  });
}
#endif

#ifndef MSFUSED_BF16_ONLY
// The float32 and float64 entry points; the AVX-512 build has float32 only
// (MSFUSED_NO_FLOAT64: float64 runs on AVX2, for gradcheck, and a copy of the float64
// kernels less to compile).
template void block_forward<float>(const Runtime&, const BlockDesc&, const BlockTensors<float>&,
                                   float*, float*);
template void block_backward<float>(const Runtime&, const BlockDesc&,
                                    const BlockTensors<float>&, const float*, const float*,
                                    const BlockGrads<float>&, float*);
#ifndef MSFUSED_NO_FLOAT64
template void block_forward<double>(const Runtime&, const BlockDesc&,
                                    const BlockTensors<double>&, double*, double*);
template void block_backward<double>(const Runtime&, const BlockDesc&,
                                     const BlockTensors<double>&, const double*, const double*,
                                     const BlockGrads<double>&, double*);
#endif
#endif

}  // namespace MSFUSED_ISA
}  // namespace cpu
}  // namespace msfused
