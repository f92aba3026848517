// The CPU kernels compiled for AVX-512 (64-byte vectors: 16-channel blocks in the depthwise
// rows): float32 and the bfloat16 kernels on bfloat16 storage, which the binding calls only
// on CPUs with AVX-512 (the native bfloat16 forward: block_kernel_avx512bf16.cpp). Off
// x86-64 this is a baseline build that nothing calls.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define MSFUSED_VEC_BYTES 64
// float16 storage converts with vcvtph2ps / vcvtps2ph (kernel_simd.h); GCC only, whose
// target pragma enables the intrinsics for the code after it
#if defined(__GNUC__) && !defined(__clang__)
#define MSFUSED_F16C
#endif
#endif
#define MSFUSED_ISA avx512
#define MSFUSED_NO_FLOAT64  // float64 stays on AVX2 (block_kernel_impl.h)
#include <type_traits>

#include "cpu/block_kernel.h"
#include "cpu/block_kernel_impl.h"

