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

#include "block_args.h"
#include "cpu/block_kernel.h"
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

void parallel_for(int64_t n, int64_t grain, void* ctx, void (*f)(void*, int64_t, int64_t)) {
  at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { f(ctx, b, e); });
}

Runtime runtime() {
  return Runtime{&parallel_for, &sgemm, &dgemm, &sbrgemm, &brgemm_release, at::get_num_threads()};
}

// AVX2+FMA kernels when the CPU has them; MSFUSED_CPU_ISA=base forces the baseline.
bool use_avx2() {
  static const bool v = [] {
    const char* env = std::getenv("MSFUSED_CPU_ISA");
    if (env && std::strcmp(env, "base") == 0) return false;
#if defined(__x86_64__) || defined(__i386__)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    return false;
#endif
  }();
  return v;
}

void check_cpu(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.device().is_cpu(), "x: the CPU kernels need a CPU tensor, got one on ",
                    x.device());
  const auto t = x.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf,
                   "x: the cpp backend supports float32, float64, bfloat16 and float16, got ",
                   t);
}

// bfloat16/float16 (CPU autocast, or a half-precision model): the kernels compute in float32.
// Inputs are widened once at the op boundary and the results rounded once at the end, so
// every intermediate (a, b1, b, the GEMM sums) keeps float32 precision; the price is one
// float32 copy of x, y and the weights, which a CPU without native bf16 FMA pays anyway.
bool is_reduced(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// y (and the pre-activation when save_preact) for validated, contiguous arguments of a
// dtype the kernels compute in (float32, float64).
std::tuple<at::Tensor, at::Tensor> forward_kernel(const BlockDesc& d, const BlockArgs& a,
                                                  bool save_preact) {
  auto opts = a.x->options().memory_format(io_format(d));
  at::Tensor y = at::empty({d.B, d.Cout, d.Ho, d.Wo}, opts);
  at::Tensor pre = save_preact ? at::empty({d.B, d.Cout, d.Ho, d.Wo}, opts)
                               : at::empty({0}, a.x->options());
  AT_DISPATCH_FLOATING_TYPES(a.x->scalar_type(), "msfused_block_forward_cpu", [&] {
    auto t = tensors_of<scalar_t>(a);
    scalar_t* p = save_preact ? pre.data_ptr<scalar_t>() : nullptr;
    if (use_avx2())
      avx2::block_forward<scalar_t>(runtime(), d, t, y.data_ptr<scalar_t>(), p);
    else
      base::block_forward<scalar_t>(runtime(), d, t, y.data_ptr<scalar_t>(), p);
  });
  return {y, pre};
}

std::vector<at::Tensor> backward_kernel(const BlockDesc& d, const BlockArgs& a,
                                        const at::Tensor& gy, const at::Tensor& sv) {
  std::vector<at::Tensor> grads = alloc_grads(a, d);
  const BackwardScratch sl = backward_scratch(d, make_plan(d, true));
  at::Tensor scratch = at::empty({sl.total}, a.x->options());
  AT_DISPATCH_FLOATING_TYPES(a.x->scalar_type(), "msfused_block_backward_cpu", [&] {
    auto t = tensors_of<scalar_t>(a);
    auto g = grads_of<scalar_t>(grads, d);
    const scalar_t* s = act_saves(d.act) == kSavesNothing ? nullptr : sv.data_ptr<scalar_t>();
    if (use_avx2())
      avx2::block_backward<scalar_t>(runtime(), d, t, gy.data_ptr<scalar_t>(), s, g,
                                     scratch.data_ptr<scalar_t>());
    else
      base::block_backward<scalar_t>(runtime(), d, t, gy.data_ptr<scalar_t>(), s, g,
                                     scratch.data_ptr<scalar_t>());
  });
  return grads;
}

std::tuple<at::Tensor, at::Tensor> block_forward_cpu(MSF_FORWARD_PARAMS) {
  BlockArgs a = make_block_args(x, MSF_WEIGHT_ARGS);
  check_cpu(x);
  const BlockDesc d = check_and_describe(a, MSF_CONFIG_ARGS);
  if (!is_reduced(x.scalar_type())) return forward_kernel(d, a, save_preact);
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
