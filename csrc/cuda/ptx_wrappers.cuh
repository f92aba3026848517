// The warp-level tensor-core and async-copy instructions the CUDA kernels use, as small
// inline-PTX wrappers in one header, so that a later move to CuTe or wgmma replaces one file
// and the CPU emulator (tools/cuda_emu/emu_ptx.h, same names) can stand in for each one.
//
// Fragment layouts are PTX's (ISA "Matrix Fragments for mma.m16n8k16"): with g = lane / 4
// and t = lane % 4, a 32-bit register holds two 16-bit elements, the lower-index one in the
// low half.
//   A (16 x 16, row-major): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..),
//                           a[3] = (g+8, 2t+8..)
//   B (16 x 8, "col"):      b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8..2t+9, n g)
//   C, D (16 x 8, float):   d[0] = (g, 2t), d[1] = (g, 2t+1), d[2] = (g+8, 2t), d[3] = (g+8, 2t+1)
// ldmatrix: lanes 8j .. 8j+7 give the row addresses (16 bytes each, 16-byte aligned, shared
// memory) of 8x8 matrix j; lane l receives row l/4, columns 2(l%4), 2(l%4)+1 of each matrix
// (with .trans: of its transpose). So ldmatrix_x4 on a row-major 16x16 tile with lane l
// pointing at row l%16, column 8*(l/16) yields A's fragment, and ldmatrix_x2_trans on a
// row-major [k][n] 16x8 tile with lane l (< 16) pointing at row l yields B's.
#pragma once
#include <cstdint>

#ifndef MSFUSED_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace msfused {
namespace ptx {

// d += A (16x16) * B (16x8), float accumulators; T is __nv_bfloat16 or __half.
template <typename T>
__device__ __forceinline__ void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>,
                "mma_m16n8k16: bfloat16 or float16 operands");
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

// d += A (16x8) * B (8x8) on TF32 tensor cores, float accumulators. Operands are float bits;
// the tensor cores read their tf32 part (sign, exponent, the top 10 mantissa bits). Layouts
// (g = lane / 4, t = lane % 4): a[0] = (g, t), a[1] = (g+8, t), a[2] = (g, t+4),
// a[3] = (g+8, t+4); b[0] = (k t, n g), b[1] = (k t+4, n g); d as for m16n8k16.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Four 8x8 16-bit matrices; `row` is this lane's row address (see the header comment).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row)));
}

// Two matrices: lanes 0..15 give the row addresses (the others' are not read).
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row)));
}

__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_addr(row)));
}

// 16 bytes global -> shared, asynchronous (bypassing L1); with valid == false the 16 bytes
// are zero-filled instead (the halo and the tails: no branch around the copy). Both
// addresses 16-byte aligned. The data may be read only after cp_async_wait<> has retired its
// group in this thread and a __syncthreads() has published it to the others.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)),
               "l"(gmem), "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_commit() {
  asm volatile("cp.async.commit_group;\n" ::);
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// The compiler may no longer assume it knows v's value: what is computed from v after this
// point is computed here rather than hoisted out of an enclosing loop (where the hoisted
// values would stay live across the loop body and spill).
__device__ __forceinline__ void opaque(int& v) { asm volatile("" : "+r"(v)); }

// Drop the 128-byte line at p (128-byte aligned) from L2 without writing it back to DRAM:
// for scratch that no kernel reads again. Its contents become indeterminate. sm_80 and up;
// a no-op before (the line is then written back as usual).
__device__ __forceinline__ void discard_l2_line(void* p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("discard.global.L2 [%0], 128;\n" ::"l"(p) : "memory");
#endif
}

// Programmatic dependent launch (sm_90 and up; no-ops before, and in a kernel not launched
// with the programmatic-serialization attribute). grid_dependency_wait: this thread waits
// until the kernels before this one in the stream have completed and their writes are
// visible; a kernel that may be launched early (MSF_LAUNCH_PDL) calls it before touching
// global memory. launch_dependents: this CTA lets the next kernel in the stream be launched
// before this one completes (once every CTA has called it or exited); that kernel still
// waits for this one's completion in its own grid_dependency_wait.
__device__ __forceinline__ void grid_dependency_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Thread-block clusters (sm_90 and up; launched with MSF_LAUNCH_CLUSTER, common.cuh). Before
// sm_90 a launch is its own cluster of one: rank 0 of 1, the barrier a __syncthreads(), and
// map_shared_rank(p, 0) is p.
__device__ __forceinline__ unsigned cluster_ctarank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
#else
  return 0;
#endif
}
__device__ __forceinline__ unsigned cluster_nctarank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(r));
  return r;
#else
  return 1;
#endif
}
// The cluster barrier, split: every thread of the cluster arrives (release: its earlier
// shared-memory writes, cp.async copies it has waited for included, become visible to the
// cluster) and later waits (acquire) until all have arrived; each thread alternates the two,
// and every lane of a warp executes the same one (.aligned). Between them a thread may work
// on anything but what the barrier guards.
__device__ __forceinline__ void cluster_arrive() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __syncthreads();
#endif
}
__device__ __forceinline__ void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}
// p, an address in this CTA's shared memory, as the same offset in the shared memory of CTA
// `rank` of the cluster (distributed shared memory), as a generic pointer for plain loads
// and stores. That CTA must not have returned: a cluster ends with a cluster_sync() where
// CTAs read each other's shared memory.
template <typename T>
__device__ __forceinline__ T* map_shared_rank(T* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint64_t r;
  asm volatile("mapa.u64 %0, %1, %2;\n" : "=l"(r) : "l"(reinterpret_cast<uint64_t>(p)), "r"(rank));
  return reinterpret_cast<T*>(r);
#else
  return p;
#endif
}

}  // namespace ptx
}  // namespace msfused
#endif  // MSFUSED_CUDA_EMU: tools/cuda_emu/emu_ptx.h provides the same functions
