// One warp through csrc/cuda/ptx_wrappers.cuh: cp.async stages a 16x16 A and a 16x8 B tile
// (B's last row zero-filled), ldmatrix loads the fragments, one mma.sync m16n8k16 adds A*B to
// ones. Built by nvcc (tests/test_cuda_build.py reads its SASS) and by the emulator
// (tests/test_cuda_emu.py runs it): mode 0 checks D against a plain loop; each other mode
// breaks one rule and must abort with its message (or, mode 7, give wrong results); modes
// 8-11 are race_probe's.
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
    for (int i = 0; i < 64; ++i) *bad += out[64 * blockIdx.x + i] != float(63 - i);
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

int main(int argc, char** argv) {
  const int mode = std::atoi(argv[1]);
  if (mode >= 8) return run_race(mode);
  if (mode == 6) return run<__half>(0, __float2half_rn);
  return run<__nv_bfloat16>(mode, __float2bfloat16_rn);
}
#endif
