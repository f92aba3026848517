// SIMD helpers of the CPU kernels: scratch buffers, 32-byte vectors, the activations on
// rows and vectors (from csrc/activations.h), GEMM entry points and the parallel loop.
// Part of the kernel source that block_kernel_impl.h compiles once per instruction set.
#pragma once
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "activations.h"
#include "cpu/block_kernel.h"

// Every part of the kernel source lives in msfused::cpu::<isa>::(anonymous namespace), so
// the copies compiled for different instruction sets never mix.
#define MSFUSED_KERNEL_BEGIN \
  namespace msfused {        \
  namespace cpu {            \
  namespace MSFUSED_ISA {    \
  namespace {
#define MSFUSED_KERNEL_END \
  }                        \
  }                        \
  }                        \
  }

MSFUSED_KERNEL_BEGIN

// Scratch on 64-byte (cache-line) boundaries. malloc's 16-byte alignment (glibc's large
// blocks start 16 bytes into a page) put every 64-byte vector of a band or tile buffer
// across two cache lines: the depthwise rows measured 6% (FMA) to 15-20% (dot products)
// slower from such buffers in isolation (benchmarks/NOTES.md entry 43).
inline void* alloc_lines(size_t bytes) {
  void* p = nullptr;
  if (posix_memalign(&p, 64, bytes > 0 ? bytes : 1) != 0) abort();
  return p;
}

template <typename T>
struct Buf {  // heap scratch of one task; no std:: containers in the kernels
  T* p;
  explicit Buf(int64_t n) : p(static_cast<T*>(alloc_lines(sizeof(T) * (n > 0 ? n : 1)))) {}
  ~Buf() { free(p); }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
};


// Vectors through GCC/Clang vector extensions, MSFUSED_VEC_BYTES wide: 32 by default (one
// AVX2 register; two SSE/NEON registers in the baseline build), 64 in the AVX-512 build.
// Register-blocked loops use these explicitly: with plain arrays the compiler keeps the
// accumulators on the stack. aligned(sizeof(T)) makes the pointer casts below valid
// unaligned loads and stores.
#ifndef MSFUSED_VEC_BYTES
#define MSFUSED_VEC_BYTES 32
#endif
template <typename T>
struct Vec;
template <>
struct Vec<float> {
  typedef float type __attribute__((vector_size(MSFUSED_VEC_BYTES), aligned(4)));
  static constexpr int n = MSFUSED_VEC_BYTES / 4;
};
template <>
struct Vec<double> {
  typedef double type __attribute__((vector_size(MSFUSED_VEC_BYTES), aligned(8)));
  static constexpr int n = MSFUSED_VEC_BYTES / 8;
};
// Vec<T>::type by name. A template parameter deduced from such a vector is the plain vector
// type, without the typedef's alignment attribute, so a helper taking V& or V* may assume the
// natural alignment (aligned moves, vmovaps, on a 64-byte vector) where the object, declared
// with the typedef, may sit anywhere 4-aligned: a fault wherever such a helper is not inlined
// (an AddressSanitizer build showed it). Helpers that take vectors by reference or pointer
// name VecT<T>, which keeps the attribute (unaligned moves).
template <typename T>
using VecT = typename Vec<T>::type;
template <typename T>
inline typename Vec<T>::type vload(const T* p) {
  return *reinterpret_cast<const typename Vec<T>::type*>(p);
}
template <typename T>
inline void vstore(T* p, typename Vec<T>::type v) {
  *reinterpret_cast<typename Vec<T>::type*>(p) = v;
}

// The sum of a vector's lanes.
template <typename V>
inline auto hsum(V v) {
  auto s = v[0];
  for (int j = 1; j < int(sizeof(V) / sizeof(s)); ++j) s += v[j];
  return s;
}

// n zeros at p. The pixel-major kernels zero a padding column (C elements) at both ends of
// every band and scratch row, about ten per tile row in the backward: as memset calls (a
// size only known at run time) each paid the call and the library's size dispatch for a
// few hundred bytes. Short runs are vector stores in line; long ones stay memset.
template <typename T>
inline void zero_n(T* p, int64_t n) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (n * int64_t(sizeof(T)) <= 4096) {
      constexpr int V = Vec<T>::n;
      const typename Vec<T>::type z = {};
      // (each address through an empty asm: GCC otherwise recognises the zeroing loop and
      // calls memset for it after all)
      int64_t i = 0;
      for (; i + V <= n; i += V) {
        T* q = p + i;
        __asm__("" : "+r"(q));
        vstore(q, z);
      }
      for (; i < n; ++i) {
        T* q = p + i;
        __asm__("" : "+r"(q));
        *q = T(0);
      }
      return;
    }
  }
  memset(p, 0, sizeof(T) * n);
}

// n elements from src to dst (not overlapping). The same reason as zero_n: the kernels copy
// one pixel's C or Cout channels at a time (the identity shortcut's share of dx, the
// projection's x columns and its dx) or one planar row, up to 100 thousand memcpy calls per
// call at the benchmark shapes.
template <typename T>
inline void copy_n(T* dst, const T* src, int64_t n) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    if (n * int64_t(sizeof(T)) <= 4096) {
      constexpr int V = Vec<T>::n;
      int64_t i = 0;
      for (; i + V <= n; i += V) {
        T* q = dst + i;
        __asm__("" : "+r"(q));
        vstore(q, vload(src + i));
      }
      for (; i < n; ++i) {
        T* q = dst + i;
        __asm__("" : "+r"(q));
        *q = src[i];
      }
      return;
    }
  }
  memcpy(dst, src, sizeof(T) * n);
}

// ---- 16-bit storage: bfloat16 as its bits (the upper half of a float32), float16 as the
// compiler's _Float16 -----------------------------------------------------------------------
// Kernels that read or write bfloat16 or float16 tensors compute in float: elements are
// widened on load (exact) and rounded to nearest even on store (NaN stays a NaN), which is
// what PyTorch's own float -> bfloat16 / float16 conversions do. For O == T the helpers below
// are plain loads and stores, so one kernel template serves every storage type. float16
// converts with F16C's vcvtph2ps / vcvtps2ph in the AVX2 and AVX-512 builds (MSFUSED_F16C:
// their target pragmas enable it; GCC 12 converts vectors of _Float16 element by element)
// and through the compiler's runtime in the baseline build.
typedef uint16_t bf16_t;
#if defined(__FLT16_MAX__)
#define MSFUSED_HAVE_F16 1
typedef _Float16 f16_t;
#endif

inline float bf16_to_float(bf16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
inline bf16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t((u >> 16) | 0x40);  // quiet NaN
#if defined(MSFUSED_HW_BF16)
  // as vcvtneps2bf16 does (vstore_as): a denormal float32 becomes a zero of its sign, so a
  // row's scalar tail rounds like its vectors
  if ((u & 0x7f800000u) == 0) u &= 0x80000000u;
#endif
  return bf16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <typename T, typename O>
inline T load_as(const O* p) {
  if constexpr (std::is_same_v<O, bf16_t>) return bf16_to_float(*p);
  else return T(*p);
}
template <typename T, typename O>
inline void store_as(O* p, T v) {
  if constexpr (std::is_same_v<O, bf16_t>) *p = float_to_bf16(v);
  else *p = O(v);
}

// The bfloat16 bits of each lane of v (float_to_bf16 on a vector), in the low half of a
// 32-bit lane.
inline auto bf16_bits(typename Vec<float>::type v) {
  typedef uint32_t U __attribute__((vector_size(4 * Vec<float>::n)));
  const U u = (U)v;
  const U rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  return v != v ? (u >> 16) | 0x40u : rounded;
}

#if defined(MSFUSED_HW_BF16) && MSFUSED_VEC_BYTES == 64
// The word permutation that interleaves the two halves of a 512-bit vector (a0, b0, a1, b1,
// ...): _mm512_cvtne2ps_pbh(b, a) puts a's 16 roundings low and b's high, and the
// VNNI-paired operands of the bfloat16 GEMMs want them side by side.
inline __m512i bf16_pair_index() {
  return _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7,
                          22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
}
#endif

template <typename T, typename O>
inline typename Vec<T>::type vload_as(const O* p) {
  if constexpr (std::is_same_v<O, bf16_t>) {
    static_assert(std::is_same_v<T, float>, "bfloat16 storage widens to float");
    constexpr int VN = Vec<float>::n;
    typedef uint16_t H __attribute__((vector_size(2 * VN), aligned(2)));
    typedef uint32_t U __attribute__((vector_size(4 * VN)));
    const U u = __builtin_convertvector(*reinterpret_cast<const H*>(p), U) << 16;
    return (typename Vec<float>::type)u;
#ifdef MSFUSED_HAVE_F16
  } else if constexpr (std::is_same_v<O, f16_t>) {
    static_assert(std::is_same_v<T, float>, "float16 storage widens to float");
    typedef typename Vec<float>::type V;
#if defined(MSFUSED_F16C) && MSFUSED_VEC_BYTES == 64
    // the zero-masked form: GCC 12's _mm512_cvtph_ps starts from _mm512_undefined_ps() and
    // warns (-Wmaybe-uninitialized) at every inlined use; with a full mask it is the same
    // instruction
    return (V)_mm512_maskz_cvtph_ps(__mmask16(0xffff),
                                    _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif defined(MSFUSED_F16C) && MSFUSED_VEC_BYTES == 32
    return (V)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    V v;
    for (int i = 0; i < Vec<float>::n; ++i) v[i] = float(p[i]);
    return v;
#endif
#endif
  } else {
    return vload(p);
  }
}
template <typename T, typename O>
inline void vstore_as(O* p, typename Vec<T>::type v) {
  if constexpr (std::is_same_v<O, bf16_t>) {
    static_assert(std::is_same_v<T, float>, "bfloat16 storage rounds from float");
#if defined(MSFUSED_HW_BF16) && MSFUSED_VEC_BYTES == 64
    // AVX512-BF16's one-instruction rounding (round to nearest even, NaN quieted as
    // bf16_bits does), where bf16_bits takes nine integer vector operations that compete
    // with the depthwise FMAs for the vector pipes. Unlike bf16_bits it flushes denormal
    // inputs (below 1.2e-38) to zero, as oneDNN's bfloat16 kernels on this instruction do.
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh((__m512)v));
#else
    constexpr int VN = Vec<float>::n;
    typedef uint16_t H __attribute__((vector_size(2 * VN), aligned(2)));
    *reinterpret_cast<H*>(p) = __builtin_convertvector(bf16_bits(v), H);
#endif
#ifdef MSFUSED_HAVE_F16
  } else if constexpr (std::is_same_v<O, f16_t>) {
    static_assert(std::is_same_v<T, float>, "float16 storage rounds from float");
#if defined(MSFUSED_F16C) && MSFUSED_VEC_BYTES == 64
    // zero-masked for the reason given in vload_as
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p),
                        _mm512_maskz_cvtps_ph(__mmask16(0xffff), (__m512)v,
                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#elif defined(MSFUSED_F16C) && MSFUSED_VEC_BYTES == 32
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                     _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    for (int i = 0; i < Vec<float>::n; ++i) p[i] = f16_t(v[i]);
#endif
#endif
  } else {
    vstore(p, v);
  }
}

// dst[e] = src[e] rounded to the 16-bit storage type O, for n elements.
template <typename O>
inline void round_to(const float* src, int64_t n, O* dst) {
  constexpr int VN = Vec<float>::n;
  int64_t e = 0;
  for (; e + VN <= n; e += VN) vstore_as<float>(dst + e, vload(src + e));
  for (; e < n; ++e) store_as(dst + e, src[e]);
}

// ---- activations (csrc/activations.h) on scalars, rows and vectors -------------------------

template <int ACT, typename T>
inline T act_f(T v) {
  return ActOp<ACT>::fwd(v);
}

// What the backward differentiates an activation from (csrc/activations.h, ActOp::grad):
// the output for kSavesOutput activations, else the pre-activation.
template <int ACT>
constexpr bool kNeedsPreact = act_saves(ACT) == kSavesPreact;

template <int ACT, typename T>
inline const T* grad_source(const T* post, const T* pre) {
  return kNeedsPreact<ACT> ? pre : post;
}

// act on a vector: in vector registers where ActOp has a vector form, else lane by lane.
template <int ACT, typename T>
inline typename Vec<T>::type act_v(typename Vec<T>::type v) {
  if constexpr (ActOp<ACT>::kVector) {
    return ActOp<ACT>::fwd(v);
  } else {
    for (int j = 0; j < Vec<T>::n; ++j) v[j] = ActOp<ACT>::fwd(v[j]);
    return v;
  }
}

// Stores one pixel's channel vector: pre (if asked) gets z, post gets act(z) (rounded
// when post is 16-bit storage).
template <int ACT, typename V, typename O, typename P>
inline void dw_store(V z, O* post, P* pre) {
  typedef std::remove_cv_t<std::remove_reference_t<decltype(z[0])>> T;
  if (pre) vstore_as<T>(pre, z);
  vstore_as<T>(post, act_v<ACT, T>(z));
}

// out[i] = g[i] * act'(i) for n elements (out may be g), branch-free and vectorised where
// ActOp has a vector form (relu, relu6: PyTorch's select form; the masks are
// data-dependent, so a branch would mispredict). post and pre are the activation's output
// and input; only the one ActOp::grad reads (grad_source) is touched, neither for none.
template <int ACT, typename T>
inline void act_grad(const T* g, const T* post, const T* pre, T* out, int64_t n) {
  constexpr int VN = Vec<T>::n;
  if (ACT == kActNone) {
    if (out != g) memcpy(out, g, sizeof(T) * n);
    return;
  }
  const T* v = grad_source<ACT>(post, pre);
  int64_t i = 0;
  if constexpr (ActOp<ACT>::kVector)
    for (; i + VN <= n; i += VN) vstore(out + i, ActOp<ACT>::grad(vload(g + i), vload(v + i)));
  for (; i < n; ++i) out[i] = ActOp<ACT>::grad(g[i], v[i]);
}

// act_grad with g and its source (post or pre, as grad_source picks) read from storage of
// type I (16-bit storage widened on load, exact), the result in the compute type T.
template <int ACT, typename T, typename I>
inline void act_grad_in(const I* g, const I* post, const I* pre, T* out, int64_t n) {
  if constexpr (std::is_same_v<T, I>) {
    act_grad<ACT>(g, post, pre, out, n);
  } else {
    constexpr int VN = Vec<T>::n;
    int64_t i = 0;
    if (ACT == kActNone) {
      for (; i + VN <= n; i += VN) vstore(out + i, vload_as<T>(g + i));
      for (; i < n; ++i) out[i] = load_as<T>(g + i);
      return;
    }
    const I* v = grad_source<ACT>(post, pre);
    if constexpr (ActOp<ACT>::kVector)
      for (; i + VN <= n; i += VN)
        vstore(out + i, ActOp<ACT>::grad(vload_as<T>(g + i), vload_as<T>(v + i)));
    for (; i < n; ++i) out[i] = ActOp<ACT>::grad(load_as<T>(g + i), load_as<T>(v + i));
  }
}

template <int ACT, typename T>
inline void act_row(const T* pre, T* post, int64_t n) {
  for (int64_t w = 0; w < n; ++w) post[w] = act_f<ACT>(pre[w]);
}

// A task's scratch buffer `slot` (tls_buf below): thread-local and reused across calls, so
// tiles never allocate. Each slot is used by one buffer of one pass at a time.
template <typename T>
T* tls_buf(int slot, int64_t n);
template <typename T>
struct TlsBuf {
  T* p;
  TlsBuf(int slot, int64_t n) : p(tls_buf<T>(slot, n)) {}
};

template <typename T>
inline void gemm(const Runtime& rt, char ta, char tb, int64_t m, int64_t n, int64_t k, T alpha,
                 const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c, int64_t ldc);
template <>
inline void gemm<float>(const Runtime& rt, char ta, char tb, int64_t m, int64_t n, int64_t k,
                        float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                        float beta, float* c, int64_t ldc) {
  rt.sgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
template <>
inline void gemm<double>(const Runtime& rt, char ta, char tb, int64_t m, int64_t n, int64_t k,
                         double alpha, const double* a, int64_t lda, const double* b,
                         int64_t ldb, double beta, double* c, int64_t ldc) {
  rt.dgemm(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

// Row-major GEMM: C (m x n, ldc) = alpha * op(A) op(B) + beta * C, where op(A) is m x k and
// A is stored row-major (k x m when ta == 'T'). Mapped onto column-major BLAS as
// C^T = op(B)^T op(A)^T.
// GEMMs of at most this many multiply-adds run as plain loops: a BLAS call costs about a
// microsecond before it computes anything, more than a tiny tile's whole GEMM.
static const int64_t kSmallGemmMacs = 4096;

template <typename T>
inline void gemm_rm(const Runtime& rt, char ta, char tb, int64_t m, int64_t n, int64_t k,
                    T alpha, const T* a, int64_t lda, const T* b, int64_t ldb, T beta, T* c,
                    int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (m * n * k > kSmallGemmMacs) return gemm<T>(rt, tb, ta, n, m, k, alpha, b, ldb, a, lda, beta, c, ldc);
  const int64_t as_i = ta == 'N' ? lda : 1, as_l = ta == 'N' ? 1 : lda;
  const int64_t bs_l = tb == 'N' ? ldb : 1, bs_j = tb == 'N' ? 1 : ldb;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) {
      T acc = T(0);
      for (int64_t l = 0; l < k; ++l) acc += a[i * as_i + l * as_l] * b[l * bs_l + j * bs_j];
      T* o = c + i * ldc + j;
      *o = beta == T(0) ? alpha * acc : alpha * acc + beta * *o;  // beta 0: C is not read
    }
}

// f(i) for i in [0, n) in parallel. The threads claim tasks one at a time from a shared
// counter instead of taking one fixed run each (at::parallel_for's split): on a machine
// shared with other jobs, or with cores of different speeds, a thread that falls behind no
// longer holds the rest at the end of the loop. Every task writes only its own outputs
// (tiles, a chunk's partial gradients), so which thread runs it changes no bits.
template <typename F>
inline void par_for(const Runtime& rt, int64_t n, F& f) {
  const int64_t workers = rt.num_threads < n ? rt.num_threads : n;
  if (workers <= 1) {
    for (int64_t i = 0; i < n; ++i) f(i);
    return;
  }
  struct Ctx {
    F* f;
    int64_t n;
    int64_t next;  // the next unclaimed task (GCC atomic builtins: no std:: templates here)
  } ctx{&f, n, 0};
  rt.parallel_for(workers, 1, &ctx, [](void* c, int64_t b, int64_t e) {
    Ctx& x = *static_cast<Ctx*>(c);
    for (int64_t w = b; w < e; ++w)
      for (int64_t i = __atomic_fetch_add(&x.next, 1, __ATOMIC_RELAXED); i < x.n;
           i = __atomic_fetch_add(&x.next, 1, __ATOMIC_RELAXED))
        (*x.f)(i);
  });
}
template <typename T>
T* tls_buf(int slot, int64_t n) {
  // Per-thread scratch, grown on demand and kept for the thread's lifetime (bounded by the
  // largest tile seen), so the hot path never allocates.
  constexpr int kSlots = 24;
  static thread_local void* ptr[kSlots] = {nullptr};
  static thread_local int64_t cap[kSlots] = {0};
  if (slot < 0 || slot >= kSlots) abort();  // a slot number out of range: a kernel bug
  const int64_t bytes = sizeof(T) * (n > 0 ? n : 1);
  if (cap[slot] < bytes) {
    free(ptr[slot]);
    ptr[slot] = alloc_lines(bytes);
    cap[slot] = bytes;
  }
  return static_cast<T*>(ptr[slot]);
}

template <typename T>
inline void mm_nn(const Runtime& rt, int64_t M, int64_t N, int64_t K, const T* a, int64_t lda,
                  const T* b, int64_t ldb, T* c, int64_t ldc, bool add);
template <>
inline void mm_nn<float>(const Runtime& rt, int64_t M, int64_t N, int64_t K, const float* a,
                         int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc,
                         bool add) {
  if (M > 0 && N > 0) rt.sbrgemm(M, N, K, lda, ldb, ldc, add, a, b, c);
}
template <>
inline void mm_nn<double>(const Runtime& rt, int64_t M, int64_t N, int64_t K, const double* a,
                          int64_t lda, const double* b, int64_t ldb, double* c, int64_t ldc,
                          bool add) {
  gemm_rm<double>(rt, 'N', 'N', M, N, K, 1.0, a, lda, b, ldb, add ? 1.0 : 0.0, c, ldc);
}

MSFUSED_KERNEL_END
