// A minimal CPU emulation of the CUDA features the kernels in csrc/cuda use, so their index
// math, masking, halos and barriers can be tested on a machine without a GPU:
// every CTA runs as blockDim.x std::threads sharing "__shared__" (static) memory, with
// __syncthreads as a std::barrier. Not for speed. float16/bfloat16 are 2-byte stand-ins with
// the rounding of cuda_fp16.h / cuda_bf16.h (round to nearest even, NaN kept). nvcuda::wmma
// is below; mma.sync, ldmatrix and cp.async (csrc/cuda/ptx_wrappers.cuh) are in emu_ptx.h.
#pragma once
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
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated error"; }
template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int v) {
  return v <= 227 * 1024 ? cudaSuccess : cudaErrorInvalidValue;
}

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

// ---- nvcuda::wmma (16x16x16) --------------------------------------------------------------
// Semantics only: every thread holds the whole 16x16 tile of a fragment (float for
// accumulators, the element type for operands) and all 32 lanes of a warp compute the same
// values; lane 0 alone stores. What real WMMA requires is asserted, so layout mistakes show
// up on the CPU: every lane of the warp calls (a warp barrier that times out otherwise) with
// the same pointer, leading dimension and layout; ldm a multiple of 8 (16-bit elements) or 4
// (float); pointers 32-byte aligned; a tile in dynamic shared memory lies inside the bytes
// the launch asked for. The product is summed in float in k order (real tensor cores may
// add in another order; the 16-bit products are exact in float either way).
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
  if (blockDim.x % 32 != 0) emu_fail("wmma in a block whose size is not a multiple of 32");
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
        emu_fail("wmma: lanes of a warp called with different operations or arguments");
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
    emu_fail("wmma: not every lane of the warp called (warp-divergent wmma)");
}

namespace nvcuda {
namespace wmma {
struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator has 16x16x16 only");
  static_assert(std::is_same_v<Use, accumulator> == std::is_void_v<Layout>,
                "operand fragments need a layout, accumulators none");
  static_assert(!std::is_same_v<Use, accumulator> || std::is_same_v<T, float>,
                "float accumulators only");
  static_assert(std::is_same_v<Use, accumulator> || std::is_same_v<T, __half> ||
                    std::is_same_v<T, __nv_bfloat16>,
                "half / bfloat16 operands only");
  T v[16][16];  // v[row][col]: A is M x K, B is K x N, C is M x N
};

template <typename T>
inline float emu_wmma_f(T v) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return v;
}

template <typename T>
inline void emu_wmma_check(const void* p, unsigned ldm, bool col, const char* what) {
  constexpr unsigned mult = sizeof(T) == 2 ? 8 : 4;  // 16 bytes
  if (ldm % mult != 0) emu_fail("wmma: ldm not a multiple of 16 bytes (8 x 16-bit, 4 x float)");
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) emu_fail("wmma: pointer not 32-byte aligned");
  if (ldm < 16) emu_fail("wmma: ldm shorter than a 16-element row");
  const auto* b = static_cast<const unsigned char*>(p);
  if (b >= emu_dyn_smem && b < emu_dyn_smem + sizeof(emu_dyn_smem)) {
    const size_t first = size_t(b - emu_dyn_smem);
    const size_t last = first + (size_t(15) * ldm + 16) * sizeof(T);  // one past the tile
    if (last > emu_dyn_bytes) emu_fail(what);
  }
  (void)col;
}

template <typename Use, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm) {
  constexpr bool col = std::is_same_v<L, col_major>;
  emu_wmma_check<T>(p, ldm, col, "wmma load: tile beyond the launch's dynamic shared memory");
  emu_warp_collective(1, p, ldm, col);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = col ? p[c * ldm + r] : p[r * ldm + c];
  emu_warp_collective(2, p, ldm, col);  // every lane has read before anyone goes on
}

inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, float>& f, const float* p,
                             unsigned ldm, layout_t layout) {
  const bool col = layout == mem_col_major;
  emu_wmma_check<float>(p, ldm, col, "wmma load: tile beyond the launch's dynamic shared memory");
  emu_warp_collective(3, p, ldm, col);
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.v[r][c] = col ? p[c * ldm + r] : p[r * ldm + c];
  emu_warp_collective(4, p, ldm, col);
}

inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f,
                              unsigned ldm, layout_t layout) {
  const bool col = layout == mem_col_major;
  emu_wmma_check<float>(p, ldm, col, "wmma store: tile beyond the launch's dynamic shared memory");
  emu_warp_collective(5, p, ldm, col);
  if (threadIdx.x % 32 == 0)
    for (int r = 0; r < 16; ++r)
      for (int c = 0; c < 16; ++c) (col ? p[c * ldm + r] : p[r * ldm + c]) = f.v[r][c];
  emu_warp_collective(6, p, ldm, col);  // stored before any lane goes on
}

inline void fill_fragment(fragment<accumulator, 16, 16, 16, float>& f, float v) {
  emu_warp_collective(7, nullptr, 0, 0);
  for (auto& row : f.v)
    for (auto& x : row) x = v;
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d,
                     const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b,
                     const fragment<accumulator, 16, 16, 16, float>& c) {
  emu_warp_collective(8, nullptr, 0, 0);
  float r[16][16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float s = c.v[i][j];
      for (int k = 0; k < 16; ++k) s += emu_wmma_f(a.v[i][k]) * emu_wmma_f(b.v[k][j]);
      r[i][j] = s;
    }
  std::memcpy(d.v, r, sizeof(r));
}
}  // namespace wmma
}  // namespace nvcuda

#include "emu_ptx.h"  // msfused::ptx: mma.sync, ldmatrix, cp.async stand-ins
