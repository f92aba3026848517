// Device helpers shared by the CUDA kernels: accumulation types, conversions, activations
// and NCHW/NHWC indexing. No PyTorch headers here (compile time).
#pragma once
#ifndef MSFUSED_CUDA_EMU  // tools/cuda_emu runs these kernels on the CPU for testing
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <atomic>
#include <cstdint>
#include <mutex>
#include <utility>

#include "block_desc.h"

// Kernel launch and dynamic shared memory, as macros so tools/cuda_emu can replace them.
#ifndef MSF_LAUNCH
#define MSF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif
// A launch that may start before the previous kernel in the stream completes (programmatic
// dependent launch, sm_90 and up), where `pdl` says so; the kernel must call
// ptx::grid_dependency_wait() in every thread before touching global memory (the emulator
// checks that on every such launch). Evaluates to the launch's cudaError_t.
#ifndef MSF_LAUNCH_PDL
#define MSF_LAUNCH_PDL(pdl, kernel, grid, block, smem, stream, ...)                     \
  ::msfused::cuda::launch_ex(pdl, dim3(1), kernel, dim3(grid), dim3(block), smem, stream, \
                             __VA_ARGS__)
#endif
// A launch of thread-block clusters of `cluster` CTAs (a dim3: x by y, 1 to 8 in all, the
// portable sizes; dividing the grid; sm_90 and up for more than 1), which may also start
// early where `pdl` says so. Evaluates to the launch's cudaError_t.
#ifndef MSF_LAUNCH_CLUSTER
#define MSF_LAUNCH_CLUSTER(pdl, cluster, kernel, grid, block, smem, stream, ...)       \
  ::msfused::cuda::launch_ex(pdl, dim3(cluster), kernel, dim3(grid), dim3(block), smem, \
                             stream, __VA_ARGS__)
#endif
#ifndef MSF_EXTERN_SMEM
// 128-byte aligned: the kernels' shared-memory maps align their sections to 128 bytes.
#define MSF_EXTERN_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace msfused {
namespace cuda {

// TF32 m16n8k8 operand fragments (the layouts in ptx_wrappers.cuh) loaded one float per
// register from shared memory, ldmatrix being 16-bit only. p: this lane's first element,
// A(g, t) or B(k t, n g) with g = lane / 4, t = lane % 4; rs, cs: A's row and column strides;
// ks: B's stride along k (elements).
__device__ __forceinline__ void tf32_frag_a(uint32_t (&a)[4], const float* p, int rs, int cs) {
  a[0] = __float_as_uint(p[0]);
  a[1] = __float_as_uint(p[8 * rs]);
  a[2] = __float_as_uint(p[4 * cs]);
  a[3] = __float_as_uint(p[8 * rs + 4 * cs]);
}

__device__ __forceinline__ void tf32_frag_b(uint32_t (&b)[2], const float* p, int ks) {
  b[0] = __float_as_uint(p[0]);
  b[1] = __float_as_uint(p[4 * ks]);
}

// Two adjacent elements in one shared load: the exact GEMMs' operand pairs, 64-bit for
// float32, 128-bit for float64; p must be aligned to the pair (the emulator aborts otherwise).
template <typename A>
struct alignas(2 * sizeof(A)) Pair2 {
  A x, y;
};
template <typename A>
__device__ __forceinline__ Pair2<A> lds2(const A* p) {
#ifdef MSFUSED_CUDA_EMU
  if (reinterpret_cast<uintptr_t>(p) % (2 * sizeof(A)) != 0)
    emu_fail("lds2: address not aligned to the pair");
#endif
  return *reinterpret_cast<const Pair2<A>*>(p);
}

// a * b + c with one rounding, in the accumulation type.
__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

// float32 accumulation for float/half/bfloat16, float64 for double.
template <typename T> struct AccT { using type = float; };
template <> struct AccT<double> { using type = double; };

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
// (tools/cuda_emu/emu.h supplies __half, __nv_bfloat16 and these intrinsics on the CPU.)
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// The block's activation: act_apply(act, z) and act_grad(act, g, v) of csrc/activations.h.

#ifndef MSFUSED_CUDA_EMU
template <typename... Params, typename... Args>
inline cudaError_t launch_ex(bool early, dim3 cluster, void (*kernel)(Params...), dim3 grid,
                             dim3 block, size_t smem, cudaStream_t stream, Args&&... args) {
  const unsigned nct = cluster.x * cluster.y * cluster.z;
  if (!early && nct == 1) {
    kernel<<<grid, block, smem, stream>>>(std::forward<Args>(args)...);
    return cudaGetLastError();
  }
  if (nct < 1 || nct > 8 || grid.x % cluster.x != 0 || grid.y % cluster.y != 0 ||
      grid.z % cluster.z != 0)
    return cudaErrorInvalidValue;
  cudaLaunchAttribute attr[2];
  unsigned n = 0;
  if (early) {
    attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[n++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (nct > 1) {
    attr[n].id = cudaLaunchAttributeClusterDimension;
    attr[n].val.clusterDim.x = cluster.x;
    attr[n].val.clusterDim.y = cluster.y;
    attr[n++].val.clusterDim.z = cluster.z;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = n;
  const cudaError_t e = cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
  if (e != cudaSuccess) (void)cudaGetLastError();  // reported by the caller, not left sticky
  return e;
}
#endif

// Whether the tensor-core kernels may start before the kernel before them in the stream
// completes (programmatic dependent launch: the forward, and each of the backward's three
// launches): MSFUSED_CUDA_PDL=1 (read once per process; by the emulator at every call) on a
// device of compute capability 9.0 or higher. Off by default until a GPU run has timed it
// (benchmarks/NOTES.md entry 55) and checked it under CUDA graph capture, which the
// harness's GPU timing uses.
bool pdl_enabled();

// Whether the one-launch forward may run as thread-block clusters sharing each run of tiles
// (forward_mma_plan.h): MSFUSED_CUDA_FWD_CLUSTER=1 (read once per process; by the emulator at
// every call) on a device of compute capability 9.0 or higher. Off by default until a GPU run
// has timed it (benchmarks/NOTES.md entry 61).
bool fwd_clusters_enabled();

// Whether a cluster of `cluster` CTAs of `threads` threads and `smem` bytes of dynamic shared
// memory each fits on the current device (cudaOccupancyMaxActiveClusters at least 1), asked
// once per kernel, device, cluster shape and shared memory (the answers kept in a small table:
// the query is a driver call that a launch should not repeat). The emulator runs any cluster
// of at most 8 CTAs.
template <typename Kernel>
inline bool cluster_fits(Kernel kernel, dim3 cluster, int threads, size_t smem) {
  const unsigned nct = cluster.x * cluster.y * cluster.z;
  if (nct <= 1) return true;
  if (nct > 8) return false;
#ifndef MSFUSED_CUDA_EMU
  struct Fit {
    const void* kernel;
    int dev;
    unsigned cx, cy;
    size_t smem;
    bool fits;
  };
  static std::mutex lock;
  static Fit seen[64];
  static int nseen = 0;
  int dev = 0;
  cudaGetDevice(&dev);
  const void* key = reinterpret_cast<const void*>(kernel);
  std::lock_guard<std::mutex> guard(lock);
  for (int i = 0; i < nseen; ++i)
    if (seen[i].kernel == key && seen[i].dev == dev && seen[i].cx == cluster.x &&
        seen[i].cy == cluster.y && seen[i].smem == smem)
      return seen[i].fits;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = cluster.x;
  attr[0].val.clusterDim.y = cluster.y;
  attr[0].val.clusterDim.z = cluster.z;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = cluster;  // one cluster: the query's answer does not depend on the grid
  cfg.blockDim = dim3(unsigned(threads));
  cfg.dynamicSmemBytes = smem;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  const bool fits =
      cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess && clusters >= 1;
  if (!fits) (void)cudaGetLastError();
  if (nseen < 64) seen[nseen++] = Fit{key, dev, cluster.x, cluster.y, smem, fits};
  return fits;
#else
  (void)kernel;
  (void)threads;
  (void)smem;
  return true;
#endif
}

// Raises a kernel's dynamic shared-memory limit (the opt-in above 48 KB) to `bytes` where it
// is not that high yet on the current device; `raised` is the kernel's own per-device record
// (a function-local static of its launcher), so the attribute is set once per kernel, device
// and new maximum rather than on every launch. Launches may come from several host threads
// (DataParallel, a thread per stream): the record is atomic for the fast path, and raising
// it holds a lock, so that a thread asking for less cannot set the attribute back below what
// the record says another thread set. nullptr or the error's message.
inline std::mutex& dynamic_smem_lock() {
  static std::mutex m;
  return m;
}
template <typename Kernel>
inline const char* allow_dynamic_smem(Kernel kernel, size_t bytes,
                                      std::atomic<int> (&raised)[64]) {
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64) return "CUDA device index out of range";
  if (int(bytes) <= raised[dev].load(std::memory_order_acquire)) return nullptr;
  std::lock_guard<std::mutex> lock(dynamic_smem_lock());
  if (int(bytes) <= raised[dev].load(std::memory_order_relaxed)) return nullptr;
  const cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
  if (e != cudaSuccess) return cudaGetErrorString(e);
  raised[dev].store(int(bytes), std::memory_order_release);
  return nullptr;
}

// Offset of element (b, c, h, w) of a (B, C, H, W) tensor in NCHW or NHWC memory.
__device__ __forceinline__ int64_t io_index(bool channels_last, int64_t b, int64_t c, int64_t h,
                                            int64_t w, int64_t C, int64_t H, int64_t W) {
  return channels_last ? ((b * H + h) * W + w) * C + c : ((b * C + c) * H + h) * W + w;
}

// Sum over a 3x3 window of a row-major tile: sum_ij w9[3i+j] * src[i * ld + j].
template <typename A>
__device__ __forceinline__ A dw3(const A* __restrict__ src, int ld, const A* __restrict__ w9) {
  A s = A(0);
#pragma unroll
  for (int i = 0; i < 3; ++i)
#pragma unroll
    for (int j = 0; j < 3; ++j) s += w9[i * 3 + j] * src[i * ld + j];
  return s;
}

}  // namespace cuda
}  // namespace msfused
