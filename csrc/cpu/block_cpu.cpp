// CPU binding of msfused::block_forward / block_backward: checks arguments (shared with
// CUDA, csrc/block_args.cpp), allocates outputs and scratch, and runs the fused kernels
// with ATen's thread pool and the BLAS that PyTorch itself links.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <dlfcn.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <new>

#include "block_args.h"
#include "cpu/block_kernel.h"
#include "cpu/output_cache.h"
#include "cpu/tiling.h"

namespace msfused {
namespace cpu {
namespace {

// ---- BLAS: PyTorch's own (MKL's Fortran symbols in x86-64 wheels), else at::mm ---------

using sgemm64_t = void (*)(const char*, const char*, const int64_t*, const int64_t*,
                           const int64_t*, const float*, const float*, const int64_t*,
                           const float*, const int64_t*, const float*, float*, const int64_t*);
using dgemm64_t = void (*)(const char*, const char*, const int64_t*, const int64_t*,
                           const int64_t*, const double*, const double*, const int64_t*,
                           const double*, const int64_t*, const double*, double*,
                           const int64_t*);

void* find_symbol(const char* name) {
  static const char* const libs[] = {"libtorch_cpu.so", "libmkl_rt.so", "libopenblas.so",
                                     nullptr};
  for (const char* lib : libs) {
    void* h = lib ? dlopen(lib, RTLD_LAZY | RTLD_NOLOAD) : RTLD_DEFAULT;
    if (!h && lib) continue;
    if (void* s = dlsym(h, name)) return s;
  }
  return nullptr;
}

// MSFUSED_NO_BLAS=1 exercises the fallbacks (at::mm instead of BLAS and the micro-kernel).
bool no_blas() {
  static const bool v = std::getenv("MSFUSED_NO_BLAS") != nullptr;
  return v;
}

struct Blas {
  sgemm64_t sgemm = nullptr;
  dgemm64_t dgemm = nullptr;
  Blas() {
    if (no_blas()) return;
    // ILP64 entry points only: their integer width is unambiguous.
    sgemm = reinterpret_cast<sgemm64_t>(find_symbol("SGEMM_64"));
    if (!sgemm) sgemm = reinterpret_cast<sgemm64_t>(find_symbol("sgemm_64"));
    dgemm = reinterpret_cast<dgemm64_t>(find_symbol("DGEMM_64"));
    if (!dgemm) dgemm = reinterpret_cast<dgemm64_t>(find_symbol("dgemm_64"));
  }
};

const Blas& blas() {
  static Blas b;
  return b;
}

// Column-major matrix (rows x cols, leading dimension ld) as a tensor view.
template <typename T>
at::Tensor cm_view(const T* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<T*>(p), {rows, cols}, {1, ld},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
}

template <typename T>
void gemm_fallback(char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a,
                   int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc) {
  at::Tensor A = ta == 'N' ? cm_view(a, m, k, lda) : cm_view(a, k, m, lda).t();
  at::Tensor B = tb == 'N' ? cm_view(b, k, n, ldb) : cm_view(b, n, k, ldb).t();
  at::Tensor C = cm_view(c, m, n, ldc);
  at::Tensor r = k > 0 ? at::mm(A, B) : at::zeros({m, n}, C.options());
  if (alpha != T(1)) r.mul_(alpha);
  if (beta == T(0)) C.copy_(r); else C.mul_(beta).add_(r);
}

void sgemm(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (auto f = blas().sgemm) {
    if (k == 0) {  // BLAS scales C by beta; keep it simple and explicit
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < m; ++i) c[i + j * ldc] = beta == 0.f ? 0.f : beta * c[i + j * ldc];
      return;
    }
    f(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  } else {
    gemm_fallback<float>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

void dgemm(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
           int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  if (auto f = blas().dgemm) {
    if (k == 0) {
      for (int64_t j = 0; j < n; ++j)
        for (int64_t i = 0; i < m; ++i) c[i + j * ldc] = beta == 0. ? 0. : beta * c[i + j * ldc];
      return;
    }
    f(&ta, &tb, &m, &n, &k, &alpha, a, &lda, b, &ldb, &beta, c, &ldc);
  } else {
    gemm_fallback<double>(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
  }
}

void sbrgemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
             const float* a, const float* b, float* c) {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  if (!no_blas()) {
    at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, a, b, c);
    return;
  }
#endif
  // row-major C = A B  <=>  column-major C^T = B^T A^T
  sgemm('N', 'N', N, M, K, 1.f, b, ldb, a, lda, add ? 1.f : 0.f, c, ldc);
}

void brgemm_release() {
#if defined(CPUBLAS_BRGEMM_F32F32F32)
  if (!no_blas()) at::native::cpublas::brgemm_release();
#endif
}

void bbrgemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
             const uint16_t* a, const uint16_t* b, float* c) {
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add,
                              reinterpret_cast<const at::BFloat16*>(a),
                              reinterpret_cast<const at::BFloat16*>(b), c, /*is_vnni=*/true);
}

void parallel_for(int64_t n, int64_t grain, void* ctx, void (*f)(void*, int64_t, int64_t)) {
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { f(ctx, b, e); });
}

Runtime runtime() {
  return Runtime{&parallel_for, &sgemm,     &dgemm, &sbrgemm, &brgemm_release,
                 at::get_num_threads(), &bbrgemm};
}

// AVX2+FMA(+F16C) kernels when the CPU has them; MSFUSED_CPU_ISA=base forces the baseline.
bool use_avx2() {
  static const bool v = [] {
    const char* env = std::getenv("MSFUSED_CPU_ISA");
    if (env && std::strcmp(env, "base") == 0) return false;
#if defined(__x86_64__) || defined(__i386__)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#else
    return false;
#endif
  }();
  return v;
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
#else
  return false;
#endif
}

// AVX-512 kernels (float32; float64 stays on AVX2, gradcheck only) where the CPU has
// AVX-512: 64-byte vectors in the depthwise and elementwise loops, which CPUs with full-width
// 512-bit units (Intel Xeon, AMD Zen 5) run at twice the AVX2 rate. MSFUSED_CPU_ISA=avx2 (or
// base) caps every kernel, the native bfloat16 ones included, at that instruction set.
bool use_avx512() {
  static const bool v = [] {
    const char* env = std::getenv("MSFUSED_CPU_ISA");
    if (env && (std::strcmp(env, "base") == 0 || std::strcmp(env, "avx2") == 0)) return false;
    return use_avx2() && cpu_has_avx512();
  }();
  return v;
}

// The bfloat16 kernels of the AVX512-BF16 build (block_kernel_avx512bf16.cpp: the float32
// kernels on bfloat16 storage with one-instruction roundings) where the AVX-512 build runs
// and the CPU has AVX512-BF16; MSFUSED_CPU_BF16=widen runs the AVX-512 build's instead, as
// a CPU without AVX512-BF16 would.
bool use_avx512bf16() {
  static const bool v = [] {
    const char* env = std::getenv("MSFUSED_CPU_BF16");
    if (env && std::strcmp(env, "widen") == 0) return false;
#if defined(__x86_64__) || defined(__i386__)
    return use_avx512() && __builtin_cpu_supports("avx512bf16");
#else
    return false;
#endif
  }();
  return v;
}

// Native bfloat16 (kernel_bf16_forward.h) where the CPU has AVX512-BF16 (AMX-BF16 CPUs all
// do) and oneDNN's bfloat16 brgemm answers a probe correctly: oneDNN then picks AMX tiles
// or AVX512-BF16 dot products itself. Elsewhere (no bf16 instructions: oneDNN would
// emulate them, slower than the float32 kernels) the bfloat16 forward and backward run the
// float32 kernels and GEMMs on bfloat16 storage (forward_16_f32, backward_16).
// MSFUSED_CPU_BF16=widen forces that (A/B runs, tests of the fallback).
bool probe_bf16_brgemm() {
  try {
    // C (1 x 16) = A (1 x 4) B with A = [1 2 3 4], B[k][n] = (k + 1) (1 + n % 2), B packed
    // VNNI (pack_vnni's layout): C[n] = 30 (1 + n % 2) when the layouts agree.
    at::BFloat16 a[4], b[4 * 16];
    for (int k = 0; k < 4; ++k) {
      a[k] = at::BFloat16(float(k + 1));
      for (int n = 0; n < 16; ++n) b[(k / 2) * 32 + 2 * n + k % 2] = at::BFloat16(float((k + 1) * (1 + n % 2)));
    }
    float c[16];
    at::native::cpublas::brgemm(1, 16, 4, 4, 16, 16, false, a, b, c, /*is_vnni=*/true);
    at::native::cpublas::brgemm_release();
    for (int n = 0; n < 16; ++n)
      if (c[n] != 30.f * (1 + n % 2)) return false;
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

bool native_bf16_available() {
  static const bool v = [] {
    const char* env = std::getenv("MSFUSED_CPU_BF16");
    if (env && std::strcmp(env, "widen") == 0) return false;
    if (no_blas() || !use_avx512()) return false;
#if defined(__x86_64__) || defined(__i386__)
    if (!__builtin_cpu_supports("avx512bf16")) return false;
    return probe_bf16_brgemm();
#else
    return false;
#endif
  }();
  // oneDNN can be switched off at run time (torch.backends.mkldnn); brgemm then refuses.
  return v && at::globalContext().userEnabledMkldnn();
}

// Even C only: every GEMM's K (2C + Cs, C + Cs, C) is then even, as oneDNN's bfloat16 AMX
// kernels need (an odd K stopped the process with SIGILL on the AMX build machine,
// benchmarks/NOTES.md entry 10). Odd C takes forward_16_f32.
bool native_bf16(const BlockDesc& d, at::ScalarType t) {
  return t == at::kBFloat16 && d.C % 2 == 0 && make_plan(d).pixel_major &&
         native_bf16_available();
}

// The bfloat16 backward's tile GEMMs take bfloat16 operands (kernel_grad_gemms.h) under the
// forward's conditions plus N even (the dA GEMM reduces over N, and the bfloat16 brgemm
// needs an even reduction).
bool native_bf16_grad_gemms(const BlockDesc& d, const at::Tensor& x) {
  return native_bf16(d, x.scalar_type()) && d.N % 2 == 0;
}

// The backward's scratch (branch gradients, the chunks' partial weight gradients) of
// `elems` elements like `like`: up to kKeepScratchBytes a buffer of the calling thread kept
// between calls (the kernels finish with it before the call returns), larger ones from the
// output cache (csrc/cpu/output_cache.h), which holds them only while idle and under its
// cap. A fresh allocation of a few MiB is page-faulted in again on every call whenever
// glibc has trimmed the heap top since the last one (NOTES 41: 2 ms of paper-u2's NCHW
// bfloat16 backward); the whole-batch branch scratch of the two-pass plan is too large to
// keep per thread.
constexpr int64_t kKeepScratchBytes = int64_t(32) << 20;
struct KeptScratch {  // one per thread; freed when the thread ends
  void* p = nullptr;
  int64_t cap = 0;
  ~KeptScratch() { free(p); }
};
at::Tensor backward_scratch_tensor(int64_t elems, const at::Tensor& like) {
  const int64_t bytes = elems * static_cast<int64_t>(like.element_size());
  if (bytes > kKeepScratchBytes) return empty_output({elems}, like.options());
  static thread_local KeptScratch kept;
  if (kept.cap < bytes) {
    free(kept.p);
    kept.p = nullptr;
    kept.cap = 0;
    if (posix_memalign(&kept.p, 64, static_cast<size_t>(bytes > 0 ? bytes : 1)) != 0)
      throw std::bad_alloc();
    kept.cap = bytes;
  }
  return at::from_blob(kept.p, {elems}, like.options());
}

// y and, when save_preact, the pre-activation (else an empty tensor), in x's dtype and
// the block's I/O layout.
std::tuple<at::Tensor, at::Tensor> alloc_outputs(const BlockDesc& d, const at::Tensor& x,
                                                 bool save_preact) {
  const at::MemoryFormat fmt = io_format(d);
  at::Tensor y = empty_output({d.B, d.Cout, d.Ho, d.Wo}, x.options(), fmt);
  at::Tensor pre = save_preact ? empty_output({d.B, d.Cout, d.Ho, d.Wo}, x.options(), fmt)
                               : at::empty({0}, x.options());
  return {y, pre};
}

// dx like x in the block's I/O layout (from the output cache when large).
at::Tensor empty_dx(const BlockDesc& d, const at::Tensor& x) {
  return empty_output(x.sizes(), x.options(), io_format(d));
}

BlockTensors<uint16_t> bf16_bits(const BlockTensors<at::BFloat16>& t) {
  auto b = [](const at::BFloat16* p) { return reinterpret_cast<const uint16_t*>(p); };
  return BlockTensors<uint16_t>{b(t.x),  b(t.wa), b(t.ba), b(t.wb), b(t.bb), b(t.wc), b(t.bc),
                                b(t.pa), b(t.qa), b(t.pb), b(t.qb), b(t.ws), b(t.bs)};
}

std::tuple<at::Tensor, at::Tensor> forward_bf16(const BlockDesc& d, const BlockArgs& a,
                                                bool save_preact) {
  at::Tensor y, pre;
  std::tie(y, pre) = alloc_outputs(d, *a.x, save_preact);
  uint16_t* p = save_preact ? reinterpret_cast<uint16_t*>(pre.data_ptr<at::BFloat16>()) : nullptr;
  avx512bf16::block_forward_bf16(runtime(), d, bf16_bits(tensors_of<at::BFloat16>(a)),
                                 reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>()), p);
  return {y, pre};
}

// A bfloat16 call's weights widened to float32, x replaced by an empty float32 tensor: the
// kernels on bfloat16 storage read x (and write their outputs) as bfloat16 bits themselves.
BlockArgs widened_weights(const BlockArgs& a) {
  BlockArgs w = a;
  w.x = TensorRef::owned(at::empty({0}, a.x->options().dtype(at::kFloat)));
  return cast_block_args(w, at::kFloat);
}

// Kernels of a 16-bit call that compute in float32 on 16-bit storage: bfloat16 always,
// float16 where the compiler has _Float16 (the kernels' f16_t, kernel_simd.h); the build
// use_avx512 / use_avx2 pick.
bool storage16_kernels(at::ScalarType t) {
#if defined(__FLT16_MAX__)
  if (t == at::kHalf) return true;
#endif
  return t == at::kBFloat16;
}

using Forward16 = void (*)(const Runtime&, const BlockDesc&, const BlockTensors<float>&,
                           const uint16_t*, uint16_t*, uint16_t*);
using Backward16 = void (*)(const Runtime&, const BlockDesc&, const BlockTensors<float>&,
                            const uint16_t*, const uint16_t*, const uint16_t*,
                            const BlockGrads<float>&, uint16_t*, float*);

// The build's copy of a kernel: AVX-512, AVX2 or baseline.
template <typename F>
F by_isa(F avx512_kernel, F avx2_kernel, F base_kernel) {
  return use_avx512() ? avx512_kernel : use_avx2() ? avx2_kernel : base_kernel;
}

Forward16 forward16_kernel(at::ScalarType t) {
#if defined(__FLT16_MAX__)
  if (t == at::kHalf)
    return by_isa<Forward16>(&avx512::block_forward_f16_f32, &avx2::block_forward_f16_f32,
                             &base::block_forward_f16_f32);
#endif
  (void)t;
  if (use_avx512bf16()) return &avx512bf16::block_forward_bf16_f32;
  return by_isa<Forward16>(&avx512::block_forward_bf16_f32, &avx2::block_forward_bf16_f32,
                           &base::block_forward_bf16_f32);
}

Backward16 backward16_kernel(at::ScalarType t) {
#if defined(__FLT16_MAX__)
  if (t == at::kHalf)
    return by_isa<Backward16>(&avx512::block_backward_f16, &avx2::block_backward_f16,
                              &base::block_backward_f16);
#endif
  (void)t;
  if (use_avx512bf16()) return &avx512bf16::block_backward_bf16;
  return by_isa<Backward16>(&avx512::block_backward_bf16, &avx2::block_backward_bf16,
                            &base::block_backward_bf16);
}

// The 16-bit bits of a bfloat16 or float16 tensor.
uint16_t* bits16(const at::Tensor& t) { return static_cast<uint16_t*>(t.data_ptr()); }

// The bfloat16 forward where the native one does not apply (odd C, the planar path C <
// kPixelMajorMinC, CPUs without AVX512-BF16), and the float16 forward: float32 kernels and
// GEMMs, with x, y and the pre-activation read and written in their 16-bit type by the
// kernels, only the weights widened (copies of x and y cost more than the planar kernels'
// own time at some shapes: paper-u1's y is 8.4M elements; float16 widened at the op
// boundary ran 2.9x slower than float32 at mnet-28, benchmarks/NOTES.md 37).
std::tuple<at::Tensor, at::Tensor> forward_16_f32(const BlockDesc& d, const BlockArgs& a,
                                                  bool save_preact) {
  const BlockArgs w = widened_weights(a);
  at::Tensor y, pre;
  std::tie(y, pre) = alloc_outputs(d, *a.x, save_preact);
  forward16_kernel(a.x->scalar_type())(runtime(), d, tensors_of<float>(w), bits16(*a.x),
                                       bits16(y), save_preact ? bits16(pre) : nullptr);
  return {y, pre};
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: the CPU kernels need a CPU tensor, got one on ",
                    x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
                   "x: the cpp backend supports float32, float64, bfloat16 and float16, got ",
                   t);
}

// float16 from a compiler without _Float16 (storage16_kernels false): the kernels compute
// in float32 on float32 copies. Inputs are widened once at the op boundary and the results
// rounded once at the end, so every intermediate keeps float32 precision, as on the storage
// path; the price is one float32 copy of x, y, grad_y, saved and dx.
bool is_reduced(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// The AVX-512 build's float32 kernels where use_avx512() allows; false (not run) otherwise
// and for float64, which that build does not have.
bool avx512_forward(const Runtime& rt, const BlockDesc& d, const BlockTensors<float>& t,
                    float* y, float* pre) {
  if (!use_avx512()) return false;
  avx512::block_forward<float>(rt, d, t, y, pre);
  return true;
}
bool avx512_forward(const Runtime&, const BlockDesc&, const BlockTensors<double>&, double*,
                    double*) {
  return false;
}
bool avx512_backward(const Runtime& rt, const BlockDesc& d, const BlockTensors<float>& t,
                     const float* gy, const float* saved, const BlockGrads<float>& g,
                     float* scratch) {
  if (!use_avx512()) return false;
  avx512::block_backward<float>(rt, d, t, gy, saved, g, scratch);
  return true;
}
bool avx512_backward(const Runtime&, const BlockDesc&, const BlockTensors<double>&,
                     const double*, const double*, const BlockGrads<double>&, double*) {
  return false;
}

// y (and the pre-activation when save_preact) for validated, contiguous arguments of a
// dtype the kernels compute in (float32, float64).
std::tuple<at::Tensor, at::Tensor> forward_kernel(const BlockDesc& d, const BlockArgs& a,
                                                  bool save_preact) {
  at::Tensor y, pre;
  std::tie(y, pre) = alloc_outputs(d, *a.x, save_preact);
  AT_DISPATCH_FLOATING_TYPES(a.x->scalar_type(), "msfused_block_forward_cpu", [&] {
    auto t = tensors_of<scalar_t>(a);
    scalar_t* p = save_preact ? pre.data_ptr<scalar_t>() : nullptr;
    if (avx512_forward(runtime(), d, t, y.data_ptr<scalar_t>(), p)) return;
    if (use_avx2())
      avx2::block_forward<scalar_t>(runtime(), d, t, y.data_ptr<scalar_t>(), p);
    else
      base::block_forward<scalar_t>(runtime(), d, t, y.data_ptr<scalar_t>(), p);
  });
  return {y, pre};
}

std::vector<at::Tensor> backward_kernel(const BlockDesc& d, const BlockArgs& a,
                                        const at::Tensor& gy, const at::Tensor& sv) {
  std::vector<at::Tensor> grads = alloc_grads(a, d, empty_dx(d, *a.x));
  const BackwardScratch sl = backward_scratch(d, make_plan(d, true));
  at::Tensor scratch = backward_scratch_tensor(sl.total, *a.x);
  AT_DISPATCH_FLOATING_TYPES(a.x->scalar_type(), "msfused_block_backward_cpu", [&] {
    auto t = tensors_of<scalar_t>(a);
    auto g = grads_of<scalar_t>(grads, d);
    const scalar_t* s = act_saves(d.act) == kSavesNothing ? nullptr : sv.data_ptr<scalar_t>();
    Runtime rt = runtime();
    if (avx512_backward(rt, d, t, gy.data_ptr<scalar_t>(), s, g, scratch.data_ptr<scalar_t>()))
      return;
    if (use_avx2())
      avx2::block_backward<scalar_t>(rt, d, t, gy.data_ptr<scalar_t>(), s, g,
                                     scratch.data_ptr<scalar_t>());
    else
      base::block_backward<scalar_t>(rt, d, t, gy.data_ptr<scalar_t>(), s, g,
                                     scratch.data_ptr<scalar_t>());
  });
  return grads;
}

// The bfloat16 backward on every CPU, and the float16 one: x, grad_y, saved and dx stay in
// their 16-bit type, read and written by the kernels (widened copies of them cost more than
// the float32 kernels' own time at some shapes: at paper-u1 grad_y and saved are 8.4M
// elements each), only the weights are widened; dx and the weight gradients sum in float32
// and are rounded once. The tile GEMMs take bfloat16 operands where native_bf16_grad_gemms
// allows (bfloat16 calls only).
std::vector<at::Tensor> backward_16(const BlockDesc& d, const BlockArgs& a,
                                    const at::Tensor& gy, const at::Tensor& sv) {
  // dx in its 16-bit type, written by the kernels directly
  std::vector<at::Tensor> grads = alloc_grads(a, d, empty_dx(d, *a.x));
  const BlockArgs w = widened_weights(a);
  std::vector<at::Tensor> g32(grads.size());
  g32[0] = at::empty({0}, w.x->options());
  for (size_t i = 1; i < grads.size(); ++i)
    g32[i] = at::empty(grads[i].sizes(), grads[i].options().dtype(at::kFloat));
  const BackwardScratch sl = backward_scratch(d, make_plan(d, true));
  at::Tensor scratch = backward_scratch_tensor(sl.total, *w.x);
  Runtime rt = runtime();
  rt.bf16_products = native_bf16_grad_gemms(d, *a.x);
  backward16_kernel(a.x->scalar_type())(
      rt, d, tensors_of<float>(w), bits16(*a.x), bits16(gy),
      act_saves(d.act) == kSavesNothing ? nullptr : bits16(sv), grads_of<float>(g32, d),
      bits16(grads[0]), scratch.data_ptr<float>());
  for (size_t i = 1; i < grads.size(); ++i)
    if (g32[i].numel()) grads[i] = g32[i].to(a.x->scalar_type());
  return grads;
}

std::tuple<at::Tensor, at::Tensor> block_forward_cpu(MSF_FORWARD_PARAMS) {
  BlockArgs a = make_block_args(x, MSF_WEIGHT_ARGS);
  check_cpu(x);
  const BlockDesc d = check_and_describe(a, MSF_CONFIG_ARGS);
  if (native_bf16(d, x.scalar_type())) return forward_bf16(d, a, save_preact);
  if (!is_reduced(x.scalar_type())) return forward_kernel(d, a, save_preact);
  if (storage16_kernels(x.scalar_type())) return forward_16_f32(d, a, save_preact);
  auto [y, pre] = forward_kernel(d, cast_block_args(a, at::kFloat), save_preact);
  return {y.to(x.scalar_type()), pre.to(x.scalar_type())};
}

std::vector<at::Tensor> block_backward_cpu(MSF_BACKWARD_PARAMS) {
  BlockArgs a = make_block_args(x, MSF_WEIGHT_ARGS);
  check_cpu(x);
  const BlockDesc d = check_and_describe(a, MSF_CONFIG_ARGS);
  TensorRef gy = TensorRef::borrowed(grad_y), sv = TensorRef::borrowed(saved);
  check_backward_extras(d, *a.x, gy, sv);
  if (!is_reduced(x.scalar_type())) return backward_kernel(d, a, *gy, *sv);
  if (storage16_kernels(x.scalar_type())) return backward_16(d, a, *gy, *sv);
  std::vector<at::Tensor> grads =
      backward_kernel(d, cast_block_args(a, at::kFloat), gy->to(at::kFloat),
                      sv->numel() ? sv->to(at::kFloat) : *sv);
  for (auto& g : grads) g = g.to(x.scalar_type());
  return grads;
}

}  // namespace

}  // namespace cpu
}  // namespace msfused

TORCH_LIBRARY_IMPL(msfused, CPU, m) {
  m.impl("block_forward", &msfused::cpu::block_forward_cpu);
  m.impl("block_backward", &msfused::cpu::block_backward_cpu);
}
