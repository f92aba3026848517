// C entry points of the emulated kernels for run_emu.py (ctypes).
#include <cstdio>

#include "backward_mma.h"
#include "block_cuda.h"
#include "global_io.cuh"

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

// The launches' result for ctypes: 1 when the launcher refused (its message printed), 3 when
// a kernel accessed global memory outside the registered tensors or wrote an input
// (emu_bounds.h), 2 when a CTA raced another of its launch in global memory (emu_races.h);
// the first of each printed.
static int result_of(const char* e) {
  char bad_first[320], race_first[320];
  const uint64_t bad = emu_bounds.take(bad_first, sizeof(bad_first));  // (both reset here)
  const uint64_t races = emu_races.take(race_first, sizeof(race_first));
  if (e) {
    std::fprintf(stderr, "%s\n", e);
    return 1;
  }
  if (bad) {
    std::fprintf(stderr, "cuda_emu: %llu bad global access(es); the first: %s\n",
                 (unsigned long long)bad, bad_first);
    return 3;
  }
  if (races) {
    std::fprintf(stderr, "cuda_emu: %llu race(s); the first: %s\n",
                 (unsigned long long)races, race_first);
    return 2;
  }
  return 0;
}

// The tensors of the next call (emu_bounds.h): n pointers, their sizes in bytes, and whether
// the call may write them. The call checks every global access against them, then forgets them.
extern "C" void emu_tensors(int n, void* const* ptrs, const uint64_t* bytes, const int* writable) {
  emu_bounds.set(n, ptrs, bytes, writable);
}

// float32's forward and backward GEMMs on TF32 tensor cores (emu_set_tf32(1)) or on exact
// float32 FMAs (0, the default).
static bool emu_tf32 = false;
extern "C" void emu_set_tf32(int on) { emu_tf32 = on != 0; }

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16.
template <typename T>
static const char* fwd(const BlockDesc& d, void** p, void* y, void* pre) {
  return cuda::launch_block_forward<T>(d, tens<T>(p), static_cast<T*>(y), static_cast<T*>(pre),
                                       emu_tf32, nullptr);
}

template <typename T>
static const char* bwd(const BlockDesc& d, void** p, const void* gy, const void* saved, void** g,
                       void* ws) {
  return cuda::launch_block_backward<T>(d, tens<T>(p), static_cast<const T*>(gy),
                                        static_cast<const T*>(saved), grads<T>(g), ws, emu_tf32,
                                        nullptr);
}

extern "C" int emu_forward(int dtype, const int64_t* dv, void** p, void* y, void* pre) {
  const BlockDesc d = desc_of(dv);
  const char* e = dtype == 1 ? fwd<double>(d, p, y, pre)
                : dtype == 2 ? fwd<__half>(d, p, y, pre)
                : dtype == 3 ? fwd<__nv_bfloat16>(d, p, y, pre)
                             : fwd<float>(d, p, y, pre);
  return result_of(e);
}

// elem: the element size in bytes (2, 4 or 8), as the binding passes it.
extern "C" size_t emu_ws(const int64_t* dv, int elem) {
  return cuda::block_backward_workspace_bytes(desc_of(dv), elem);
}

extern "C" int emu_backward(int dtype, const int64_t* dv, void** p, const void* gy,
                            const void* saved, void** g, void* ws) {
  const BlockDesc d = desc_of(dv);
  const char* e = dtype == 1 ? bwd<double>(d, p, gy, saved, g, ws)
                : dtype == 2 ? bwd<__half>(d, p, gy, saved, g, ws)
                : dtype == 3 ? bwd<__nv_bfloat16>(d, p, gy, saved, g, ws)
                             : bwd<float>(d, p, gy, saved, g, ws);
  return result_of(e);
}

// Global bytes the kernels read from x, read elsewhere (weights, biases) and wrote, since
// the last call (then reset); x_bytes: the size of x, whose reads are counted apart.
extern "C" void emu_bytes(const void* x, uint64_t x_bytes, uint64_t* read_x, uint64_t* read_other,
                          uint64_t* written) {
  *read_x = emu_bytes_read_x.exchange(0);
  *read_other = emu_bytes_read.exchange(0);
  *written = emu_bytes_written.exchange(0);
  emu_x_lo = x;
  emu_x_hi = static_cast<const unsigned char*>(x) + x_bytes;
}

// The L2 model (emu_l2.h): emu_l2_reset(capacity in bytes, 0 off; cold: emptied before each
// launch) starts counting; emu_l2_dram writes the dirty sectors back and reads the DRAM bytes.
extern "C" void emu_l2_reset(uint64_t bytes, int cold) { emu_l2.reset(bytes, cold != 0); }
extern "C" void emu_l2_dram(uint64_t* read, uint64_t* written) {
  emu_l2.write_back();
  *read = emu_l2.dram_read;
  *written = emu_l2.dram_written;
}
// Attribution: emu_l2_region(ptr, bytes) registers a range (none: clear them all);
// emu_l2_region_dram(i, ...) reads range i's DRAM bytes (after emu_l2_dram).
extern "C" void emu_l2_region(const void* p, uint64_t bytes) {
  if (p == nullptr) {
    emu_l2.regions.clear();
    return;
  }
  const uint64_t lo = reinterpret_cast<uintptr_t>(p);
  emu_l2.regions.push_back(EmuL2::Region{lo, lo + bytes, 0, 0});
}
extern "C" void emu_l2_region_dram(int i, uint64_t* read, uint64_t* written) {
  *read = emu_l2.regions[size_t(i)].read;
  *written = emu_l2.regions[size_t(i)].written;
}

// The one-launch forward's plan for a call with elements of elem bytes (2: float16/bfloat16, 4:
// float32, 8: float64): TH, TW, CTAs per image, smem bytes, vec_x, vec_w, vec_y, tiles per CTA down
// a column (run), tiles per image, the xs segment's K offset (-1: none; an identity's x then
// comes from global memory), the CTAs of a cluster sharing each run (1: none; CTAs per image
// count each), whether they split the rows (1) or the GEMM blocks (0).
extern "C" void emu_mma_plan(const int64_t* dv, void** p, void* y, int64_t* out, int elem) {
  const BlockDesc d = desc_of(dv);
  const cuda::MmaPlan pl =
      elem == 8   ? cuda::plan_forward_mma<double>(d, tens<double>(p),
                                                   static_cast<const double*>(y),
                                                   cuda::mma_device())
      : elem == 4 ? cuda::plan_forward_mma<float>(d, tens<float>(p),
                                                  static_cast<const float*>(y),
                                                  cuda::mma_device())
                  : cuda::plan_forward_mma<__nv_bfloat16>(d, tens<__nv_bfloat16>(p),
                                                          static_cast<const __nv_bfloat16*>(y),
                                                          cuda::mma_device());
  const int cluster = pl.cluster > 1 ? pl.cluster : 1;
  out[0] = pl.TH; out[1] = pl.TW; out[2] = int64_t(pl.tiles_w) * pl.runs_h * cluster;
  out[3] = pl.smem; out[4] = pl.vec_x; out[5] = pl.vec_w; out[6] = pl.vec_y;
  out[7] = pl.run; out[8] = pl.tiles_hw; out[9] = pl.seg_x; out[10] = cluster;
  out[11] = pl.cluster_rows;
}

// Launch 2 of the float16/bfloat16 backward (block_backward_dw.cu): da, db pixel-major
// (B, Ho, Wo, C); dx in the io layout, holding the shortcut's gradient at the strided input
// pixels of a residual block as launch 1 leaves it; part: emu_dw_parts(dv) * C * 30 floats
// (doubles for float64).
template <typename T>
static const char* bwd_dw(const BlockDesc& d, void** p, const void* da, const void* db,
                          void* dx, void* part) {
  return cuda::launch_backward_dw<T>(d, tens<T>(p), static_cast<const T*>(da),
                                     static_cast<const T*>(db), static_cast<T*>(dx),
                                     static_cast<cuda::bwd_acc_t<T>*>(part), nullptr);
}

extern "C" int emu_backward_dw(int dtype, const int64_t* dv, void** p, const void* da,
                               const void* db, void* dx, void* part) {
  const BlockDesc d = desc_of(dv);
  const char* e = dtype == 1 ? bwd_dw<double>(d, p, da, db, dx, part)
                : dtype == 2 ? bwd_dw<__half>(d, p, da, db, dx, part)
                : dtype == 3 ? bwd_dw<__nv_bfloat16>(d, p, da, db, dx, part)
                             : bwd_dw<float>(d, p, da, db, dx, part);
  return result_of(e);
}

extern "C" int64_t emu_dw_parts(const int64_t* dv) { return cuda::backward_dw_parts(desc_of(dv)); }
// Launch 2's shared memory per CTA for elements of elem bytes.
extern "C" int64_t emu_dw_smem(const int64_t* dv, int elem) {
  return int64_t(cuda::backward_dw_smem(desc_of(dv), elem));
}

// The three-launch backward's plan for a shape (launch 1) with elements of elem bytes (2, 4 for
// float32, 8 for float64): P (0: the older FMA backward runs), TH, tiles per group, groups, split,
// channel blocks, shared memory bytes, workspace bytes, row blocks, images per batch slice, slices,
// whether the data-gradient units are halves (dg_half), the CTAs of a cluster summing their
// partials (red), the partials (parts).
extern "C" void emu_bwd_plan(const int64_t* dv, int64_t* out, int elem) {
  const cuda::BwdMmaPlan pl = cuda::backward_mma_plan(desc_of(dv), elem);
  out[0] = pl.P; out[1] = pl.TH; out[2] = pl.GT; out[3] = pl.groups; out[4] = pl.split;
  out[5] = pl.cblocks; out[6] = pl.smem; out[7] = int64_t(pl.ws_total); out[8] = pl.rblocks;
  out[9] = pl.slice_imgs;
  out[10] = pl.slice_imgs > 0 ? (desc_of(dv).B + pl.slice_imgs - 1) / pl.slice_imgs : 0;
  out[11] = pl.dg_half;
  out[12] = pl.red;
  out[13] = pl.parts;
}

// A probe of emu_races.h and emu_bounds.h (tests/test_cuda_emu.py): CTA b of a 4-CTA launch
// adds 1 to element b of buf, and with mode 1 also writes element b + 1 (two CTAs write one
// element), 2 reads element b + 1 (which the next CTA writes), 3 reads element b - 1 before
// its own write (which the previous CTA writes: the same race found in the other order),
// 4 (CTA 3 only) reads element 4, 5 writes it; the caller registers buf's extent. Modes 7
// and 8 launch it as a kernel that may start early (MSF_LAUNCH_PDL), 7 touching buf before
// its grid_dependency_wait(), 8 after.
static __global__ void race_probe_kernel(float* buf, int mode) {
  const int b = int(blockIdx.x);
  if (threadIdx.x != 0) return;
  if (mode == 8) ptx::grid_dependency_wait();
  float v = cuda::ld(buf + b);
  if (mode == 2 && b + 1 < 4) v += cuda::ld(buf + b + 1);
  if (mode == 3 && b > 0) v += cuda::ld(buf + b - 1);
  if (mode == 4 && b == 3) v += cuda::ldg(buf + 4);
  cuda::stg(buf + b, v + 1.0f);
  if (mode == 1 && b + 1 < 4) cuda::stg(buf + b + 1, v);
  if (mode == 5 && b == 3) cuda::stg(buf + 4, v);
}

extern "C" int emu_race_probe(float* buf, int mode) {
  if (mode >= 7) MSF_LAUNCH_PDL(true, race_probe_kernel, 4, 32, 0, nullptr, buf, mode);
  else MSF_LAUNCH(race_probe_kernel, 4, 32, 0, nullptr, buf, mode);
  return result_of(nullptr);
}
