// One warp through csrc/cuda/ptx_wrappers.cuh: cp.async stages a 16x16 A and a 16x8 B tile
// (B's last row zero-filled), ldmatrix loads the fragments, one mma.sync m16n8k16 adds A*B to
// ones. Built by nvcc (tests/test_cuda_build.py reads its SASS; tools/gpu/check.sh runs the
// modes that follow the rules on the GPU) and by the emulator (tests/test_cuda_emu.py runs
// it): mode 0 checks D against a plain loop; each other mode breaks one rule and must abort
// with its message (or, mode 7, give wrong results); modes 8-11 are race_probe's, 20-29
// cluster_probe's.
#include <cstdint>
#include <cstdio>
#include <cstdlib>

#include "common.cuh"
#include "ptx_wrappers.cuh"

using namespace msfused;

template <typename T>
__device__ float to_f(T v);
template <>
__device__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <>
__device__ float to_f(__half v) { return __half2float(v); }

// One more wrong value, from any CTA (the emulator runs one thread at a time).
__device__ void count_bad(int* bad) {
#ifdef MSFUSED_CUDA_EMU
  ++*bad;
#else
  atomicAdd(bad, 1);
#endif
}

template <typename T>
__global__ void ptx_probe(const T* A, const T* B, float* D, int mode, int* bad) {
  MSF_EXTERN_SMEM(sm);
  T* sa = reinterpret_cast<T*>(sm);  // 16 x 16, row-major
  T* sb = sa + 16 * 16;              // 16 x 8, row-major [k][n]
  const int l = threadIdx.x;
  ptx::cp_async_16(sa + l * 8, A + l * 8, true);                 // 32 chunks of 8
  if (l < 16) ptx::cp_async_16(sb + l * 8, B + l * 8, l < 15);   // row 15 zero-filled
  ptx::cp_async_commit();
  if (mode != 1 && mode != 5) ptx::cp_async_wait<0>();          // 1, 5: no wait
  if (mode != 1 && mode != 2) __syncthreads();                   // 2: no barrier
  if (mode == 5) return;                                         // copies never waited for
  uint32_t a[4], b[2];
  const T* arow = sa + (l % 16) * 16 + 8 * (l / 16);
  if (mode == 3) arow += 4;                                      // 8 bytes: misaligned
  ptx::ldmatrix_x4(a, arow);
  if (mode == 7) ptx::ldmatrix_x2(b, sb + (l % 16) * 8);        // B's layout wrong: no .trans
  else ptx::ldmatrix_x2_trans(b, sb + (l % 16) * 8);
  float d[4] = {1.f, 1.f, 1.f, 1.f};
  if (mode == 4 && l == 7) return;                               // a lane leaves the warp
  ptx::mma_m16n8k16<T>(d, a, b);
  const int g = l / 4, t = l % 4;
  D[g * 8 + 2 * t] = d[0];
  D[g * 8 + 2 * t + 1] = d[1];
  D[(g + 8) * 8 + 2 * t] = d[2];
  D[(g + 8) * 8 + 2 * t + 1] = d[3];
  __syncthreads();
  if (l == 0)
    for (int i = 0; i < 16; ++i)
      for (int j = 0; j < 8; ++j) {
        float s = 1.f;
        for (int k = 0; k < 15; ++k) s += to_f(A[i * 16 + k]) * to_f(B[k * 8 + j]);
        if (s != D[i * 8 + j]) ++*bad;
      }
}

// Two warps read each other's half of a shared buffer, then overwrite their own half: with a
// plain store (mode 8) or a cp.async (9, 10) from G (all -1). Modes 8 and 9 lack the barrier
// between the reads and the overwrite, a race the emulator's schedule must expose as wrong
// values (bad > 0): warp 0 runs to the next barrier before warp 1 starts, and in every other
// block a cp.async lands at its issue. Mode 10 has the barrier and must give bad = 0; mode
// 11 is 10 with one float stored past the launch's dynamic shared memory, which must abort.
__global__ void race_probe(const float* G, float* out, int mode, int* bad) {
  MSF_EXTERN_SMEM(sm);
  float* s = reinterpret_cast<float*>(sm);  // 64 threads x 4 floats
  const int t = threadIdx.x;
  for (int i = 0; i < 4; ++i) s[4 * t + i] = float(t);
  __syncthreads();
  const float r = s[4 * (63 - t)];  // the other warp's
  if (mode >= 10) __syncthreads();
  if (mode == 8) {
    for (int i = 0; i < 4; ++i) s[4 * t + i] = -1.f;
  } else {
    ptx::cp_async_16(s + 4 * t, G + 4 * t, true);
    ptx::cp_async_commit();
    __syncthreads();
    ptx::cp_async_wait<0>();
  }
  __syncthreads();
  if (mode == 11 && t == 63) s[4 * 64] = 0.f;  // the first float past the 256
  out[64 * blockIdx.x + t] = r;
  __syncthreads();
  if (t == 0)
    for (int i = 0; i < 64; ++i)
      if (out[64 * blockIdx.x + i] != float(63 - i)) count_bad(bad);
}

// Thread-block clusters of K CTAs of 64 threads (4 clusters): each CTA fills its dynamic
// shared memory (64 floats) with 1000 x its block number + thread, then every thread reads
// its element of CTA (rank + 1) % K's through distributed shared memory into out. Mode 20 is
// correct (cluster_sync between the writes and the reads, and before returning); 27 the same
// with the barrier split around unrelated work (out2); each other mode breaks one rule:
//   21 no barrier between the writes and the reads (wrong values: the emulator runs the
//      ranks in order, then reversed, so one of two reads a neighbour not yet written);
//   22 no barrier before returning, the neighbour mapped after the first barrier (a CTA
//      maps a neighbour that has returned: aborts);
//   23 the same, mapped before it (reads a returned CTA's shared memory: wrong values);
//   24 cp.async into the neighbour's shared memory (cp.async is .shared::cta: aborts);
//   25 warp 1 skips the first cluster barrier (deadlock: aborts);
//   26 arrives twice without a wait (aborts);
//   28 maps a rank outside the cluster (aborts);
//   29 rank 0 writes into rank 1's shared memory after it may have returned (aborts after
//      the cluster).
__global__ void cluster_probe(const float* G, float* out, float* out2, int mode, int* bad) {
  MSF_EXTERN_SMEM(sm);
  float* s = reinterpret_cast<float*>(sm);
  const unsigned t = threadIdx.x, rank = ptx::cluster_ctarank(), K = ptx::cluster_nctarank();
  s[t] = float(1000 * blockIdx.x + t);
  const unsigned peer = mode == 28 ? K : (rank + 1) % K;
  float* early = (mode == 23 || mode == 29) ? ptx::map_shared_rank(s, peer) : nullptr;
  if (mode == 24) ptx::cp_async_16(ptx::map_shared_rank(s, peer) + 4 * (t % 16), G, true);
  if (mode == 26) ptx::cluster_arrive();
  if (mode == 27) {
    ptx::cluster_arrive();
    out2[64 * blockIdx.x + t] = G[t];  // work that the barrier does not guard
    ptx::cluster_wait();
  } else if (mode != 21 && !(mode == 25 && t >= 32)) {
    ptx::cluster_sync();
  }
  const float* nb = early != nullptr ? early : ptx::map_shared_rank(s, peer);
  if (mode == 29 && rank != 0) return;
  const float v = nb[t];
  if (mode == 29 && rank == 0) {
    __syncthreads();  // (rank 1 returns meanwhile in the emulator's reversed order)
    early[t] = -1.f;
  }
  if (mode < 22 || mode > 24 && mode != 29) ptx::cluster_sync();  // the neighbour is done reading
  out[64 * blockIdx.x + t] = v;
  __syncthreads();
  if (t == 0) {
    const unsigned first = blockIdx.x - rank;
    for (int i = 0; i < 64; ++i)
      if (out[64 * blockIdx.x + i] != float(1000 * (first + (rank + 1) % K) + i)) count_bad(bad);
  }
}

template __global__ void ptx_probe<__nv_bfloat16>(const __nv_bfloat16*, const __nv_bfloat16*,
                                                  float*, int, int*);
template __global__ void ptx_probe<__half>(const __half*, const __half*, float*, int, int*);

#ifdef MSFUSED_CUDA_EMU
template <typename T>
static int run(int mode, T (*from_f)(float)) {
  alignas(16) static T A[16 * 16], B[16 * 8];
  static float D[16 * 8];
  for (int i = 0; i < 16 * 16; ++i) A[i] = from_f(float(i % 7) - 3.f);
  for (int i = 0; i < 16 * 8; ++i) B[i] = from_f(float(i % 5) * 0.5f - 0.75f);
  int bad = 0;
  MSF_LAUNCH(ptx_probe<T>, dim3(1), dim3(32), (16 * 16 + 16 * 8) * sizeof(T), nullptr,
             (const T*)A, (const T*)B, D, mode, &bad);
  std::printf("bad=%d\n", bad);
  return bad != 0;
}

static int run_race(int mode) {
  alignas(16) static float G[256];
  static float out[128];
  for (float& g : G) g = -1.f;
  int bad = 0;
  MSF_LAUNCH(race_probe, dim3(2), dim3(64), 256 * sizeof(float), nullptr, (const float*)G, out,
             mode, &bad);
  std::printf("bad=%d\n", bad);
  return bad != 0;
}

static int run_cluster(int mode) {
  alignas(16) static float G[64];
  static float out[4 * 4 * 64], out2[4 * 4 * 64];
  for (float& g : G) g = 1.f;
  int bad = 0;
  const cudaError_t e = MSF_LAUNCH_CLUSTER(false, 4, cluster_probe, dim3(16), dim3(64),
                                           64 * sizeof(float), nullptr, (const float*)G, out,
                                           out2, mode, &bad);
  std::printf("bad=%d\n", e == cudaSuccess ? bad : -1);
  return bad != 0 || e != cudaSuccess;
}

int main(int argc, char** argv) {
  const int mode = std::atoi(argv[1]);
  if (mode >= 20) return run_cluster(mode);
  if (mode >= 8) return run_race(mode);
  if (mode == 6) return run<__half>(0, __float2half_rn);
  return run<__nv_bfloat16>(mode, __float2bfloat16_rn);
}
#else
// Built by nvcc for the GPU (tools/gpu/check.sh stage probes): the modes that follow the
// rules (0, 6, 10, 20, 27) on the hardware, each printing its count of wrong values, so the
// GPU confirms the emulator's stand-ins where a kernel uses them as it should (exit status
// 1 when any is wrong); then what a cluster barrier and distributed shared memory cost.
#include <vector>

template <typename T>
static T* to_device(const std::vector<T>& h) {
  T* d = nullptr;
  cudaMalloc(&d, h.size() * sizeof(T));
  cudaMemcpy(d, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

// Launches through `launch` with a zeroed bad counter and prints the mode's result.
template <typename F>
static int gpu_mode(int mode, F launch) {
  int* bad = to_device(std::vector<int>{0});
  const cudaError_t e = launch(bad);
  const cudaError_t s = cudaDeviceSynchronize();
  int h = -1;
  cudaMemcpy(&h, bad, sizeof(int), cudaMemcpyDeviceToHost);
  cudaFree(bad);
  std::printf("mode %d: bad=%d (%s)\n", mode, h,
              cudaGetErrorString(e != cudaSuccess ? e : s));
  return h != 0 || e != cudaSuccess || s != cudaSuccess;
}

template <typename T>
static int gpu_mma(int mode, T (*from_f)(float)) {
  std::vector<T> A(16 * 16), B(16 * 8);
  for (int i = 0; i < 16 * 16; ++i) A[i] = from_f(float(i % 7) - 3.f);
  for (int i = 0; i < 16 * 8; ++i) B[i] = from_f(float(i % 5) * 0.5f - 0.75f);
  T* dA = to_device(A);
  T* dB = to_device(B);
  float* D = to_device(std::vector<float>(16 * 8));
  const int r = gpu_mode(mode, [&](int* bad) {
    MSF_LAUNCH(ptx_probe<T>, dim3(1), dim3(32), (16 * 16 + 16 * 8) * sizeof(T), nullptr,
               (const T*)dA, (const T*)dB, D, 0, bad);
    return cudaGetLastError();
  });
  cudaFree(dA); cudaFree(dB); cudaFree(D);
  return r;
}

// What the cluster designs cost (benchmarks/NOTES.md entry 58), in clock64 cycles read by
// thread 0 of each CTA: `iters` cluster barriers, each after a global store by every thread
// or not (the barrier's release is MEMBAR.ALL.GPU in SASS, which waits for the thread's
// outstanding stores); then a copy of a neighbour's `bytes` of shared memory into its own
// through distributed shared memory, 16 bytes a thread at a time, `iters` times.
__global__ void cluster_timing(float* sink, int iters, int with_store, long long* cycles) {
  ptx::cluster_sync();
  const long long t0 = clock64();
  for (int i = 0; i < iters; ++i) {
    if (with_store) sink[blockIdx.x * blockDim.x + threadIdx.x] = float(i);
    ptx::cluster_sync();
  }
  const long long t1 = clock64();
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}

__global__ void dsmem_copy(int bytes, int iters, long long* cycles) {
  MSF_EXTERN_SMEM(sm);
  float4* own = reinterpret_cast<float4*>(sm);
  float4* dst = own + bytes / 16;
  const int n = bytes / 16;
  for (int i = threadIdx.x; i < n; i += blockDim.x) own[i] = make_float4(1.f, 2.f, 3.f, 4.f);
  ptx::cluster_sync();
  const unsigned K = ptx::cluster_nctarank();
  const float4* nb = ptx::map_shared_rank(own, (ptx::cluster_ctarank() + 1) % K);
  const long long t0 = clock64();
  for (int it = 0; it < iters; ++it) {
    for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = nb[i];
    __syncthreads();
  }
  const long long t1 = clock64();
  ptx::cluster_sync();  // the neighbour is done reading before this CTA returns
  if (threadIdx.x == 0) cycles[blockIdx.x] = t1 - t0;
}

// Mean cycles over the grid's CTAs of one launch, or -1 on an error.
template <typename F>
static double mean_cycles(int ctas, F launch) {
  long long* d = nullptr;
  cudaMalloc(&d, ctas * sizeof(long long));
  const cudaError_t e = launch(d);
  const cudaError_t s = cudaDeviceSynchronize();
  std::vector<long long> h(ctas);
  cudaMemcpy(h.data(), d, ctas * sizeof(long long), cudaMemcpyDeviceToHost);
  cudaFree(d);
  if (e != cudaSuccess || s != cudaSuccess) {
    std::printf("  (%s)\n", cudaGetErrorString(e != cudaSuccess ? e : s));
    return -1;
  }
  double sum = 0;
  for (long long c : h) sum += double(c);
  return sum / ctas;
}

static void time_clusters() {
  int khz = 0;
  cudaDeviceGetAttribute(&khz, cudaDevAttrClockRate, 0);
  std::printf("cluster costs (SM clock %d MHz, 256 threads a CTA, 16 clusters):\n", khz / 1000);
  float* sink = nullptr;
  cudaMalloc(&sink, 8 * 16 * 256 * sizeof(float));
  const int iters = 1000, bytes = 64 * 1024, copies = 20;
  for (unsigned K : {2u, 4u, 8u}) {
    const int ctas = int(16 * K);
    double bar[2];
    for (int st = 0; st < 2; ++st)
      bar[st] = mean_cycles(ctas, [&](long long* c) {
        return MSF_LAUNCH_CLUSTER(false, K, cluster_timing, dim3(ctas), dim3(256), 0, nullptr,
                                  sink, iters, st, c);
      }) / iters;
    cudaFuncSetAttribute(dsmem_copy, cudaFuncAttributeMaxDynamicSharedMemorySize, 2 * bytes);
    const double cp = mean_cycles(ctas, [&](long long* c) {
      return MSF_LAUNCH_CLUSTER(false, K, dsmem_copy, dim3(ctas), dim3(256), 2 * bytes, nullptr,
                                bytes, copies, c);
    }) / copies;
    if (bar[0] < 0 || bar[1] < 0 || cp < 0)
      std::printf("  cluster %u: not measured (above)\n", K);
    else
      std::printf("  cluster %u: barrier %.0f cycles, after a store %.0f; DSMEM copy of %d KB "
                  "%.0f cycles (%.1f bytes/cycle per SM)\n", K, bar[0], bar[1], bytes / 1024,
                  cp, bytes / cp);
  }
  cudaFree(sink);
}

int main() {
  float* G = to_device(std::vector<float>(256, -1.f));
  float* out = to_device(std::vector<float>(16 * 64));
  float* out2 = to_device(std::vector<float>(16 * 64));
  int fails = gpu_mma<__nv_bfloat16>(0, __float2bfloat16_rn) + gpu_mma<__half>(6, __float2half_rn);
  fails += gpu_mode(10, [&](int* bad) {
    MSF_LAUNCH(race_probe, dim3(2), dim3(64), 256 * sizeof(float), nullptr, (const float*)G, out,
               10, bad);
    return cudaGetLastError();
  });
  for (int mode : {20, 27})
    fails += gpu_mode(mode, [&](int* bad) {
      return MSF_LAUNCH_CLUSTER(false, 4, cluster_probe, dim3(16), dim3(64), 64 * sizeof(float),
                                nullptr, (const float*)G, out, out2, mode, bad);
    });
  time_clusters();
  return fails != 0;
}
#endif
