// C entry points of the emulated kernels for run_emu.py (ctypes).
#include <cstdio>

#include "block_cuda.h"

using namespace msfused;

static BlockDesc desc_of(const int64_t* v) {
  BlockDesc d;
  d.B = v[0]; d.C = v[1]; d.H = v[2]; d.W = v[3]; d.N = v[4]; d.Cout = v[5]; d.Ho = v[6];
  d.Wo = v[7]; d.stride = int(v[8]); d.merge = int(v[9]); d.act = int(v[10]);
  d.residual = v[11]; d.projection = v[12]; d.channels_last = v[13];
  return d;
}

template <typename T>
static BlockTensors<T> tens(void** p) {
  auto c = [&](int i) { return static_cast<const T*>(p[i]); };
  return BlockTensors<T>{c(0), c(1), c(2), c(3), c(4), c(5), c(6), c(7), c(8), c(9), c(10), c(11), c(12)};
}

template <typename T>
static BlockGrads<T> grads(void** p) {
  auto c = [&](int i) { return static_cast<T*>(p[i]); };
  return BlockGrads<T>{c(0), c(1), c(2), c(3), c(4), c(5), c(6), c(7), c(8), c(9), c(10), c(11), c(12)};
}

extern "C" int emu_forward(int elem, const int64_t* dv, void** p, void* y, void* pre) {
  const BlockDesc d = desc_of(dv);
  const char* e = elem == 8 ? cuda::launch_block_forward<double>(d, tens<double>(p), (double*)y, (double*)pre, nullptr)
                            : cuda::launch_block_forward<float>(d, tens<float>(p), (float*)y, (float*)pre, nullptr);
  if (e) std::fprintf(stderr, "%s\n", e);
  return e ? 1 : 0;
}

extern "C" size_t emu_ws(const int64_t* dv, int elem) {
  return cuda::block_backward_workspace_bytes(desc_of(dv), elem);
}

extern "C" int emu_backward(int elem, const int64_t* dv, void** p, const void* gy, const void* saved,
                            void** g, void* ws) {
  const BlockDesc d = desc_of(dv);
  const char* e = elem == 8
      ? cuda::launch_block_backward<double>(d, tens<double>(p), (const double*)gy, (const double*)saved, grads<double>(g), ws, nullptr)
      : cuda::launch_block_backward<float>(d, tens<float>(p), (const float*)gy, (const float*)saved, grads<float>(g), ws, nullptr);
  if (e) std::fprintf(stderr, "%s\n", e);
  return e ? 1 : 0;
}
