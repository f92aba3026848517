// Fused CPU kernels of the block. Plain C++ over raw pointers (no ATen headers): the
// kernel source (block_kernel_impl.h) is compiled once per instruction set
// (block_kernel_avx2.cpp, block_kernel_base.cpp) and the binding picks one at run time.
#pragma once
#include <cstdint>

#include "block_desc.h"

namespace msfused {
namespace cpu {

// What the kernels get from the outside world (thread pool, BLAS), filled in by the
// binding from ATen, so that the kernel translation units stay free of ATen.
struct Runtime {
  // Runs f(ctx, begin, end) over [0, n) in parallel chunks (at::parallel_for).
  void (*parallel_for)(int64_t n, int64_t grain, void* ctx, void (*f)(void*, int64_t, int64_t));
  // Column-major BLAS: C = alpha * op(A) * op(B) + beta * C, trans is 'N' or 'T'.
  void (*sgemm)(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
  void (*dgemm)(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);
  // Row-major C (M x N, ldc) = A (M x K, lda) B (K x N, ldb) [+ C when add]: PyTorch's
  // batch-reduce GEMM micro-kernel (oneDNN JIT) where the build has it, else sgemm.
  void (*sbrgemm)(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                  bool add, const float* a, const float* b, float* c);
  void (*brgemm_release)();
  int64_t num_threads;
  // Row-major C (M x N, float) = A (M x K, bfloat16 bits, lda) B [+ C when add], B in the
  // VNNI layout with leading dimension ldb (kernel_bf16_forward.h, pack_vnni): oneDNN's
  // bfloat16 brgemm. Null where the binding found no native bfloat16 GEMM.
  void (*bbrgemm)(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc,
                  bool add, const uint16_t* a, const uint16_t* b, float* c);
  // The call's tensors were bfloat16 (widened for a float32 kernel) and bbrgemm is native:
  // the float32 backward may round its GEMM operands to bfloat16 and use bbrgemm.
  bool bf16_products = false;
};


#define MSFUSED_DECLARE_ISA(isa)                                                          \
  namespace isa {                                                                         \
  template <typename T>                                                                   \
  void block_forward(const Runtime& rt, const BlockDesc& d, const BlockTensors<T>& t,     \
                     T* y, T* pre);                                                       \
  template <typename T>                                                                   \
  void block_backward(const Runtime& rt, const BlockDesc& d, const BlockTensors<T>& t,    \
                      const T* grad_y, const T* saved, const BlockGrads<T>& g, T* scratch); \
  void block_forward_bf16_f32(const Runtime& rt, const BlockDesc& d,                     \
                              const BlockTensors<float>& t, const uint16_t* x,            \
                              uint16_t* y, uint16_t* pre);                                \
  void block_backward_bf16(const Runtime& rt, const BlockDesc& d,                         \
                           const BlockTensors<float>& t, const uint16_t* x,               \
                           const uint16_t* grad_y, const uint16_t* saved,                 \
                           const BlockGrads<float>& g, uint16_t* dx, float* scratch);     \
  void block_forward_f16_f32(const Runtime& rt, const BlockDesc& d,                      \
                             const BlockTensors<float>& t, const uint16_t* x,             \
                             uint16_t* y, uint16_t* pre);                                 \
  void block_backward_f16(const Runtime& rt, const BlockDesc& d,                          \
                          const BlockTensors<float>& t, const uint16_t* x,                \
                          const uint16_t* grad_y, const uint16_t* saved,                  \
                          const BlockGrads<float>& g, uint16_t* dx, float* scratch);      \
  }

// block_forward_bf16_f32: the forward of a bfloat16 call computed in float32 (float32
// GEMMs) with x, y and pre read and written as bfloat16 bits, the weights (t, t.x unused)
// float32: the bfloat16 forward wherever the native one (avx512bf16::block_forward_bf16) does
// not apply.
// block_backward_bf16: the backward of a bfloat16 call computed in float32 with the tensors
// that scale with the batch read and written as bfloat16 bits (x, grad_y, saved, dx), the
// weights (t, t.x unused) and their gradients (g, g.dx unused) float32. Runtime::
// bf16_products selects bfloat16 tile GEMMs (kernel_grad_gemms.h) where the binding allows.
// block_forward_f16_f32 / block_backward_f16: the same for float16 calls (float16 bits,
// IEEE binary16), defined where the compiler has _Float16 (GCC 12+, Clang 15+; the binding
// checks __FLT16_MAX__ as the kernels do); never with bfloat16 GEMMs.
MSFUSED_DECLARE_ISA(base)
MSFUSED_DECLARE_ISA(avx2)
// avx512: CPUs with AVX-512 only; its block_forward / block_backward exist for float32 only
// (block_kernel_avx512.cpp).
MSFUSED_DECLARE_ISA(avx512)
// avx512bf16: CPUs with AVX-512 and AVX512-BF16; only block_forward_bf16_f32 and
// block_backward_bf16 are defined (block_kernel_avx512bf16.cpp), with the native
// block_forward_bf16 below.
MSFUSED_DECLARE_ISA(avx512bf16)
#undef MSFUSED_DECLARE_ISA

// The bfloat16 forward computed natively (kernel_bf16_forward.h; t, y and pre are bfloat16
// bits): pixel-major plans only (C >= kPixelMajorMinC), needs Runtime::bbrgemm. Compiled for
// AVX-512 with AVX512-BF16 (block_kernel_avx512bf16.cpp): the binding runs it only on CPUs
// that have both.
namespace avx512bf16 {
void block_forward_bf16(const Runtime& rt, const BlockDesc& d, const BlockTensors<uint16_t>& t,
                        uint16_t* y, uint16_t* pre);
}

}  // namespace cpu
}  // namespace msfused
