// Global-memory loads and stores of the tensor-core kernels, as named helpers so that the CPU
// emulator (tools/cuda_emu) can count every byte a launch reads and writes: the kernels that
// use these touch global memory only through them and ptx::cp_async_16.
#pragma once
#include <cstdint>

namespace msfused {
namespace cuda {

// Whether a pointer allows the 16-byte paths (host side: the launchers' plans).
inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// 16 bytes, 16-byte aligned: the unit of the vector paths.
struct alignas(16) Vec16 {
  uint32_t w[4];
};

// ldg: through the read-only path, for what no thread of the kernel writes; ld: a plain
// load, for what the kernel itself overwrites afterwards (launch 2 reading dx before
// completing it).
#ifndef MSFUSED_CUDA_EMU
template <typename T>
__device__ __forceinline__ T ldg(const T* p) {
  return __ldg(p);
}
template <typename T>
__device__ __forceinline__ T ld(const T* p) {
  return *p;
}
template <typename T>
__device__ __forceinline__ void stg(T* p, T v) {
  *p = v;
}
__device__ __forceinline__ void stg16(void* p, const Vec16& v) {
  *reinterpret_cast<uint4*>(p) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
}
__device__ __forceinline__ Vec16 ldg16(const void* p) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  return Vec16{{u.x, u.y, u.z, u.w}};
}
#else   // tools/cuda_emu/emu.h: emu_count_read / emu_count_written (false: out of bounds,
        // reported by the emulator; the access is skipped and a read gives zeros)
template <typename T>
inline T ldg(const T* p) {
  return emu_count_read(p, sizeof(T)) ? *p : T{};
}
template <typename T>
inline T ld(const T* p) {
  return emu_count_read(p, sizeof(T)) ? *p : T{};
}
template <typename T>
inline void stg(T* p, T v) {
  if (emu_count_written(p, sizeof(T))) *p = v;
}
inline void stg16(void* p, const Vec16& v) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu_fail("stg16: address not 16-byte aligned");
  if (emu_count_written(p, 16)) *static_cast<Vec16*>(p) = v;
}
inline Vec16 ldg16(const void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu_fail("ldg16: address not 16-byte aligned");
  return emu_count_read(p, 16) ? *static_cast<const Vec16*>(p) : Vec16{};
}
#endif

}  // namespace cuda
}  // namespace msfused
