// CPU stand-ins for csrc/cuda/ptx_wrappers.cuh (mma.sync m16n8k16 and m16n8k8 tf32, ldmatrix,
// cp.async), with
// the same names and PTX's per-lane fragment layouts, so a kernel's fragment bookkeeping is
// checked without a GPU: a lane that holds the wrong element gives a wrong result. What PTX
// requires is asserted (emu_fail aborts with the rule broken):
//   * mma and ldmatrix are warp-collective: every lane of the warp calls, with the same
//     operation (a lane that skips it leaves the warp waiting: the scheduler aborts);
//   * ldmatrix rows and cp.async addresses are 16-byte aligned, and inside the launch's
//     dynamic shared memory when they point into it;
//   * shared memory written by cp.async is read only after this thread's cp_async_wait<>
//     retired the copy's group and, for any other thread, after a __syncthreads() (reading
//     earlier aborts when through ldmatrix; in every other block the bytes land only at the
//     wait, so plain loads see the launch's NaN poison, and in the others at the issue, so
//     a copy into a buffer that other threads still read changes what they read: see
//     emu_async_land_at_issue in emu.h); a block that ends with copies never waited aborts.
// The mma sums in float, in k order, starting from the accumulator (tensor cores may add in
// another order; products of 16-bit values are exact in float either way).
#pragma once
#include <algorithm>
#include <iterator>
#include <mutex>
#include <vector>

namespace msfused {
namespace ptx {

struct EmuPtxLane {
  uint32_t a[4];
  uint32_t b[2];
  const void* addr;
};
inline EmuPtxLane emu_ptx_lanes[kEmuMaxFibers / 32][32];  // [warp of the cluster][lane]

template <typename T>
inline float emu_half_bits(uint16_t bits) {
  T v;
  v.x = bits;
  if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(v);
  else return __half2float(v);
}

template <typename T>
inline void mma_m16n8k16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>,
                "mma_m16n8k16: bfloat16 or float16 operands");
  const unsigned w = emu_fiber / 32, lane = threadIdx.x % 32;
  EmuPtxLane& me = emu_ptx_lanes[w][lane];
  std::memcpy(me.a, a, sizeof(me.a));
  std::memcpy(me.b, b, sizeof(me.b));
  emu_warp_collective(20 + std::is_same_v<T, __half>, nullptr, 0, 0);
  float A[16][16], B[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const EmuPtxLane& o = emu_ptx_lanes[w][l];
    auto lo = [](uint32_t r) { return emu_half_bits<T>(uint16_t(r & 0xffffu)); };
    auto hi = [](uint32_t r) { return emu_half_bits<T>(uint16_t(r >> 16)); };
    A[g][2 * t] = lo(o.a[0]);         A[g][2 * t + 1] = hi(o.a[0]);
    A[g + 8][2 * t] = lo(o.a[1]);     A[g + 8][2 * t + 1] = hi(o.a[1]);
    A[g][2 * t + 8] = lo(o.a[2]);     A[g][2 * t + 9] = hi(o.a[2]);
    A[g + 8][2 * t + 8] = lo(o.a[3]); A[g + 8][2 * t + 9] = hi(o.a[3]);
    B[2 * t][g] = lo(o.b[0]);         B[2 * t + 1][g] = hi(o.b[0]);
    B[2 * t + 8][g] = lo(o.b[1]);     B[2 * t + 9][g] = hi(o.b[1]);
  }
  const int g = lane / 4, t = lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int i = 0; i < 4; ++i) {
    float s = d[i];
    for (int k = 0; k < 16; ++k) s += A[rows[i]][k] * B[k][cols[i]];
    d[i] = s;
  }
  emu_warp_collective(22, nullptr, 0, 0);  // every lane has read before any lane goes on
}

// TF32: the tensor cores read sign, exponent and the top 10 mantissa bits of each float
// operand (the low 13 bits are not used); products of such values are exact in float.
inline float emu_tf32(uint32_t bits) { return emu_bits_to_float(bits & 0xffffe000u); }

inline void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  const unsigned w = emu_fiber / 32, lane = threadIdx.x % 32;
  EmuPtxLane& me = emu_ptx_lanes[w][lane];
  std::memcpy(me.a, a, sizeof(me.a));
  std::memcpy(me.b, b, sizeof(me.b));
  emu_warp_collective(24, nullptr, 0, 0);
  float A[16][8], B[8][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const EmuPtxLane& o = emu_ptx_lanes[w][l];
    A[g][t] = emu_tf32(o.a[0]);
    A[g + 8][t] = emu_tf32(o.a[1]);
    A[g][t + 4] = emu_tf32(o.a[2]);
    A[g + 8][t + 4] = emu_tf32(o.a[3]);
    B[t][g] = emu_tf32(o.b[0]);
    B[t + 4][g] = emu_tf32(o.b[1]);
  }
  const int g = lane / 4, t = lane % 4;
  const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
  for (int i = 0; i < 4; ++i) {
    float s = d[i];
    for (int k = 0; k < 8; ++k) s += A[rows[i]][k] * B[k][cols[i]];
    d[i] = s;
  }
  emu_warp_collective(25, nullptr, 0, 0);
}

// ---- cp.async bookkeeping (one block or cluster at a time, as emu_launch runs them) ----
struct EmuAsyncCopy {
  unsigned char* dst;
  unsigned char data[16];
  unsigned owner;  // emu_fiber of the issuing thread
  int group;     // the owner's group number
  bool landed;   // retired by the owner's wait; visible to others after its next barrier
};
inline std::mutex emu_async_m;
inline std::vector<EmuAsyncCopy> emu_async;
inline int emu_async_open_group_of[kEmuMaxFibers];  // per thread: the group a new copy joins

// cp.async's destination and ldmatrix's rows are the executing CTA's own shared memory
// (.shared::cta): not another CTA's of the cluster.
inline void emu_check_smem_16(const void* p, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % 16 != 0) emu_fail(what);
  const auto* b = static_cast<const unsigned char*>(p);
  if (emu_smem_rank_of(b) < 0) return;
  if (b < emu_smem || b >= emu_smem + kEmuSmemRegion)
    emu_fail("cp.async or ldmatrix on another CTA's shared memory (distributed shared memory)");
  if (size_t(b - emu_smem) + 16 > emu_dyn_bytes)
    emu_fail("16-byte shared-memory access beyond the launch's dynamic shared memory");
}

// A read of [p, p + 16) by this thread: nothing of it may be in flight, or landed for
// another thread and not yet published by a barrier.
inline void emu_check_async_read(const void* p) {
  const auto* b = static_cast<const unsigned char*>(p);
  std::lock_guard<std::mutex> lk(emu_async_m);
  for (const EmuAsyncCopy& c : emu_async) {
    if (c.dst + 16 <= b || b + 16 <= c.dst) continue;
    if (!c.landed)
      emu_fail("shared memory read while a cp.async into it is in flight (no cp_async_wait)");
    if (c.owner != emu_fiber)
      emu_fail("shared memory written by another thread's cp.async read before a "
               "__syncthreads()");
  }
}

inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  emu_check_smem_16(smem, "cp.async: shared-memory address not 16-byte aligned");
  if (valid && reinterpret_cast<uintptr_t>(gmem) % 16 != 0)
    emu_fail("cp.async: global address not 16-byte aligned");
  EmuAsyncCopy c;
  c.dst = static_cast<unsigned char*>(smem);
  if (valid && emu_count_read(gmem, 16)) std::memcpy(c.data, gmem, 16);
  else std::memset(c.data, 0, 16);
  if (emu_async_land_at_issue) std::memcpy(c.dst, c.data, 16);  // (and again at the wait)
  c.owner = emu_fiber;
  c.group = emu_async_open_group_of[emu_fiber];
  c.landed = false;
  std::lock_guard<std::mutex> lk(emu_async_m);
  emu_async.push_back(c);
}

inline void cp_async_commit() { ++emu_async_open_group_of[emu_fiber]; }

template <int N>
inline void cp_async_wait() {
  static_assert(N >= 0, "cp_async_wait: N >= 0");
  std::lock_guard<std::mutex> lk(emu_async_m);
  for (EmuAsyncCopy& c : emu_async)  // committed groups older than the newest N
    if (c.owner == emu_fiber && !c.landed &&
        c.group < emu_async_open_group_of[emu_fiber] - N) {
      std::memcpy(c.dst, c.data, 16);
      c.landed = true;
    }
}

// ---- ldmatrix ---------------------------------------------------------------------------
inline void emu_ldmatrix(uint32_t* r, int nmat, bool trans, const void* row, int op) {
  const unsigned w = emu_fiber / 32, lane = threadIdx.x % 32;
  emu_ptx_lanes[w][lane].addr = row;
  emu_warp_collective(op, nullptr, 0, 0);
  for (int j = 0; j < nmat; ++j)  // this lane's values come from row lane/4 (or, transposed,
    for (int i = 0; i < 8; ++i) {  // from every row) of each matrix: check all rows it reads
      if (!trans && i != int(lane / 4)) continue;
      const void* p = emu_ptx_lanes[w][8 * j + i].addr;
      emu_check_smem_16(p, "ldmatrix: row address not 16-byte aligned");
      emu_check_async_read(p);
    }
  for (int j = 0; j < nmat; ++j) {
    const int rr = lane / 4, cc = 2 * (lane % 4);
    auto elem = [&](int row_i, int col_i) {
      const auto* p = static_cast<const uint16_t*>(emu_ptx_lanes[w][8 * j + row_i].addr);
      return uint32_t(p[col_i]);
    };
    const uint32_t lo = trans ? elem(cc, rr) : elem(rr, cc);
    const uint32_t hi = trans ? elem(cc + 1, rr) : elem(rr, cc + 1);
    r[j] = lo | (hi << 16);
  }
  emu_warp_collective(op + 1, nullptr, 0, 0);
}

inline void ldmatrix_x4(uint32_t (&r)[4], const void* row) { emu_ldmatrix(r, 4, false, row, 30); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  emu_ldmatrix(r, 4, true, row, 32);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row) { emu_ldmatrix(r, 2, false, row, 34); }
inline void ldmatrix_x2_trans(uint32_t (&r)[2], const void* row) {
  emu_ldmatrix(r, 2, true, row, 36);
}

// ---- thread-block clusters (sm_90): ranks, the cluster barrier, distributed shared memory --
inline unsigned cluster_ctarank() { return emu_fiber / emu_cta.nt; }
inline unsigned cluster_nctarank() { return emu_cta.nct; }

// barrier.cluster.arrive.release.aligned and barrier.cluster.wait.acquire.aligned: every lane
// of a warp executes the same one (.aligned: checked as a warp-collective op), and each
// thread alternates arrive and wait. The wait returns once every thread of the cluster has
// arrived in this phase (emu_run_block); what a thread wrote to shared memory before its
// arrive, cp.async copies it had waited for included, is then visible to the cluster.
inline void cluster_arrive() {
  emu_warp_collective(40, nullptr, 0, 0);
  EmuFiber& f = emu_cta.fibers[emu_fiber];
  if (f.cl_arrived != f.cl_waited) emu_fail("barrier.cluster.arrive twice without a wait");
  emu_ptx_publish_own();
  ++f.cl_arrived;
}
inline void cluster_wait() {
  emu_warp_collective(41, nullptr, 0, 0);
  EmuFiber& f = emu_cta.fibers[emu_fiber];
  if (f.cl_arrived != f.cl_waited + 1) emu_fail("barrier.cluster.wait without an arrive");
  f.state = EMU_AT_CLUSTER;
  emu_yield();
}
inline void cluster_sync() {
  cluster_arrive();
  cluster_wait();
}

// mapa: p (in this CTA's dynamic shared memory) as the same offset in CTA `rank`'s. Aborts
// for an address outside this CTA's allocation, a rank outside the cluster, or a CTA that
// has returned (its shared memory is gone; a pointer mapped before it returned reads the
// NaN poison afterwards).
template <typename T>
inline T* map_shared_rank(T* p, unsigned rank) {
  const auto* b = reinterpret_cast<const unsigned char*>(p);
  if (b < emu_smem || b >= emu_smem + emu_dyn_bytes)
    emu_fail("mapa: not an address in this CTA's dynamic shared memory");
  if (rank >= emu_cta.nct) emu_fail("mapa: rank outside the cluster");
  if (emu_cta_exited(rank)) emu_fail("mapa: that CTA of the cluster has returned");
  return reinterpret_cast<T*>(emu_smem_region(rank) + (b - emu_smem));
}

// A code-generation hint on the GPU (ptx_wrappers.cuh); nothing to emulate.
inline void opaque(int&) {}

// discard.global.L2: the line leaves the L2 model without a write-back, and its bytes are
// poisoned (all ones: NaN in float, bfloat16 and float16), so that a kernel reading them
// afterwards, i.e. a discard of data still live, shows up in the results.
inline void discard_l2_line(void* p) {
  if (reinterpret_cast<uintptr_t>(p) % 128 != 0)
    emu_fail("discard.global.L2: address not 128-byte aligned");
  // a discard destroys the line's data: a write, as far as bounds and races go
  if (!emu_bounds.check(p, 128, true)) return;
  emu_races.write(p, 128, emu_fiber);
  std::memset(p, 0xff, 128);
  emu_l2.discard(p, 128);
}

// griddepcontrol: the emulator runs launches in order, so the wait has nothing to wait for;
// it marks the calling thread as allowed to touch global memory in a launch that may start
// early (emu_races.h: an access before it is reported), and the trigger is a no-op.
inline void grid_dependency_wait() { emu_races.waited[emu_fiber] = true; }
inline void launch_dependents() {}

}  // namespace ptx
}  // namespace msfused

// Hooks of emu.h's launch and barrier.
inline void emu_ptx_block_begin() {
  msfused::ptx::emu_async.clear();
  std::fill(std::begin(msfused::ptx::emu_async_open_group_of),
            std::end(msfused::ptx::emu_async_open_group_of), 0);
}
inline void emu_ptx_block_end() {
  for (const auto& c : msfused::ptx::emu_async)
    if (!c.landed) {
      std::fprintf(stderr, "cuda_emu: cp.async into shared memory never waited for (thread %u "
                   "of block %u,%u)\n", c.owner % emu_cta.nt,
                   emu_cta.first_block.x + c.owner / emu_cta.nt % emu_cta.cx,
                   emu_cta.first_block.y + c.owner / emu_cta.nt / emu_cta.cx);
      std::fflush(stderr);
      std::abort();
    }
}
// At a barrier this thread's landed copies become visible to the whole block.
inline void emu_ptx_publish_own() {
  using namespace msfused::ptx;
  std::lock_guard<std::mutex> lk(emu_async_m);
  std::erase_if(emu_async, [](const EmuAsyncCopy& c) { return c.landed && c.owner == emu_fiber; });
}
