// A minimal CPU emulation of the CUDA features the kernels in csrc/cuda use, so their index
// math, masking, halos and barriers can be tested on a machine without a GPU:
// every CTA runs as blockDim.x std::threads sharing "__shared__" (static) memory, with
// __syncthreads as a std::barrier. Not for speed. float16/bfloat16 are 2-byte stand-ins with
// the rounding of cuda_fp16.h / cuda_bf16.h (round to nearest even, NaN kept). mma.sync,
// ldmatrix and cp.async (csrc/cuda/ptx_wrappers.cuh) are in emu_ptx.h. Global bytes moved
// through csrc/cuda/global_io.cuh and cp.async are counted (emu_bytes_* below).
#pragma once
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

// ---- __half / __nv_bfloat16: same bits as at::Half / at::BFloat16 -------------------------
struct __half { uint16_t x; };
struct __nv_bfloat16 { uint16_t x; };
static_assert(sizeof(__half) == 2 && sizeof(__nv_bfloat16) == 2, "2-byte stand-ins");

inline float emu_bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t emu_float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline uint32_t __float_as_uint(float f) { return emu_float_to_bits(f); }

inline float __bfloat162float(__nv_bfloat16 v) { return emu_bits_to_float(uint32_t(v.x) << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t u = emu_float_to_bits(f);
  if (std::isnan(f)) return __nv_bfloat16{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  const uint32_t lsb = (u >> 16) & 1u;
  return __nv_bfloat16{uint16_t((u + 0x7fffu + lsb) >> 16)};
}
// float16 through the compiler's _Float16 (IEEE binary16, round to nearest even).
inline float __half2float(__half v) { _Float16 h; std::memcpy(&h, &v.x, 2); return float(h); }
inline __half __float2half_rn(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  __half r; std::memcpy(&r.x, &h, 2); return r;
}

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97
};
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
// An H100 / H200 (SXM): 132 SMs, 228 KB of shared memory per SM, 227 KB per block opt-in
// (CUDA_EMU_SMEM_LIMIT overrides the last, to test the plans of smaller GPUs).
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  const char* e = std::getenv("CUDA_EMU_SMEM_LIMIT");
  *v = a == cudaDevAttrMultiProcessorCount ? 132
     : a == cudaDevAttrMaxSharedMemoryPerMultiprocessor ? 228 * 1024
     : (e ? std::atoi(e) : 227 * 1024);
  return cudaSuccess;
}
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int v) {
  return v <= 227 * 1024 ? cudaSuccess : cudaErrorInvalidValue;
}

// Global-memory bytes the kernels move through csrc/cuda/global_io.cuh and cp.async; reads
// inside [emu_x_lo, emu_x_hi) (the driver sets it to x) are counted apart.
inline std::atomic<uint64_t> emu_bytes_read{0}, emu_bytes_read_x{0}, emu_bytes_written{0};
inline const void* emu_x_lo = nullptr;
inline const void* emu_x_hi = nullptr;
inline void emu_count_read(const void* p, size_t n) {
  const bool in_x = p >= emu_x_lo && p < emu_x_hi;
  (in_x ? emu_bytes_read_x : emu_bytes_read) += n;
}
inline void emu_count_written(size_t n) { emu_bytes_written += n; }

inline std::barrier<>* emu_bar = nullptr;
inline double emu_shfl[1024];
alignas(128) inline unsigned char emu_dyn_smem[256 * 1024];
inline size_t emu_dyn_bytes = 0;

// emu_ptx.h (included at the end): cp.async bookkeeping per block and at each barrier.
inline void emu_ptx_block_begin();
inline void emu_ptx_block_end();
inline void emu_ptx_publish_own();

inline void __syncthreads() {
  emu_ptx_publish_own();
  emu_bar->arrive_and_wait();
}

template <typename A>
inline A __shfl_down_sync(unsigned, A v, int off) {
  const int t = threadIdx.x;
  emu_shfl[t] = static_cast<double>(v);
  __syncthreads();
  const int lane = t % 32;
  A r = lane + off < 32 ? static_cast<A>(emu_shfl[t + off]) : v;
  __syncthreads();
  return r;
}

#define MSF_EXTERN_SMEM(name) unsigned char* name = emu_dyn_smem

template <typename K, typename... Args>
void emu_launch(K kernel, dim3 grid, dim3 block, size_t smem, Args... args) {
  if (smem > sizeof(emu_dyn_smem)) throw 1;
  gridDim = grid;
  blockDim = block;
  emu_dyn_bytes = smem;
  const unsigned nt = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        // poison shared memory so reads of unwritten smem show up as NaN
        for (size_t i = 0; i < sizeof(emu_dyn_smem) / sizeof(float); ++i)
          reinterpret_cast<float*>(emu_dyn_smem)[i] = NAN;
        std::barrier<> bar(nt);
        emu_bar = &bar;
        emu_ptx_block_begin();
        std::vector<std::thread> th;
        th.reserve(nt);
        for (unsigned t = 0; t < nt; ++t)
          th.emplace_back([&, t] {
            threadIdx = dim3(t, 0, 0);
            blockIdx = dim3(bx, by, bz);
            kernel(args...);
          });
        for (auto& x : th) x.join();
        emu_ptx_block_end();
      }
}
#define MSF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  emu_launch(kernel, dim3(grid), dim3(block), smem, __VA_ARGS__)

// ---- warp-collective bookkeeping (emu_ptx.h's mma.sync and ldmatrix) --------------------
[[noreturn]] inline void emu_fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s (thread %u of block %u,%u)\n", what, threadIdx.x,
               blockIdx.x, blockIdx.y);
  std::fflush(stderr);
  std::abort();
}

struct EmuWarpSlot {
  std::mutex m;
  std::condition_variable cv;
  int count = 0;
  unsigned long gen = 0;
  int op[32];
  const void* ptr[32];
  unsigned ldm[32];
  int layout[32];
};
inline EmuWarpSlot emu_warps[32];

// All 32 lanes of the calling thread's warp meet here with the same (op, ptr, ldm, layout).
inline void emu_warp_collective(int op, const void* ptr, unsigned ldm, int layout) {
  if (blockDim.x % 32 != 0) emu_fail("a warp-collective op in a block whose size is not a multiple of 32");
  const unsigned lane = threadIdx.x % 32;
  EmuWarpSlot& w = emu_warps[threadIdx.x / 32];
  std::unique_lock<std::mutex> lk(w.m);
  w.op[lane] = op;
  w.ptr[lane] = ptr;
  w.ldm[lane] = ldm;
  w.layout[lane] = layout;
  const unsigned long gen = w.gen;
  if (++w.count == 32) {
    for (int l = 1; l < 32; ++l)
      if (w.op[l] != w.op[0] || w.ptr[l] != w.ptr[0] || w.ldm[l] != w.ldm[0] ||
          w.layout[l] != w.layout[0])
        emu_fail("lanes of a warp called a warp-collective op with different operations or arguments");
    w.count = 0;
    ++w.gen;
    w.cv.notify_all();
    return;
  }
  static const int timeout_s = [] {
    const char* e = std::getenv("CUDA_EMU_WARP_TIMEOUT_S");
    return e ? std::atoi(e) : 60;
  }();
  if (!w.cv.wait_for(lk, std::chrono::seconds(timeout_s), [&] { return w.gen != gen; }))
    emu_fail("not every lane of the warp called a warp-collective op (warp divergence)");
}

#include "emu_ptx.h"  // msfused::ptx: mma.sync, ldmatrix, cp.async stand-ins
