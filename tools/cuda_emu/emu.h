// A minimal CPU emulation of the CUDA features the kernels in csrc/cuda use, so their index
// math, masking, halos and barriers can be tested on a machine without a GPU:
// the CTAs run one by one, each as blockDim.x fibers sharing "__shared__" (static) memory
// (the scheduler is below emu_fail); the CTAs of a thread-block cluster (MSF_LAUNCH_CLUSTER)
// run together, each with its own dynamic shared memory, which the others reach through
// ptx::map_shared_rank (distributed shared memory; emu_ptx.h has the cluster barrier). Not
// for speed. float16/bfloat16 are 2-byte stand-ins with the rounding of cuda_fp16.h /
// cuda_bf16.h (round to nearest even, NaN kept). mma.sync, ldmatrix and cp.async
// (csrc/cuda/ptx_wrappers.cuh) are in emu_ptx.h. Global bytes moved through
// csrc/cuda/global_io.cuh and cp.async are counted (emu_bytes_* below).
#pragma once
#include <sys/mman.h>
// The fibers switch with a few instructions of assembly on x86-64, with ucontext elsewhere
// (or with -DCUDA_EMU_UCONTEXT, which tests that path).
#if defined(__x86_64__) && !defined(CUDA_EMU_UCONTEXT)
#define EMU_FIBER_ASM 1
#else
#include <ucontext.h>
#endif

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <type_traits>
#include <vector>

#include "emu_l2.h"  // the L2 model behind the counted global accesses
#include "emu_races.h"  // races between the CTAs of a launch in global memory
#include "emu_bounds.h"  // accesses outside the call's tensors, writes into its inputs

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

// A cluster runs at most 8 CTAs (the portable maximum, all that common.cuh's launcher asks
// for) of at most 4096 threads in all;
// emu_fiber is the running thread's index in its cluster (rank x blockDim.x + threadIdx.x),
// which indexes the emulator's per-thread state.
constexpr unsigned kEmuMaxCluster = 8, kEmuMaxFibers = 4096;
inline unsigned emu_fiber = 0;

typedef void* cudaStream_t;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrL2CacheSize = 38,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrComputeCapabilityMajor = 75
};
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
// An H100 / H200 (SXM): 132 SMs, 228 KB of shared memory per SM, 227 KB per block opt-in
// (CUDA_EMU_SMEM_LIMIT overrides the last, to test the plans of smaller GPUs), and the
// H200's 60 MiB of L2 (as PyTorch reports it; the L2 model's default capacity, run_emu.py).
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  const char* e = std::getenv("CUDA_EMU_SMEM_LIMIT");
  *v = a == cudaDevAttrMultiProcessorCount ? 132
     : a == cudaDevAttrComputeCapabilityMajor ? 9
     : a == cudaDevAttrL2CacheSize ? 60 << 20
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
// Both return whether the access may go ahead (emu_bounds.h); the callers skip it if not.
inline bool emu_count_read(const void* p, size_t n) {
  const bool in_x = p >= emu_x_lo && p < emu_x_hi;
  (in_x ? emu_bytes_read_x : emu_bytes_read) += n;
  if (!emu_bounds.check(p, n, false)) return false;
  emu_l2.access(p, n, false);
  emu_races.read(p, n, emu_fiber);
  return true;
}
inline bool emu_count_written(const void* p, size_t n) {
  emu_bytes_written += n;
  if (!emu_bounds.check(p, n, true)) return false;
  emu_l2.access(p, n, true);
  emu_races.write(p, n, emu_fiber);
  return true;
}

inline double emu_shfl[kEmuMaxFibers];
// Dynamic shared memory: one 256 KB region per CTA of a cluster (rank r at r x 256 KB);
// emu_smem is the running CTA's, emu_dyn_bytes the launch's size.
constexpr size_t kEmuSmemRegion = 256 * 1024;
alignas(128) inline unsigned char emu_dyn_smem[kEmuMaxCluster * kEmuSmemRegion];
inline unsigned char* emu_smem = emu_dyn_smem;
inline size_t emu_dyn_bytes = 0;
inline unsigned char* emu_smem_region(unsigned rank) {
  return emu_dyn_smem + rank * kEmuSmemRegion;
}
// The rank whose region holds p, or -1 outside every region.
inline int emu_smem_rank_of(const void* p) {
  const auto* b = static_cast<const unsigned char*>(p);
  if (b < emu_dyn_smem || b >= emu_dyn_smem + sizeof(emu_dyn_smem)) return -1;
  return int(size_t(b - emu_dyn_smem) / kEmuSmemRegion);
}

// emu_ptx.h (included at the end): cp.async bookkeeping per block and at each barrier.
// A cp.async may land any time between its issue and its wait. Every other block (by launch
// and block number) it lands at the issue, so that a copy into a buffer other threads still
// read (a missing barrier before the copy) corrupts what they read; otherwise it lands at
// the wait, so that a thread that reads it too early sees the NaN poison.
inline bool emu_async_land_at_issue = false;
inline unsigned long emu_launches = 0;
inline void emu_ptx_block_begin();
inline void emu_ptx_block_end();
inline void emu_ptx_publish_own();

[[noreturn]] inline void emu_fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s (thread %u of block %u,%u)\n", what, threadIdx.x,
               blockIdx.x, blockIdx.y);
  std::fflush(stderr);
  std::abort();
}

// ---- the threads of a CTA (or cluster): fibers on the launching thread ------------------
// Each CUDA thread is a fiber with its own stack; it runs until it reaches a __syncthreads(),
// a cluster barrier's wait or a warp-collective op, or returns (emu_run_block below
// schedules them). Context switches are a few instructions (x86-64: emu_switch_ctx below),
// not the OS's: a 256-thread CTA as 256 std::threads spent most of its time in futex
// wake-ups. Between two barriers the warps run in warp order, then in reverse order after
// the next (or the other way round: the first phase's order alternates between blocks), and
// so do the lanes of a warp between two of its collectives: a shared-memory read that lacks
// its barrier then reads a value not yet written (or, with the launch's NaN poison, no
// value) in one of the two orders, whichever thread writes it. The CTAs of a cluster are
// scheduled as one: their warps in rank order (or reversed), each CTA's __syncthreads()
// released when all its threads reach it, a cluster barrier when all the cluster's threads
// have arrived. A barrier that not every thread reaches, or lanes of a warp at different
// collectives, is found when no fiber can run (no timeout) and aborts.
enum EmuFiberState { EMU_RUN, EMU_AT_BARRIER, EMU_AT_CLUSTER, EMU_AT_WARP, EMU_DONE };

struct EmuFiber {
  void* sp = nullptr;  // saved stack pointer while switched out (x86-64)
#if !EMU_FIBER_ASM
  ucontext_t uc;
#endif
  EmuFiberState state = EMU_DONE;
  int warp_op = 0;  // the collective this lane waits at, and its arguments
  const void* warp_ptr = nullptr;
  unsigned warp_ldm = 0;
  int warp_layout = 0;
  unsigned cl_arrived = 0, cl_waited = 0;  // cluster-barrier arrivals and completed waits
};

#if EMU_FIBER_ASM
// emu_switch_ctx(&save_sp, new_sp): pushes the callee-saved registers, MXCSR and the x87
// control word, stores the stack pointer in *save_sp, and pops the same from new_sp. Weak:
// every translation unit that includes this header defines it.
extern "C" void emu_switch_ctx(void** save_sp, void* new_sp);
asm(R"(
  .text
  .weak emu_switch_ctx
  .hidden emu_switch_ctx
  .type emu_switch_ctx, @function
emu_switch_ctx:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size emu_switch_ctx, .-emu_switch_ctx
)");
#endif

struct EmuCta {
  static constexpr size_t kStack = size_t(1) << 20;  // per thread; a guard page below it
  std::vector<EmuFiber> fibers;  // the cluster's threads, CTA by CTA (rank x nt + thread)
  unsigned char* stacks = nullptr;
  size_t stacks_n = 0;
  void* sched_sp = nullptr;
#if !EMU_FIBER_ASM
  ucontext_t sched_uc;
#endif
  std::function<void()> body;  // the kernel call of the current block
  unsigned current = 0;
  unsigned nt = 0, nct = 1;  // threads per CTA, CTAs in the cluster
  unsigned cx = 1;           // the cluster's CTAs along x (rank = x + cx y, as %cluster_ctarank)
  dim3 first_block;          // blockIdx of rank 0
  unsigned done_in[kEmuMaxCluster] = {};  // per rank: threads that returned

  void ensure_stacks(unsigned n) {
    if (n <= stacks_n) return;
    const size_t per = kStack + 4096;
    void* p = mmap(nullptr, per * n, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) emu_fail("mmap of the fiber stacks failed");
    for (unsigned t = 0; t < n; ++t)  // overflowing a stack faults instead of corrupting
      mprotect(static_cast<unsigned char*>(p) + per * t, 4096, PROT_NONE);
    if (stacks) munmap(stacks, (kStack + 4096) * stacks_n);
    stacks = static_cast<unsigned char*>(p);
    stacks_n = n;
    fibers.resize(n);
  }
  unsigned char* stack_top(unsigned t) { return stacks + (kStack + 4096) * (t + 1); }
};
inline EmuCta emu_cta;

inline void emu_poison_smem(unsigned rank) {
  float* p = reinterpret_cast<float*>(emu_smem_region(rank));
  for (size_t i = 0; i < kEmuSmemRegion / sizeof(float); ++i) p[i] = NAN;
}

// Whether CTA `rank` of the running cluster has returned (all its threads). Its shared memory
// is gone then: poisoned at once, so a read through distributed shared memory after it
// (a cluster that lacks its barrier before exit) sees NaN.
inline bool emu_cta_exited(unsigned rank) { return emu_cta.done_in[rank] == emu_cta.nt; }

inline void emu_check_smem_tail(unsigned rank, size_t smem);

inline void emu_fiber_main() {
  emu_cta.body();
  emu_cta.fibers[emu_cta.current].state = EMU_DONE;
  const unsigned rank = emu_cta.current / emu_cta.nt;
  if (++emu_cta.done_in[rank] == emu_cta.nt) {  // the CTA's last thread returned
    emu_check_smem_tail(rank, emu_dyn_bytes);
    if (emu_cta.nct > 1) emu_poison_smem(rank);
  }
#if EMU_FIBER_ASM
  void* dead;
  emu_switch_ctx(&dead, emu_cta.sched_sp);
#else
  setcontext(&emu_cta.sched_uc);
#endif
  __builtin_unreachable();
}

// The running fiber gives the CPU back to the scheduler (it has set its state).
inline void emu_yield() {
  EmuFiber& f = emu_cta.fibers[emu_cta.current];
#if EMU_FIBER_ASM
  emu_switch_ctx(&f.sp, emu_cta.sched_sp);
#else
  swapcontext(&f.uc, &emu_cta.sched_uc);
#endif
}

inline void emu_start_fiber(unsigned t) {
  EmuFiber& f = emu_cta.fibers[t];
  f.state = EMU_RUN;
  f.cl_arrived = f.cl_waited = 0;
#if EMU_FIBER_ASM
  // The frame emu_switch_ctx pops: MXCSR and x87 control word, r15..rbp, then the return
  // address (emu_fiber_main, entered with rsp = 8 mod 16 as after a call), below top.
  auto* top = reinterpret_cast<uint64_t*>(emu_cta.stack_top(t)) - 3;  // 8 mod 16
  uint64_t* sp = top - 8;
  uint32_t csr[2];
  asm volatile("stmxcsr %0\n\tfnstcw %1" : "=m"(csr[0]), "=m"(csr[1]));
  std::memcpy(&sp[0], csr, 8);
  for (int i = 1; i <= 6; ++i) sp[i] = 0;
  sp[7] = reinterpret_cast<uint64_t>(&emu_fiber_main);
  top[0] = 0;
  f.sp = sp;
#else
  getcontext(&f.uc);
  f.uc.uc_stack.ss_sp = emu_cta.stack_top(t) - EmuCta::kStack;
  f.uc.uc_stack.ss_size = EmuCta::kStack;
  f.uc.uc_link = nullptr;
  makecontext(&f.uc, emu_fiber_main, 0);
#endif
}

// Makes fiber t the running thread: its threadIdx, its CTA's blockIdx, shared memory and
// linear index (emu_races.h).
inline void emu_enter(unsigned t) {
  emu_cta.current = t;
  emu_fiber = t;
  const unsigned rank = t / emu_cta.nt;
  threadIdx = dim3(t % emu_cta.nt, 0, 0);
  blockIdx = dim3(emu_cta.first_block.x + rank % emu_cta.cx,
                  emu_cta.first_block.y + rank / emu_cta.cx, emu_cta.first_block.z);
  emu_smem = emu_smem_region(rank);
  emu_races.cta = int32_t((blockIdx.z * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x);
}

inline void emu_resume(unsigned t) {
  emu_enter(t);
  EmuFiber& f = emu_cta.fibers[t];
#if EMU_FIBER_ASM
  emu_switch_ctx(&emu_cta.sched_sp, f.sp);
#else
  swapcontext(&emu_cta.sched_uc, &f.uc);
#endif
}

// Releases warp w's lanes if all of them wait at the same warp-collective op (aborts if
// they wait with different operations or arguments); false if some lane is elsewhere.
inline bool emu_release_warp(unsigned w, unsigned nt) {
  const unsigned lanes = nt - w * 32 < 32 ? nt - w * 32 : 32;
  for (unsigned l = 0; l < lanes; ++l)
    if (emu_cta.fibers[w * 32 + l].state != EMU_AT_WARP) return false;
  const EmuFiber& f0 = emu_cta.fibers[w * 32];
  for (unsigned l = 1; l < lanes; ++l) {
    const EmuFiber& f = emu_cta.fibers[w * 32 + l];
    if (f.warp_op != f0.warp_op || f.warp_ptr != f0.warp_ptr || f.warp_ldm != f0.warp_ldm ||
        f.warp_layout != f0.warp_layout) {
      emu_enter(w * 32 + l);
      emu_fail("lanes of a warp called a warp-collective op with different operations or "
               "arguments");
    }
  }
  for (unsigned l = 0; l < lanes; ++l) emu_cta.fibers[w * 32 + l].state = EMU_RUN;
  return true;
}

// Runs the nct CTAs of nt threads each (one CTA, or a cluster's) to completion. Between two
// barriers one warp runs at a time, through all its warp-collective ops, as far as the next
// barrier: the warps are as far out of step as the hardware allows, so a warp that writes
// (or copies into) shared memory that another warp has yet to read in the same phase is
// caught. reverse: the order of the first phase (every other block of a launch starts
// reversed, so each phase of a kernel runs in both orders in a launch of two blocks or
// more). A cluster's CTAs run one after another in rank order (reversed with `reverse`),
// each as far as it can (through its own __syncthreads() to a cluster barrier or its
// return) before the next one starts: as far out of step as the cluster barrier allows, so
// that a CTA reading another's shared memory before that one wrote it, or after it
// returned, sees the NaN poison.
inline void emu_run_block(unsigned nt, unsigned nct, bool reverse) {
  const unsigned n = nt * nct;
  emu_cta.ensure_stacks(n);
  emu_cta.nt = nt;
  emu_cta.nct = nct;
  for (unsigned r = 0; r < nct; ++r) emu_cta.done_in[r] = 0;
  for (unsigned t = 0; t < n; ++t) emu_start_fiber(t);
  const unsigned nw = (nt + 31) / 32;  // warps per CTA (a cluster's CTAs are whole warps)
  bool rev[kEmuMaxCluster];  // per CTA: the order of its current phase
  for (unsigned r = 0; r < nct; ++r) rev[r] = reverse;
  for (;;) {
    for (unsigned i = 0; i < nct; ++i) {
      const unsigned r = reverse ? nct - 1 - i : i, f0 = r * nt;
      for (;;) {  // CTA r as far as it goes
        for (unsigned k = 0; k < nw; ++k) {
          const unsigned w = rev[r] ? nw - 1 - k : k;
          const unsigned lanes = nt - w * 32 < 32 ? nt - w * 32 : 32;
          do {
            for (unsigned j = 0; j < lanes; ++j) {
              const unsigned t = f0 + w * 32 + (rev[r] ? lanes - 1 - j : j);
              while (emu_cta.fibers[t].state == EMU_RUN) emu_resume(t);
            }
          } while (emu_release_warp(f0 / 32 + w, f0 + nt));
        }
        // No thread of CTA r can run: each is done, waits at a barrier, or waits at a
        // warp-collective op that not all of its warp's lanes reached.
        unsigned at_barrier = 0, done = 0, done_t = 0;
        for (unsigned t = f0; t < f0 + nt; ++t) {
          if (emu_cta.fibers[t].state == EMU_AT_WARP) {
            emu_enter(t);
            emu_fail("not every lane of the warp called a warp-collective op (warp divergence)");
          }
          at_barrier += emu_cta.fibers[t].state == EMU_AT_BARRIER;
          if (emu_cta.fibers[t].state == EMU_DONE) { ++done; done_t = t; }
        }
        if (at_barrier != 0 && done != 0) {  // name a thread that returned
          emu_enter(done_t);
          emu_fail("a __syncthreads() that not every thread of the block reached");
        }
        if (at_barrier != nt) break;
        for (unsigned t = f0; t < f0 + nt; ++t) emu_cta.fibers[t].state = EMU_RUN;
        rev[r] = !rev[r];
      }
    }
    // No thread of the cluster can run. A cluster barrier's phase completes when every
    // thread of the cluster has arrived (threads that returned never do: their cluster
    // deadlocks, as it would on the GPU).
    bool all_done = true, progress = false;
    unsigned arrived = ~0u;
    for (unsigned t = 0; t < n; ++t) {
      const EmuFiber& f = emu_cta.fibers[t];
      all_done = all_done && f.state == EMU_DONE;
      arrived = f.cl_arrived < arrived ? f.cl_arrived : arrived;
    }
    if (all_done) return;
    for (unsigned t = 0; t < n; ++t) {
      EmuFiber& f = emu_cta.fibers[t];
      if (f.state == EMU_AT_CLUSTER && f.cl_waited < arrived) {
        ++f.cl_waited;
        f.state = EMU_RUN;
        progress = true;
      }
    }
    if (!progress) {
      for (unsigned t = 0; t < n; ++t)  // name a thread that waits
        if (emu_cta.fibers[t].state != EMU_DONE) { emu_enter(t); break; }
      emu_fail(nct > 1 ? "deadlock: a cluster barrier or __syncthreads() that not every thread "
                         "of the cluster (or block) reached"
                       : "a __syncthreads() that not every thread of the block reached");
    }
  }
}

inline void __syncthreads() {
  emu_ptx_publish_own();
  emu_cta.fibers[emu_cta.current].state = EMU_AT_BARRIER;
  emu_yield();
}

template <typename A>
inline A __shfl_down_sync(unsigned, A v, int off) {
  const unsigned t = emu_fiber;
  emu_shfl[t] = static_cast<double>(v);
  __syncthreads();
  const int lane = threadIdx.x % 32;
  A r = lane + off < 32 ? static_cast<A>(emu_shfl[t + off]) : v;
  __syncthreads();
  return r;
}

#define MSF_EXTERN_SMEM(name) unsigned char* name = emu_smem

// When a CTA returns: the shared memory past the launch's dynamic allocation still holds the
// poison, i.e. no thread wrote beyond it with a plain store (16-byte accesses are checked
// as they happen: emu_ptx.h emu_check_smem_16). On a GPU that is memcheck's "invalid
// __shared__ write"; reads beyond give the NaN poison. After a cluster, with from = 0:
// nothing wrote into a CTA's shared memory (through distributed shared memory) after it
// returned.
inline void emu_check_smem_tail(unsigned rank, size_t smem) {
  const uint32_t poison = emu_float_to_bits(NAN);
  const unsigned char* region = emu_smem_region(rank);
  const size_t n = kEmuSmemRegion / 4;
  for (size_t i = (smem + 3) / 4; i < n; ++i) {
    uint32_t u;
    std::memcpy(&u, region + 4 * i, 4);
    if (u != poison) {
      char msg[200];
      if (smem == 0)
        std::snprintf(msg, sizeof(msg), "shared memory of CTA rank %u written at byte %zu after "
                      "that CTA returned (distributed shared memory)", rank, 4 * i);
      else
        std::snprintf(msg, sizeof(msg), "a thread wrote shared memory at byte %zu of CTA rank "
                      "%u, past the launch's %zu bytes of dynamic shared memory", 4 * i, rank,
                      smem);
      emu_fail(msg);
    }
  }
}

// Runs a launch, its blocks one by one or, with a cluster of more than one CTA (cluster.x
// by cluster.y, dividing the grid), its clusters one by one, each cluster's CTAs together.
template <typename K, typename... Args>
void emu_launch(K kernel, dim3 grid, dim3 block, size_t smem, bool pdl, dim3 cluster,
                Args... args) {
  if (smem > kEmuSmemRegion) throw 1;
  const unsigned nt = block.x * block.y * block.z, nct = cluster.x * cluster.y * cluster.z;
  if (cluster.z != 1 || nct < 1 || nct > kEmuMaxCluster || grid.x % cluster.x != 0 ||
      grid.y % cluster.y != 0 || (nct > 1 && (nt % 32 != 0 || nt * nct > kEmuMaxFibers)) ||
      nt > 1024)
    emu_fail("a launch whose cluster is not 1-8 CTAs (x by y) dividing the grid, of whole "
             "warps, at most 4096 threads");
  gridDim = grid;
  blockDim = block;
  emu_dyn_bytes = smem;
  emu_cta.body = [&] { kernel(args...); };
  emu_cta.cx = cluster.x;
  emu_l2.on_launch();
  emu_races.on_launch(emu_launches);
  emu_races.pdl = pdl;
  unsigned long block_no = emu_launches++;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; by += cluster.y)
      for (unsigned bx = 0; bx < grid.x; bx += cluster.x) {
        // poison shared memory so reads of unwritten smem show up as NaN
        for (unsigned r = 0; r < nct; ++r) emu_poison_smem(r);
        emu_cta.first_block = dim3(bx, by, bz);
        emu_races.on_cluster(nt);
        const unsigned long k = block_no++;
        emu_async_land_at_issue = (k & 1) != 0;
        emu_ptx_block_begin();
        emu_run_block(nt, nct, (k & 2) != 0);
        emu_ptx_block_end();
        if (nct > 1)
          for (unsigned r = 0; r < nct; ++r) emu_check_smem_tail(r, 0);
      }
  emu_cta.body = nullptr;
}
#define MSF_LAUNCH(kernel, grid, block, smem, stream, ...) \
  emu_launch(kernel, dim3(grid), dim3(block), smem, false, dim3(1), __VA_ARGS__)
// A launch that may start early (csrc/cuda/common.cuh): emulated in order like any other,
// with emu_races.h checking that no thread touches global memory before its wait; `pdl`
// (whether the real launch would ask for early start) does not change that.
#define MSF_LAUNCH_PDL(pdl, kernel, grid, block, smem, stream, ...) \
  (emu_launch(kernel, dim3(grid), dim3(block), smem, true, dim3(1), __VA_ARGS__), cudaSuccess)
// A launch of clusters of `cluster` CTAs (a dim3, x by y; common.cuh), which may start
// early too.
#define MSF_LAUNCH_CLUSTER(pdl, cluster, kernel, grid, block, smem, stream, ...) \
  (emu_launch(kernel, dim3(grid), dim3(block), smem, true, dim3(cluster), __VA_ARGS__), \
   cudaSuccess)

// ---- warp-collective bookkeeping (emu_ptx.h's mma.sync and ldmatrix) --------------------
// All 32 lanes of the calling thread's warp meet here with the same (op, ptr, ldm, layout).
inline void emu_warp_collective(int op, const void* ptr, unsigned ldm, int layout) {
  if (blockDim.x % 32 != 0) emu_fail("a warp-collective op in a block whose size is not a multiple of 32");
  EmuFiber& f = emu_cta.fibers[emu_cta.current];
  f.warp_op = op;
  f.warp_ptr = ptr;
  f.warp_ldm = ldm;
  f.warp_layout = layout;
  f.state = EMU_AT_WARP;
  emu_yield();
}

#include "emu_ptx.h"  // msfused::ptx: mma.sync, ldmatrix, cp.async stand-ins
