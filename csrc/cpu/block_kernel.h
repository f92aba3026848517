// Fused CPU kernels of the block. Plain C++ over raw pointers (no ATen headers): the
// kernel source is compiled once per instruction set (block_kernel_*.cpp) and the binding
// picks one at run time.
#pragma once
#include <cstdint>

#include "block_desc.h"

namespace msfused {
namespace cpu {

// How the kernels reach the outside world: thread pool, GEMM and scratch memory come from
// the binding (ATen), so this header stays free of ATen.
struct Runtime {
  // Runs f(begin, end) over [0, n) split into chunks, in parallel (at::parallel_for).
  void (*parallel_for)(int64_t n, int64_t grain, void* ctx, void (*f)(void*, int64_t, int64_t));
  // Column-major BLAS gemm: C = alpha * op(A) op(B) + beta * C; trans = 'N' or 'T'.
  void (*sgemm)(char ta, char tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
                int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
  void (*dgemm)(char ta, char tb, int64_t m, int64_t n, int64_t k, double alpha, const double* a,
                int64_t lda, const double* b, int64_t ldb, double beta, double* c, int64_t ldc);
  int64_t max_threads;
};

template <typename T>
void block_forward(const Runtime& rt, const BlockDesc& d, const BlockTensors<T>& t, T* y, T* pre);

template <typename T>
void block_backward(const Runtime& rt, const BlockDesc& d, const BlockTensors<T>& t,
                    const T* grad_y, const T* saved, const BlockGrads<T>& g);

}  // namespace cpu
}  // namespace msfused
